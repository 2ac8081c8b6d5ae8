"""Tests for experiments/common.py's shell helpers: the progress log's throttle and ETA, the
ineffective-flag, learning-rate and idle-predictor warnings, source and machine records, the
metrics writer, the run summary, and entry-point errors about devices and workdirs. (Flag and
config-file plumbing: test_cli.)"""

import json
import logging
import os
import time

import pytest

from experiments import common


def _logged(caplog):
  return [r.getMessage() for r in caplog.records if "step" in r.getMessage()]


def test_progress_logger_throttles_and_computes_the_eta(caplog):
  now = [0.0]
  log = common.progress_logger("rl", every_s=10.0, clock=lambda: now[0])
  with caplog.at_level(logging.INFO, logger="absl"):
    log(1, 100, None)             # first: compiling, no ETA, always shown
    for step, t in [(2, 1.0), (3, 2.0), (11, 10.0), (12, 11.0), (22, 21.0)]:
      now[0] = t
      log(step, 100, 0.5)
    now[0] = 21.5
    log(100, 100, 0.5)            # the last step: always shown
  assert _logged(caplog) == [
      "rl step 1/100  (includes compiling; ETA from the next report)",
      # 10 s after the first report, not before; then 10 s after that one.
      "rl step 11/100  0.50s/step  ETA 0m44s",   # 89 steps x 0.5 s
      "rl step 22/100  0.50s/step  ETA 0m39s",
      "rl step 100/100  0.50s/step  ETA 0m00s"]


def test_progress_logger_shows_minutes_and_every_report_with_every_s_0(caplog):
  log = common.progress_logger("warm-up", every_s=0.0)
  with caplog.at_level(logging.INFO, logger="absl"):
    log(25, 300, 1.5)
    log(50, 300, 1.5)
  assert _logged(caplog) == ["warm-up step 25/300  1.50s/step  ETA 6m52s",
                             "warm-up step 50/300  1.50s/step  ETA 6m15s"]


def test_pr2_overrides_without_a_predictor_are_named():
  argv = ["main", "--config=configs/tiny.py", "--config.pr2.lr_mult=5", "--config.rl.seed=1",
          "--config.pr2.loss=l2"]
  assert common.ineffective_overrides(argv, "r3") == ["--config.pr2.lr_mult=5",
                                                      "--config.pr2.loss=l2"]
  assert common.ineffective_overrides(argv, "none") == common.ineffective_overrides(argv, "r2")
  assert common.ineffective_overrides(argv, "pr2") == []
  assert common.ineffective_overrides(argv, "pr2_r2") == []


def test_source_revision_names_the_checkout_and_its_state(tmp_path):
  import subprocess
  repo = tmp_path / "repo"
  repo.mkdir()
  def git(*args):
    return subprocess.run(("git", "-C", str(repo)) + args, check=True, capture_output=True,
                          text=True).stdout.strip()
  git("init", "-q")
  (repo / "setup.py").write_text("one\n")
  git("add", "setup.py")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
  head = git("rev-parse", "HEAD")
  clean = {"git_commit": head, "git_dirty": False, "git_changed": []}
  assert common.source_revision(str(repo)) == clean
  # Docs and recorded results are not the measured code; a new module is.
  (repo / "notes.txt").write_text("not code\n")
  (repo / "experiments" / "results").mkdir(parents=True)
  (repo / "experiments" / "results" / "r.json").write_text("{}\n")
  assert common.source_revision(str(repo)) == clean
  (repo / "pr2_jax").mkdir()
  (repo / "pr2_jax" / "new.py").write_text("x = 1\n")
  assert common.source_revision(str(repo)) == {"git_commit": head, "git_dirty": True,
                                               "git_changed": ["pr2_jax/"]}
  (repo / "setup.py").write_text("two\n")  # a tracked code file edited
  assert common.source_revision(str(repo))["git_changed"] == ["pr2_jax/", "setup.py"]
  assert common.source_revision(str(tmp_path / "not_a_repo")) == {}


def test_machine_info_records_the_code_and_the_machine():
  import subprocess
  info = common.machine_info(mesh={"data": 1, "expert": 1}, cpus_usable=1)
  head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                        cwd=common.__file__.rsplit("/experiments/", 1)[0])
  if head.returncode == 0:  # CI runs a clone; an exported tree has no commit to name
    assert info["git_commit"] == head.stdout.strip()
  assert isinstance(info["cpu_model"], str)  # may be empty where the OS does not say
  assert info["cpu_count"] >= 1 and info["device_count"] >= 1
  assert info["mesh"] == {"data": 1, "expert": 1} and info["cpus_usable"] == 1  # extra wins
  assert info["started_utc"].endswith("Z")
  assert info["glibc_tunables"] == os.environ.get("GLIBC_TUNABLES", "")  # huge pages or not
  assert info["ld_preload"] == os.environ.get("LD_PRELOAD", "")  # jemalloc or not
  assert info["allocator"] in ("jemalloc", "tcmalloc", "mimalloc", "glibc")
  assert info["transparent_hugepage"] in ("always", "madvise", "never", "")


