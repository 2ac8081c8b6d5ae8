"""Where a step's time goes: per-op profiler times summed by kind, ours and transformers'.

    python -m experiments.bench_peer --breakdown=3   # the benchmark, then this table for both

Ours: a `jax.profiler` trace of the compiled function. Each XLA:CPU op event is
named by its HLO instruction, whose `op_name` metadata in the compiled HLO text
names the model code it came from (`.../layers_2/self_attn/...`); an op is a
matmul by its opcode (a `dot`, or a fusion that holds one). Events nest (a loop
holds its body's ops, a collective its rendezvous and the wait inside that), so
each counts its self time: its duration less that of the events inside it. The
devices' ops share XLA's thread pools, so the figures are op time per device
and call: the sum over the XLA threads divided by the devices.

transformers: `torch.profiler`'s self CPU time of each aten op, per call, on
the calling thread (its intra-op threads work inside the ops); its fused
attention kernel (`sdpa`) holds the score and value matmuls, softmax and
masking together.

Both are op time, not wall time: Python, dispatch and idle cores between ops
are in no kind. The `wall` row is each side's own time per profiled call; for
ours, two more rows split off the wall time during which no XLA op ran on any
thread, or exactly one did (`concurrency`: on 2 cores, one core idle). That is
how the per-call page faults of the tenth round in docs/benchmark_rounds.md showed.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

# The table's rows. The three unindented kinds add up to the total, for both sides; the indented
# ones (ours only) split the kind above them.
KINDS = ("matmuls outside attention",
         "attention core", "  its two matmuls", "  softmax, mask, RoPE, layouts",
         "other", "  MoE routing, dispatch, combine", "  collectives",
         "  waiting for the other device", "  norms", "  loss, optimizer, the rest")
_PARTS = {"attention core": KINDS[2:4], "other": KINDS[5:]}
_SKIPPED = ("ThunkExecutor", "ThreadpoolListener", "end: ")  # executor bookkeeping, not ops
_COLLECTIVE = re.compile(r"(all[-_]gather|reduce[-_]scatter|all[-_]reduce|all[-_]to[-_]all|"
                         r"collective[-_]permute|psum)")
_METADATA = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name=\"([^\"]*)\"")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def parse_hlo(hlo_text: str) -> tuple[dict[str, str], set[str]]:
  """From a compiled module's text: instruction name -> its `op_name` metadata, and the names
  of the matmuls (a `dot`, or a fusion calling a computation that holds one). A fusion that
  holds a matmul gets its matmul's `op_name`: XLA names a fusion after its root, often the
  reduction or elementwise op the matmul feeds. A `copy` may carry a dot's `op_name` too (a
  layout change of its operand), which is why matmuls go by opcode."""
  names, matmuls, dot_of, computation = {}, set(), {}, None
  lines = hlo_text.splitlines()
  for line in lines:
    start = _COMPUTATION.match(line)
    if start:
      computation = start[1]
    m, inst = _METADATA.match(line), _INSTRUCTION.match(line)
    if m:
      names[m[1]] = m[2]
    if inst and " dot(" in line:
      matmuls.add(inst[1])
      if computation is not None:
        dot_of.setdefault(computation, m[2] if m else "")
  for line in lines:
    inst, calls = _INSTRUCTION.match(line), _CALLS.search(line)
    if inst and calls and calls[1] in dot_of:
      matmuls.add(inst[1])
      names[inst[1]] = dot_of[calls[1]]
  return names, matmuls


def classify(event_name: str, op_name: str, is_matmul: bool) -> str | None:
  """The kind of one XLA op event (None: executor bookkeeping, not an op)."""
  if event_name.startswith(_SKIPPED):
    return None
  if event_name.startswith(("Rendezvous", "Wait")):
    return "  waiting for the other device"
  if _COLLECTIVE.match(event_name):
    return "  collectives"
  in_attention = "self_attn/" in op_name and "_proj/" not in op_name and "_norm/" not in op_name
  if is_matmul:
    return "  its two matmuls" if in_attention else "matmuls outside attention"
  if in_attention:
    return "  softmax, mask, RoPE, layouts"
  if "/mlp/" in op_name:
    return "  MoE routing, dispatch, combine"
  if "norm" in op_name:  # the layer norms and the attention's q/k norms
    return "  norms"
  return "  loss, optimizer, the rest"


def self_times(events: list[dict]) -> list[tuple[dict, float]]:
  """(event, its duration less the events nested in it on its thread), for complete events."""
  by_thread = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X":
      by_thread[(e["pid"], e["tid"])].append(e)
  out = []
  for thread in by_thread.values():
    thread.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack = []  # [event, self time so far]: the open events, outermost first
    for e in thread:
      while stack and e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]:
        out.append(tuple(stack.pop()))
      if stack:
        stack[-1][1] -= e["dur"]  # e lies inside the innermost open event
      stack.append([e, float(e["dur"])])
    out.extend(tuple(entry) for entry in reversed(stack))
  return out


def _xla_threads(events: list[dict]) -> set[tuple[int, int]]:
  """(pid, tid) of XLA:CPU's op threads: its intra-op pools, and the client thread that runs
  small programs."""
  return {(e["pid"], e["tid"]) for e in events if e.get("ph") == "M"
          and e.get("name") == "thread_name" and e["args"]["name"].startswith("tf_XLA")}


def summarize_trace(events: list[dict], names: dict[str, str], matmuls: set[str], calls: int,
                    devices: int) -> dict[str, float]:
  """ms per call and device of each kind, from a Chrome-format trace's events."""
  xla = _xla_threads(events)
  ms = collections.Counter()
  for e, self_us in self_times(events):
    if (e["pid"], e["tid"]) not in xla:
      continue
    kind = classify(e["name"], names.get(e["name"], ""), e["name"] in matmuls)
    if kind is not None:
      ms[kind] += self_us / 1e3 / calls / devices
  out = {k: ms[k] for k in KINDS}
  out.update({kind: sum(ms[k] for k in parts) for kind, parts in _PARTS.items()})
  out["total"] = sum(out[k] for k in KINDS if not k.startswith(" "))
  return out


