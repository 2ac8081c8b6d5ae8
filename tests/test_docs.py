"""The docs as published: the Python examples in README.md and docs/results/balance.md run and
do what the text says, and every `python -m experiments.X ...` command in README.md and docs/
names flags and config keys that exist, with values they accept; every relative link between them
resolves to a file and heading.

Examples and commands are read from the Markdown files themselves, so an edit to the docs (or a
renamed flag or config field) is tested as written. (docs/checkpoints.md's example runs at tiny
size in tests/test_hf_checkpoint.py; docs/api.md is generated and checked by
tests/test_make_api_docs.py.)
"""

import contextlib
import io
import json
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))

# Runs each entry point as a script up to its flag parsing: cli.run parses and validates the
# flags (and the --config.* overrides, at definition), then returns instead of running main.
# One process imports the library once and forks a child per command (a fresh interpreter per
# command spent ~1.5-2.5 s importing the same modules, ~100 CPU-s over the docs' commands); each
# child runs its entry module from scratch, so its flags are defined and parsed as in a real run.
_PARSE_EVERY = """
import json, os, sys, traceback
import experiments.cli, pr2_jax.rl.config, pr2_jax.rl.loop  # noqa: F401 - shared by the children

def parse_only(module, argv):
  import runpy
  from experiments import cli
  sys.argv = ["prog", *argv]
  def run(main, positional=False):  # parses as cli.run does, then stops before main
    rest = cli.parse_flags(sys.argv)
    if rest[1:] and not positional:
      raise ValueError(f"unexpected argument(s) {rest[1:]}")
  cli.run = run
  names = runpy.run_module("experiments." + module, run_name="__main__")
  config = names.get("_CONFIG")
  if config is not None and "rl" in config.value:  # an RL experiment (not a model-only config)
    from pr2_jax.rl.config import ExperimentConfig
    try:
      ExperimentConfig.from_dict(cli.config_value(config).to_dict())
    except ValueError as e:
      if "is not a directory" not in str(e):  # the docs' checkpoint paths are placeholders
        raise

results = []
for module, argv in json.load(sys.stdin):
  read_end, write_end = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.close(read_end)
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    code = 0
    try:
      parse_only(module, argv)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
    except BaseException:
      traceback.print_exc()
      code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  os.close(write_end)
  with os.fdopen(read_end, errors="replace") as f:
    output = f.read()
  results.append([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), output[-2000:]])
print(json.dumps(results))
"""


def _python_blocks(relpath: str) -> list[str]:
  """The ```python blocks of a Markdown file, dedented (a block may sit in a list item)."""
  text = (ROOT / relpath).read_text()
  found = re.findall(r"^( *)```python\n(.*?)^\1```", text, re.S | re.M)
  return [textwrap.dedent(code) for _, code in found]


def _run(code: str) -> tuple[dict, str]:
  """The names the example defines and what it prints."""
  names, printed = {}, io.StringIO()
  with contextlib.redirect_stdout(printed):
    exec(code, names)  # noqa: S102 - our own docs
  return names, printed.getvalue()


def test_readme_has_the_examples_tested_here():
  assert len(_python_blocks("README.md")) == 3, "README.md's examples changed: test each one"


def test_readme_example_replays_the_same_logits():
  names, _ = _run(_python_blocks("README.md")[0])
  out, again, config = names["out"], names["again"], names["config"]
  assert out.logits.shape == (2, 8, config.vocab_size)
  assert out.routes.shape == (2, 8, config.num_layers, config.top_k)
  # "replay: same logits": replaying the recorded routes reproduces the forward pass
  np.testing.assert_array_equal(np.asarray(again.logits), np.asarray(out.logits))
  np.testing.assert_array_equal(np.asarray(again.routes), np.asarray(out.routes))
  # The decode lines: the prefill's last logits are the forward's, and the cached step's are
  # those of a forward over the 9 tokens (no cache) at the last position.
  pre, step, model, params = names["pre"], names["step"], names["model"], names["params"]
  np.testing.assert_allclose(pre.logits[:, 0], out.logits[:, -1], rtol=1e-5, atol=1e-5)
  nine = np.concatenate([np.asarray(names["tokens"]), np.asarray(names["next_token"])], 1)
  full = model.apply({"params": params}, nine)
  assert step.logits.shape == (2, 1, config.vocab_size)
  np.testing.assert_allclose(step.logits[:, 0], full.logits[:, -1], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(step.routes[:, 0]), np.asarray(full.routes[:, -1]))