def test_a_large_predictor_learning_rate_is_named():
  from pr2_jax.rl.config import ExperimentConfig
  base = {"model": {}, "sft": {}, "rl": {"learning_rate": 1e-3, "replay_mode": "pr2"}}
  large = ExperimentConfig.from_dict({**base, "pr2": {"lr_mult": 1e3}})
  assert common.predictor_lr_warning(large) == (
      "PR2's predictor learning rate pr2.lr_mult * rl.learning_rate = 1 is large for Adam "
      "(~1e-3 suits, as configs/tiny.py); watch bias_logit_ratio in the metrics")
  assert common.predictor_lr_warning(ExperimentConfig.from_dict(
      {**base, "pr2": {"lr_mult": 1.0}})) is None
  r3 = ExperimentConfig.from_dict({**base, "rl": {**base["rl"], "replay_mode": "r3"}})
  assert common.predictor_lr_warning(r3) is None  # no predictor


def test_a_predictor_that_never_trains_is_named():
  from pr2_jax.rl.config import ExperimentConfig
  config = lambda **rl: ExperimentConfig.from_dict({"model": {}, "sft": {}, "pr2": {}, "rl": rl})
  for mode, same in (("pr2", "r3"), ("pr2_r2", "r2")):
    assert common.predictor_idle_warning(config(replay_mode=mode, off_policy_k=1)) == (
        f"rl.replay_mode='{mode}' with rl.off_policy_k=1 never trains the predictor (it learns "
        f"from the second mini-step on): W_p stays zero and the run is {same.upper()} with extra "
        f"work; use off_policy_k >= 2 (or replay_mode='{same}')")
    assert common.predictor_idle_warning(config(replay_mode=mode, off_policy_k=2)) is None
  assert common.predictor_idle_warning(config(replay_mode="r3", off_policy_k=1)) is None


def test_foresight_without_replay_is_named():
  from pr2_jax.rl.config import ExperimentConfig
  config = lambda **rl: ExperimentConfig.from_dict({"model": {}, "sft": {}, "pr2": {}, "rl": rl})
  assert "places nothing with rl.replay_mode='none'" in common.balance_mode_warning(
      config(balance_mode="foresight", replay_mode="none"))
  assert common.balance_mode_warning(config(balance_mode="foresight", replay_mode="r3")) is None
  assert common.balance_mode_warning(config(balance_mode="eplb_step", replay_mode="none")) is None


def test_main_help_lists_the_config_and_device_flags():
  # They are defined in cli.py and common.py; --help used to list only --fresh and --workdir,
  # so a user had to know to ask for --helpfull to learn of --config or --cpu_devices.
  import _cli
  proc = _cli.run("experiments.main", "--help")
  assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  listed = {line.split(":")[0].strip() for line in proc.stdout.splitlines()
            if line.startswith("  --")}
  assert {"--config", "--cpu_devices", "--coordinator_address", "--num_processes",
          "--process_id", "--[no]distributed_auto", "--workdir", "--[no]fresh"} <= listed
  assert "--config.FIELD=VALUE" in proc.stdout


def test_jax_start_up_info_is_not_logged():
  # Without JAX_PLATFORMS, JAX's backend search logs at INFO through its own logger "Unable to
  # initialize backend 'tpu': ... libtpu.so: cannot open shared object file", which topped
  # every CPU run's log like an error. A mesh that cannot be built fails right after JAX starts.
  import _cli
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = _cli.run("experiments.main", "--config.mesh_expert=65537", env=env)
  line = _cli.one_error_line(proc)
  assert line.startswith("error: bad config: --config.mesh_expert=65537 must divide the "), line
  assert proc.stderr.splitlines() == [line]  # nothing else: no INFO chatter of JAX's