_CONTAINERS = ("while", "conditional", "call")  # control flow: their bodies' ops are the work


def concurrency(events: list[dict], calls: int) -> dict[str, float]:
  """ms per call, between the trace's first XLA op and its last, during which no op ran on any
  of XLA's threads and during which exactly one did (on 2 cores: one core idle). A thread waiting
  at a rendezvous (inside a collective's event) runs no op; executor bookkeeping and control-flow
  containers are not ops; a thread's nested events count once."""
  xla = _xla_threads(events)
  per_thread = collections.defaultdict(list)  # (time, Δops, Δwaits)
  for e in events:
    if e.get("ph") != "X" or (e["pid"], e["tid"]) not in xla:
      continue
    kind = classify(e["name"], "", False)
    if kind is None or e["name"].startswith(_CONTAINERS):
      continue
    waiting = kind == "  waiting for the other device"
    per_thread[(e["pid"], e["tid"])] += [(e["ts"], not waiting, waiting),
                                         (e["ts"] + e["dur"], -(not waiting), -waiting)]
  edges = []  # (time, ±1): a thread starts or stops running an op
  for thread_edges in per_thread.values():
    ops = waits = 0
    was_busy = False
    for t, d_ops, d_waits in sorted(thread_edges):
      ops, waits = ops + d_ops, waits + d_waits
      if (ops > 0 and waits == 0) != was_busy:
        was_busy = not was_busy
        edges.append((t, 1 if was_busy else -1))
  edges.sort()
  out, running = {"no op running": 0.0, "one op running": 0.0}, 0
  for (t, step), (t_next, _) in zip(edges, edges[1:]):
    running += step
    if running <= 1:
      out["no op running" if running == 0 else "one op running"] += (t_next - t) / 1e3 / calls
  return out


def jax_breakdown(fn, compiled, calls: int, devices: int) -> dict[str, float]:
  """Runs `fn` (which calls `compiled` and waits for it) `calls` times under the profiler."""
  import jax
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      t0 = time.perf_counter()
      for _ in range(calls):
        fn()
      wall_ms = (time.perf_counter() - t0) * 1e3 / calls
    paths = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
      raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {d}")
    with gzip.open(paths[0]) as f:
      events = json.load(f)["traceEvents"]
  return dict(summarize_trace(events, *parse_hlo(compiled.as_text()), calls, devices),
              wall=wall_ms, **concurrency(events, calls))


def classify_torch(op: str) -> str:
  if "scaled_dot_product" in op:
    return "attention core"
  if op in ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm", "aten::baddbmm"):
    return "matmuls outside attention"
  return "other"


def torch_breakdown(fn, calls: int) -> dict[str, float]:
  """Self CPU ms per call of transformers' aten ops, by kind, over `calls` calls of `fn`."""
  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    t0 = time.perf_counter()
    for _ in range(calls):
      fn()
    wall_ms = (time.perf_counter() - t0) * 1e3 / calls
  ms = collections.Counter()
  for avg in prof.key_averages():
    ms[classify_torch(avg.key)] += avg.self_cpu_time_total / 1e3 / calls
  out = {k: ms[k] for k in KINDS if not k.startswith(" ")}
  out["total"] = sum(out.values())
  out["wall"] = wall_ms
  return out


def format_table(ours: dict[str, dict], torch: dict[str, dict]) -> str:
  """Markdown: a row per kind, ms per call, for each phase (train, decode) and side."""
  phases = list(ours)
  head = "| ms per call | " + " | ".join(f"ours {p} | torch {p}" for p in phases) + " |"
  rows = [head, "|---|" + "---|" * (2 * len(phases))]
  labels = {"total": "op time, all kinds", "wall": "wall time of a profiled call",
            "no op running": "&nbsp;&nbsp;of it with no op running",
            "one op running": "&nbsp;&nbsp;of it with exactly one op running"}
  extra = tuple(k for k in labels if k in ours[phases[0]])  # older JSONs lack the last two
  for kind in KINDS + extra:
    cells = []
    for p in phases:
      cells.append(f"{ours[p][kind]:.1f}")
      cells.append(f"{torch[p][kind]:.1f}" if kind in torch[p] else "")
    rows.append(f"| {labels.get(kind, kind)} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


if __name__ == "__main__":  # run as a command, it did nothing at all, even for --help
  import sys
  sys.stderr.write("error: experiments.profile_breakdown is a library module, not a command; it is "
                   "used by python -m experiments.bench_peer --breakdown=N\n")
  sys.exit(2)
