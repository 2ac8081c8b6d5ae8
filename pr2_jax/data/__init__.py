"""The supervised reverse-copy task (`synthetic`), a quick check that the stack trains.

The RL tasks and their data are in `pr2_jax.rl` (`rl.tasks`, `rl.data`).
"""