@pytest.mark.parametrize("workdir, message", [
    ("{file}", "error: --workdir={file} is a file; give a directory"),
    # Was a NotADirectoryError traceback from os.makedirs.
    ("{file}/run", "error: --workdir={file}/run cannot be created: {file} is a file"),
])
def test_a_workdir_that_cannot_be_a_directory_is_one_error_line(tmp_path, workdir, message):
  import _cli
  (tmp_path / "file").write_text("")
  fill = lambda text: text.format(file=tmp_path / "file")  # noqa: E731
  start = time.monotonic()
  proc = _cli.run("experiments.main", f"--workdir={fill(workdir)}")
  assert _cli.one_error_line(proc) == fill(message)
  assert time.monotonic() - start < 30  # checked before JAX starts, not after the set-up


def test_metrics_writer_names_a_workdir_it_cannot_create(tmp_path, capsys):
  (tmp_path / "file").write_text("")
  with pytest.raises(SystemExit) as e:
    common.MetricsWriter(str(tmp_path / "file" / "run"))
  assert e.value.code == 2
  assert capsys.readouterr().err == (f"error: --workdir={tmp_path}/file/run cannot be created: "
                                     f"{tmp_path}/file is a file\n")
  # Orbax globs '[...]' in a checkpoint path (its steps did not read back): refused before the
  # workdir is made, so the refusal leaves nothing behind.
  with pytest.raises(SystemExit) as e:
    common.MetricsWriter(str(tmp_path / "exp[1]"))
  assert e.value.code == 2 and "error: --workdir: checkpoint directory" in capsys.readouterr().err
  assert not (tmp_path / "exp[1]").exists()


@pytest.mark.parametrize("argv, message", [
    # "or auto_detect" named DistributedConfig's field: the flag is --distributed_auto.
    (["--num_processes=2"], "error: --num_processes=2 needs a --coordinator_address (host:port "
     "of process 0) or --distributed_auto"),
    (["--num_processes=2", "--process_id=5", "--coordinator_address=localhost:1"],
     "error: --process_id=5 must be below --num_processes=2"),
])
def test_multi_host_flag_errors_name_the_flags(tmp_path, argv, message):
  import _cli
  proc = _cli.run("experiments.main", f"--workdir={tmp_path}/run", *argv)
  assert _cli.one_error_line(proc) == message
  assert not (tmp_path / "run").exists()