def test_readme_pr2_example_prints_what_the_text_says():
  _, printed = _run(_python_blocks("README.md")[1])
  # The line after the example: "prints `top-2 agreement with the moved router: R3 ..., PR2 ...`"
  claimed = re.search(r"```\nprints `(.*?)`", (ROOT / "README.md").read_text()).group(1)
  number = lambda text, label: float(re.search(label + r" (\d\.\d+)", text).group(1))  # noqa: E731
  for label in ("R3", "PR2"):  # within a few of the 1,024 choices (another CPU may round apart)
    assert abs(number(printed, label) - number(claimed, label)) <= 0.005, (printed, claimed)
  assert number(printed, "PR2") > number(printed, "R3") + 0.1  # the predictor recovers the drift


def test_readme_balance_example_prints_what_the_text_says():
  _, printed = _run(_python_blocks("README.md")[2])
  claimed = re.search(r"```\nprints `(max / mean device load.*?)`",
                      (ROOT / "README.md").read_text()).group(1)
  assert printed.strip() == claimed  # numpy's seeded routes and a deterministic planner


def test_balance_doc_example_prints_the_numbers_in_the_text():
  path = "docs/results/balance.md"
  blocks = _python_blocks(path)
  assert len(blocks) == 1, f"{path}'s Python examples changed: test each one here"
  _, printed = _run(blocks[0])
  got = [float(line.rsplit(" ", 1)[1]) for line in printed.splitlines()]
  # The sentence after the example: "prints 1.267 (stickiness 0), 1.143 (...), ..."
  sentence = re.search(r"```\n\n\s*prints (.*?)\. ", (ROOT / path).read_text(), re.S).group(1)
  claimed = [float(x) for x in re.findall(r"(\d+\.\d+) \(", sentence)]
  assert len(claimed) == 4 and got == claimed, (got, sentence)


def _commands() -> list[tuple[str, str, tuple[str, ...]]]:
  """(file, entry point, args) of every distinct `python -m experiments.X` command in the docs:
  continuation lines joined, comments dropped, the multi-host examples' placeholders filled."""
  found = {}
  for relpath in DOCS:
    text = (ROOT / relpath).read_text()
    for m in re.finditer(r"python -m experiments\.(\w+)((?:[^\n`&;|\\]|\\\n)*)", text):
      raw = re.sub(r"#.*", "", m.group(2).replace("\\\n", " "))
      raw = raw.replace("$i", "0").replace("=N ", "=2 ").replace("=RANK", "=0")
      found.setdefault((m.group(1), tuple(shlex.split(raw))), relpath)
  return [(relpath, module, args) for (module, args), relpath in found.items()]


