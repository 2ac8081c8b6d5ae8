"""Expert load balancing with routing foresight: planner, dispatch split, EPLB baseline.

    from pr2_jax import balance
    loads_LE = balance.loads_from_routes(routes_BTLK, valid_BT, num_experts)
    plan = balance.plan_placement(loads_LE, num_devices, slots_per_device, previous=plan)
    slot_ids_NK = balance.assign_replicas(expert_ids_NK, valid_N, plan.layer(l))
    balance.imbalance(plan.device_load)        # [L] max / mean device load
"""

from pr2_jax.balance.dispatch import assign_replicas, slot_counts
from pr2_jax.balance.eplb import eplb_device_load, eplb_rebalance
from pr2_jax.balance.loads import (EMPTY, fetched_experts, imbalance, loads_from_routes,
                                   native_layout, plan_stats, static_device_load)
from pr2_jax.balance.planner import Plan, plan_placement, replica_counts

__all__ = ["EMPTY", "Plan", "assign_replicas", "eplb_device_load", "eplb_rebalance",
           "fetched_experts", "imbalance", "loads_from_routes", "native_layout", "plan_placement",
           "plan_stats", "replica_counts", "slot_counts", "static_device_load"]