def test_a_resumed_runs_summary_still_shows_the_reward_before_rl(tmp_path, capsys):
  rows = [{"phase": "sft", "step": 100, "loss": 0.3}, {"phase": "sft_eval", "step": 0,
          "eval_reward": 0.2477}, {"phase": "rl", "step": 1, "reward_mean": 0.3}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  # A run resumed mid-way (loop.run has no warm-up reward then): the warm-up's row is read back.
  final = {"phase": "rl", "step": 2, "reward_mean": 0.25, "eval_reward": 0.388}
  common.print_summary({"final": final, "warmup_eval_reward": None, "resumed_from": 1},
                       str(tmp_path))
  lines = capsys.readouterr().out.splitlines()
  assert lines[1:5] == ["== summary ==", "eval reward before RL:     0.248",
                        "eval reward after RL:      0.388", "train reward (last step):  0.250"]
  # Resumed when already complete: the last RL row too.
  common.print_summary({"final": {}, "warmup_eval_reward": None, "resumed_from": 1},
                       str(tmp_path))
  lines = capsys.readouterr().out.splitlines()
  assert lines[2:5] == ["already complete at RL step 1: nothing to run (raise "
                        "--config.rl.num_steps to continue, or use another --workdir)",
                        "eval reward before RL:     0.248", "train reward (last step):  0.300"]


def test_build_mesh_takes_mesh_data_and_fills_the_rest():
  """mesh_data = 0 takes the devices the expert axis leaves; a given mesh_data is used (a
  mesh_data that does not fill the 8 devices is refused, not replaced by the fill)."""
  import ml_collections
  mesh = lambda data, expert: common.build_mesh(ml_collections.ConfigDict(
      {"mesh_data": data, "mesh_expert": expert}))
  assert dict(mesh(0, 2).shape) == {"data": 4, "expert": 2}
  assert dict(mesh(1, 8).shape) == {"data": 1, "expert": 8}
  with pytest.raises(ValueError, match=r"mesh data=2 x expert=2 = 4 devices, but 8"):
    mesh(2, 2)


def test_metrics_writer_appends_one_sorted_json_line_per_call(tmp_path):
  writer = common.MetricsWriter(str(tmp_path / "run"))  # the workdir is created
  writer.write({"step": 1, "phase": "rl", "loss": 0.5})
  writer.write({"step": 2, "phase": "rl"})
  text = (tmp_path / "run" / "metrics.jsonl").read_text()
  # Appended, not rewritten: a resumed run's rows follow the earlier ones.
  assert text == ('{"loss": 0.5, "phase": "rl", "step": 1}\n'
                  '{"phase": "rl", "step": 2}\n')
  common.MetricsWriter(str(tmp_path / "run")).write({"step": 3})
  assert (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[2] == '{"step": 3}'


def test_only_process_0_writes_metrics_and_the_summary(tmp_path, monkeypatch, capsys):
  # Every process of a multi-host run computes the same metrics; N writers interleave lines.
  from pr2_jax.parallel import distributed
  monkeypatch.setattr(distributed, "is_main_process", lambda: False)
  common.MetricsWriter(str(tmp_path)).write({"step": 1})
  common.print_summary({"final": {"reward_mean": 0.5}, "warmup_eval_reward": 0.1}, str(tmp_path))
  assert not (tmp_path / "metrics.jsonl").exists() and capsys.readouterr().out == ""


def test_log_and_write_writes_the_row_and_logs_its_float_metrics(tmp_path, caplog):
  writer = common.MetricsWriter(str(tmp_path))
  callback = common.log_and_write(writer)
  row = {"phase": "rl", "step": 3, "reward_mean": 0.123456, "loss": 2.0, "k3_kl": 1e-5,
         "accuracy": 1, "grad_norm": "n/a", "other": 7.0}
  with caplog.at_level(logging.INFO, logger="absl"):
    callback(row)
  assert json.loads((tmp_path / "metrics.jsonl").read_text()) == row  # every field, not shown
  # In _SHOWN's order, 4 significant digits; an int, a string or a field not shown is left out.
  assert [r.getMessage() for r in caplog.records] == [
      "[rl 3] loss 2  reward_mean 0.1235  k3_kl 1e-05"]


def test_summary_of_a_finished_run_resumed_shows_its_last_rl_row(tmp_path, capsys):
  rows = [{"phase": "sft_eval", "step": 0, "eval_reward": 0.25},
          {"phase": "rl", "step": 1, "reward_mean": 0.1},
          {"phase": "rl", "step": 2, "reward_mean": 0.2, "eval_reward": 0.5},
          {"phase": "rl_eval", "step": 2, "eval_reward": 0.9}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  # The last "rl" row, not the first (nor the eval row after it), also when the warm-up reward
  # is given (the file was read only without it: a NameError on rows).
  common.print_summary({"final": {}, "warmup_eval_reward": 0.25, "resumed_from": 2},
                       str(tmp_path))
  lines = capsys.readouterr().out.splitlines()
  assert lines[3:6] == ["eval reward before RL:     0.250", "eval reward after RL:      0.500",
                        "train reward (last step):  0.200"]


def test_predictor_lr_warning_starts_above_1e_2():
  from pr2_jax.rl.config import ExperimentConfig
  config = lambda mult: ExperimentConfig.from_dict(  # noqa: E731
      {"model": {}, "sft": {}, "rl": {"learning_rate": 1e-3, "replay_mode": "pr2_r2"},
       "pr2": {"lr_mult": mult}})
  assert common.predictor_lr_warning(config(10.0)) is None  # 1e-2 itself: no warning
  assert "= 0.02 is large" in common.predictor_lr_warning(config(20.0))


def test_experiment_setup_checks_the_model_against_the_mesh(capsys):
  """The experts split over 'expert', d_model (fsdp) over 'data'; either refused is one
  `bad config` line before any compile."""
  from configs import tiny
  cfg = tiny.get_config()
  cfg.mesh_expert = 4
  config, mesh = common.experiment_setup(cfg)
  assert dict(mesh.shape) == {"data": 2, "expert": 4} and config.model.num_experts == 8
  cfg.model.num_experts = 4
  cfg.mesh_expert = 8  # 1 x 8: 4 experts do not split 8 ways
  with pytest.raises(SystemExit) as e:
    common.experiment_setup(cfg)
  assert e.value.code == 2 and capsys.readouterr().err == (
      "error: bad config: ModelConfig.num_experts=4 must be divisible by the mesh's 'expert' "
      "axis size 8\n")
  cfg.model.num_experts, cfg.mesh_expert, cfg.model.fsdp = 8, 1, True
  cfg.model.d_model = 68  # 8 x 1: 'data' of 8 does not divide 68
  with pytest.raises(SystemExit) as e:
    common.experiment_setup(cfg)
  assert e.value.code == 2 and "d_model=68 over the mesh's 'data' axis, but its size 8" in (
      capsys.readouterr().err)


def test_quiet_libraries_drops_only_their_info():
  """The filter compares Python log levels: a warning of JAX's internals passes, its INFO and
  our own INFO are told apart by the path (absl's logging.WARNING is -1, not 30)."""
  record = lambda level, path: logging.LogRecord("x", level, path, 1, "m", None, None)
  quiet = common._QuietLibraries()
  assert quiet.filter(record(logging.WARNING, "/site-packages/jax/_src/xla_bridge.py"))
  assert not quiet.filter(record(logging.INFO, "/site-packages/jax/_src/xla_bridge.py"))
  assert not quiet.filter(record(logging.INFO, "/site-packages/orbax/checkpoint/x.py"))
  assert quiet.filter(record(logging.INFO, "/work/main/experiments/main.py"))


def test_a_mesh_expert_below_1_is_a_usage_error():
  """mesh_expert=0 was a ZeroDivisionError traceback (8 % 0), and a negative one passed the
  divisibility check (8 % -1 == 0) into make_mesh: both are a flag error naming the value."""
  import ml_collections
  from absl import flags
  for expert in (0, -1):
    with pytest.raises(flags.ValidationError) as e:
      common.build_mesh(ml_collections.ConfigDict({"mesh_data": 0, "mesh_expert": expert}))
    assert str(e.value) == f"--config.mesh_expert={expert} must divide the 8 devices"


def test_predictor_lr_warning_is_silent_without_a_predictor():
  """R2, R3 and vanilla train no predictor: pr2.lr_mult * rl.learning_rate = 1 is no concern
  there (the check at 1e-3 in test_a_large_predictor_learning_rate_is_named stays below 1e-2
  either way)."""
  from pr2_jax.rl.config import ExperimentConfig
  for mode in ("none", "r2", "r3"):
    config = ExperimentConfig.from_dict({"model": {}, "sft": {}, "pr2": {"lr_mult": 1e3},
                                         "rl": {"learning_rate": 1e-3, "replay_mode": mode}})
    assert common.predictor_lr_warning(config) is None, mode


def test_summary_shows_rewards_of_zero(tmp_path, capsys):
  """A warm-up that solves nothing has eval reward 0.0: the summary still shows it (and an RL
  eval reward of 0.0), not as if there were none."""
  common.print_summary({"final": {"phase": "rl", "step": 5, "reward_mean": 0.0,
                                  "eval_reward": 0.0}, "warmup_eval_reward": 0.0}, str(tmp_path))
  assert capsys.readouterr().out.splitlines()[1:5] == [
      "== summary ==", "eval reward before RL:     0.000", "eval reward after RL:      0.000",
      "train reward (last step):  0.000"]


def test_summary_of_a_finished_run_keeps_the_given_warm_up_reward(tmp_path, capsys):
  """A run started from another workdir's warm-up (--config.init_from) has no sft_eval row in
  its own metrics.jsonl: resumed when complete, the warm-up reward loop.run gives is kept."""
  rows = [{"phase": "rl", "step": 1, "reward_mean": 0.1},
          {"phase": "rl", "step": 2, "reward_mean": 0.4, "eval_reward": 0.625}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  common.print_summary({"final": {}, "warmup_eval_reward": 0.375, "resumed_from": 2},
                       str(tmp_path))
  assert capsys.readouterr().out.splitlines()[3:6] == [
      "eval reward before RL:     0.375", "eval reward after RL:      0.625",
      "train reward (last step):  0.400"]


def test_setup_devices_keeps_process_0_logging_and_quiets_the_others(monkeypatch):
  """One log for a multi-host run: every process but process 0 drops to WARNING; process 0 (and
  a single-process run) keeps its INFO progress lines."""
  import types
  from absl import logging as absl_logging
  from pr2_jax.parallel import distributed
  for name, value in (("_CPU_DEVICES", 0), ("_COORDINATOR", ""), ("_NUM_PROCESSES", 0),
                      ("_PROCESS_ID", -1), ("_AUTO_DETECT", False)):
    monkeypatch.setattr(common, name, types.SimpleNamespace(value=value))
  logger, handler = logging.getLogger("absl"), absl_logging.get_absl_handler()
  filters = (list(logger.filters), list(handler.filters))
  verbosity = absl_logging.get_verbosity()
  try:
    for main, want in ((True, absl_logging.INFO), (False, absl_logging.WARNING)):
      absl_logging.set_verbosity(absl_logging.INFO)
      monkeypatch.setattr(distributed, "is_main_process", lambda main=main: main)
      common.setup_devices()
      assert absl_logging.get_verbosity() == want, main
  finally:
    absl_logging.set_verbosity(verbosity)
    logger.filters[:], handler.filters[:] = filters