def _heading_slug(heading: str) -> str:
  """The anchor GitHub gives a Markdown heading: lower case, links and punctuation dropped,
  spaces as hyphens."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _without_code_blocks(text: str) -> str:
  return re.sub(r"```.*?```", "", text, flags=re.S)


def test_heading_slug_matches_githubs():
  assert _heading_slug("Fifteenth round: jemalloc keeps XLA's buffers (2026-12-06, 08:35 UTC)") \
      == "fifteenth-round-jemalloc-keeps-xlas-buffers-2026-12-06-0835-utc"
  assert _heading_slug("Rollout decode: float32 against bfloat16 (`bench_rollout.py`)") \
      == "rollout-decode-float32-against-bfloat16-bench_rolloutpy"


def test_every_relative_link_in_the_docs_resolves():
  """README.md and docs/ link each other by path and heading: a moved section or renamed
  heading must not leave a dead link (web links are not checked: no network here)."""
  dead, checked = [], 0
  for relpath in DOCS:
    path = ROOT / relpath
    for m in re.finditer(r"\]\(([^)\s]+)\)", _without_code_blocks(path.read_text())):
      target = m.group(1)
      if re.match(r"[a-z]+:", target):
        continue
      checked += 1
      file, _, anchor = target.partition("#")
      dest = (path.parent / file).resolve() if file else path
      if not dest.exists():
        dead.append(f"{relpath}: ({target}): no such file")
      elif anchor and dest.suffix == ".md" and anchor not in {
          _heading_slug(h) for h in re.findall(r"^#+ (.*)$",
                                               _without_code_blocks(dest.read_text()), re.M)}:
        dead.append(f"{relpath}: ({target}): no such heading in {file or relpath}")
  assert checked > 50, checked  # the pattern still finds the docs' links
  assert not dead, "\n".join(dead)


def test_the_docs_have_commands():
  files = {relpath for relpath, _, _ in _commands()}
  assert {"README.md", "docs/benchmarks.md", "docs/scaling.md"} <= files


def test_every_doc_command_parses():
  commands = _commands()
  proc = subprocess.run([sys.executable, "-c", _PARSE_EVERY], cwd=ROOT, capture_output=True,
                        text=True, timeout=600,
                        input=json.dumps([[module, list(args)] for _, module, args in commands]))
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.splitlines()[-1])
  assert len(results) == len(commands)
  failed = [f"{relpath}: python -m experiments.{module} {' '.join(args)}\n{output}"
            for (relpath, module, args), (code, output) in zip(commands, results) if code != 0]
  assert not failed, f"{len(failed)} of {len(commands)} commands do not parse:\n\n" + \
      "\n\n".join(failed)


def test_real_checkpoint_doc_says_what_a_moved_checkpoint_does():
  # The page said the checkpoint directory's path was not part of a run's identity, "so a moved
  # checkpoint still resumes"; the resume compares it and refuses (pr2_jax/rl/records.py).
  from pr2_jax.rl import records
  from pr2_jax.rl.config import ExperimentConfig
  config = ExperimentConfig.from_dict({"model": {}, "sft": {}, "rl": {}, "pr2": {}})
  text = " ".join((ROOT / "docs/real_checkpoint.md").read_text().split())
  assert "hf_checkpoint" in records.run_identity(config)
  assert "The directory's path is part of that identity too" in text
  assert "a moved checkpoint still resumes" not in text


def _code_row_keys(replay_mode: str, balance_mode: str, eval_step: bool) -> set[str]:
  """The keys of an rl row as the code builds them, from small fake inputs (no model, no run):
  `learner.minibatch_metrics` of κ = 2 mini-steps -> `Engine._summarise` -> the balancer's
  `summary`, plus what `loop.Engine.rl_step` and `loop.run` add themselves."""
  import jax.numpy as jnp
  from pr2_jax.rl import balancing, learner, losses, metrics
  from pr2_jax.rl.config import PR2_MODES
  from pr2_jax.rl.loop import Engine
  b, t, num_layers, k, e = 2, 3, 2, 2, 4
  logp, mask = jnp.full((b, t), -1.0), jnp.ones((b, t))
  routes = jnp.tile(jnp.arange(k), (b, t, num_layers, 1))
  probs = jnp.full((b, t, num_layers, e), 1.0 / e)
  stats = {"loss": jnp.float32(0.0), "entropy": jnp.float32(1.0), "dropped": jnp.int32(0),
           "aux_loss": jnp.float32(1.0),
           "loss_sums": losses.dapo_loss(logp, logp, jnp.ones(b), mask)[1]["sums"],
           "mismatch": metrics.mismatch_sums(logp, logp, mask),
           "routing": metrics.routing_sums(routes, routes, probs, mask)}
  if replay_mode in ("r2", "pr2_r2"):  # learner.micro_step's condition
    stats["routing_replayed"] = stats["routing"]
  if replay_mode in PR2_MODES:  # learner.predictor_step's keys
    stats["pred"] = {"loss_per_layer": jnp.zeros(num_layers),
                     "topk_acc_per_layer": jnp.ones(num_layers),
                     "bias_abs_sum": jnp.float32(0.0), "logit_abs_sum": jnp.float32(1.0)}
  per_mini = [{**learner.minibatch_metrics(stats, {"w": jnp.ones(3)}), "skipped": jnp.int32(0)}
              for _ in range(2)]
  row = Engine._summarise(per_mini, np.zeros(4, np.float32), np.ones(4, np.float32))
  row.pop("skipped_flags")  # loop.run pops it
  shape = balancing.BalanceShape(num_experts=e, num_devices=1, slots=e + 1, token_shards=1)
  balancer = balancing.StepBalancer(shape, balance_mode, replay_mode, "bucket", 2, 0.0, 8, (8, 8))
  layouts = np.tile(np.array([0, 1, 2, 3, 0]), (2, num_layers, 1, 1))  # [M, L, D, S]
  phase = balancing.PhasePlan(needed=3, needed_static=4, capacity=4,
                              imbalance_ML={m: np.ones((2, num_layers)) for m in balancing.MODES},
                              layouts_MLDS=layouts, planner_ms=1.0)
  row.update(balancer.summary(phase, phase, 1.0, 0.0, balancing.StepState())[0])
  row.update(learner.mismatch_row(stats["mismatch"], "old_"))  # Engine.rl_step: the old pass's
  if replay_mode in PR2_MODES:  # Engine.rl_step
    row["feature_cache_bytes"] = 0
  row.update(phase="rl", step=1, elapsed_s=0.0)  # loop.run
  if eval_step:
    row["eval_reward"] = 0.0
  return set(row)


def test_metrics_doc_lists_exactly_the_keys_the_code_writes():
  """docs/metrics.md's tables against the rows the code builds, in every replay and balance mode:
  each key of a row is documented, and each key the doc says a row carries is there (so every
  documented key is written by some setting). tests/test_loop.py checks a real run's rows."""
  from _metrics_doc import documented, expected_keys
  from pr2_jax.rl.config import BALANCE_MODES, REPLAY_MODES
  seen = set()
  for replay_mode in REPLAY_MODES:
    for balance_mode in BALANCE_MODES:
      for eval_step in (False, True):
        got = _code_row_keys(replay_mode, balance_mode, eval_step)
        doc = expected_keys("rl", replay_mode, balance_mode, eval_step)
        assert got == doc, (replay_mode, balance_mode, eval_step, "undocumented:", got - doc,
                            "documented, not written:", doc - got)
        seen |= got
  # The warm-up's row: supervised.make_train_step's metrics (traced, not compiled) and loop.run's.
  from pr2_jax.config import ModelConfig
  from pr2_jax.models.transformer import MoETransformer
  from pr2_jax.parallel.mesh import make_mesh
  from pr2_jax.train import supervised
  from pr2_jax.train.state import create_train_state, make_optimizer
  import jax
  mesh = make_mesh(1, 1, devices=jax.devices()[:1])
  model = MoETransformer(ModelConfig(vocab_size=24, num_layers=1, d_model=16, num_heads=1,
                                     num_kv_heads=1, head_dim=16, expert_d_ff=16, num_experts=4,
                                     top_k=2), mesh)
  tx = make_optimizer(1e-3, warmup_steps=1, total_steps=2)
  state, shardings = create_train_state(model, tx, jax.random.key(0), mesh)
  batch = {"tokens": np.zeros((2, 8), np.int32), "loss_mask": np.ones((2, 8), np.float32)}
  _, sft_metrics = jax.eval_shape(supervised.make_train_step(model, tx, mesh, shardings), state,
                                  batch)
  sft = set(sft_metrics) | {"phase", "step"}  # Engine.warmup's row
  assert sft == expected_keys("sft"), sft ^ expected_keys("sft")
  assert expected_keys("sft_eval") == {"phase", "step", "eval_reward"}  # loop.run's literal row
  assert seen | sft | {"eval_reward"} == set(documented())
  # The prose's key counts for its two example runs (they went stale as keys were added).
  text = (ROOT / "docs" / "metrics.md").read_text()
  counts = re.search(r"Its rl rows have (\d+) keys \((\d+) with `eval_reward`\)\. The second "
                     r"is\s+pr2_r2 with foresight on 2 expert devices\. Its rows have (\d+) and "
                     r"(\d+) keys", text)
  assert counts, "docs/metrics.md no longer states its example rows' key counts"
  assert [int(c) for c in counts.groups()] == [
      len(expected_keys("rl", mode, balance, eval_step)) for mode, balance in
      (("r3", "none"), ("pr2_r2", "foresight")) for eval_step in (False, True)]
