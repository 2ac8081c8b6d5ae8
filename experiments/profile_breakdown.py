"""Where a step's time goes: per-op profiler times summed by kind, ours and transformers'.

    python -m experiments.bench_peer --breakdown=3   # the benchmark, then this table for both

Ours: a `jax.profiler` trace of the compiled function. Each XLA:CPU op event is
named by its HLO instruction, whose `op_name` metadata in the compiled HLO text
names the model code it came from (`.../layers_2/self_attn/...`). Loop and
branch ops (`while`, `conditional`) are skipped: their bodies' ops are events
of their own. Every JAX CPU device runs its ops on its own threads, so the
figures are op time per device and call: the sum over the XLA threads divided
by the devices. Waiting for the other device (`Rendezvous`, `Wait`) is a kind
of its own.

transformers: `torch.profiler`'s self CPU time of each aten op, per call. The
intra-op threads work inside those ops, so this is wall time on the calling
thread; its fused attention kernel (`sdpa`) holds the score and value matmuls,
softmax and masking together.

These are diagnostics, not benchmark figures: profiling slows both sides a
little, so the totals sit above the benchmark's medians.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

# The table's rows. The three unindented kinds add up to the total, for both sides; the indented
# ones (ours only) split the kind above them.
KINDS = ("matmuls outside attention",
         "attention core", "  its two matmuls", "  softmax, mask, RoPE, layouts",
         "other", "  MoE routing, dispatch, combine", "  collectives",
         "  waiting for the other device", "  norms", "  loss, optimizer, the rest")
_PARTS = {"attention core": KINDS[2:4], "other": KINDS[5:]}
_CONTAINERS = ("while", "conditional", "call", "ThunkExecutor", "ThreadpoolListener", "end: ")
_COLLECTIVE = re.compile(r"(all[-_]gather|reduce[-_]scatter|all[-_]reduce|all[-_]to[-_]all|"
                         r"collective[-_]permute|psum)")
_METADATA = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name=\"([^\"]*)\"")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its `op_name` metadata, from a compiled module's text. A fusion
  that holds a matmul gets its matmul's `op_name`: XLA names a fusion after its root, which is
  often the reduction or the elementwise op the matmul feeds."""
  names, dot_of, computation = {}, {}, None
  lines = hlo_text.splitlines()
  for line in lines:
    start = _COMPUTATION.match(line)
    if start:
      computation = start[1]
    m = _METADATA.match(line)
    if m:
      names[m[1]] = m[2]
      if " dot(" in line and computation is not None:
        dot_of.setdefault(computation, m[2])
  for line in lines:
    m, calls = _METADATA.match(line), _CALLS.search(line)
    if m and calls and calls[1] in dot_of:
      names[m[1]] = dot_of[calls[1]]
  return names


def classify(event_name: str, op_name: str) -> str | None:
  """The kind of one XLA op event (None: a loop or branch, whose body ops count instead)."""
  if event_name.startswith(_CONTAINERS):
    return None
  if event_name.startswith(("Rendezvous", "Wait")):
    return "  waiting for the other device"
  if _COLLECTIVE.match(event_name):
    return "  collectives"
  in_attention = "self_attn/" in op_name and "_proj/" not in op_name and "_norm/" not in op_name
  if "dot_general" in op_name or event_name.startswith("dot"):
    return "  its two matmuls" if in_attention else "matmuls outside attention"
  if in_attention:
    return "  softmax, mask, RoPE, layouts"
  if "/mlp/" in op_name:
    return "  MoE routing, dispatch, combine"
  if "norm" in op_name:  # the layer norms and the attention's q/k norms
    return "  norms"
  return "  loss, optimizer, the rest"


def summarize_trace(events: list[dict], names: dict[str, str], calls: int,
                    devices: int) -> dict[str, float]:
  """ms per call and device of each kind, from a Chrome-format trace's events."""
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  ms = collections.Counter()
  for e in events:
    # XLA:CPU's op threads: its intra-op pools, and the client thread that runs small programs.
    if e.get("ph") != "X" or not threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA"):
      continue
    kind = classify(e["name"], names.get(e["name"], ""))
    if kind is not None:
      ms[kind] += e["dur"] / 1e3 / calls / devices
  out = {k: ms[k] for k in KINDS}
  out.update({kind: sum(ms[k] for k in parts) for kind, parts in _PARTS.items()})
  out["total"] = sum(out[k] for k in KINDS if not k.startswith(" "))
  return out


def jax_breakdown(fn, compiled, calls: int, devices: int) -> dict[str, float]:
  """Runs `fn` (which calls `compiled` and waits for it) `calls` times under the profiler."""
  import jax
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(calls):
        fn()
    paths = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
      raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {d}")
    with gzip.open(paths[0]) as f:
      events = json.load(f)["traceEvents"]
  return summarize_trace(events, op_names(compiled.as_text()), calls, devices)


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
    for _ in range(calls):
      fn()
  ms = collections.Counter()
  for avg in prof.key_averages():
    ms[classify_torch(avg.key)] += avg.self_cpu_time_total / 1e3 / calls
  out = {k: ms[k] for k in KINDS if not k.startswith(" ")}
  out["total"] = sum(out.values())
  return out


def format_table(ours: dict[str, dict], torch: dict[str, dict]) -> str:
  """Markdown: a row per kind, ms per call, for each phase (train, decode) and side."""
  phases = list(ours)
  head = "| ms per call | " + " | ".join(f"ours {p} | torch {p}" for p in phases) + " |"
  rows = [head, "|---|" + "---|" * (2 * len(phases))]
  for kind in KINDS + ("total",):
    cells = []
    for p in phases:
      cells.append(f"{ours[p][kind]:.1f}")
      cells.append(f"{torch[p][kind]:.1f}" if kind in torch[p] else "")
    rows.append(f"| {kind} | " + " | ".join(cells) + " |")
  return "\n".join(rows)
