"""No silent wrong results: bad config and data are one-line errors, non-finite steps stop (or are skipped), NaN gates
are never counted as pruned, a corrupt checkpoint is skipped on resume, and the documented JAX_* multi-host
environment starts 2 processes that match a 1-process run."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train_loop import tiny_config, tiny_data, tiny_model  # noqa: E402,F401  (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(
  os.environ,
  PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  HF_HUB_OFFLINE="1",
  HF_DATASETS_OFFLINE="1",
  JAX_PLATFORMS="cpu",
)


def _cli(*args, env=None, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", "train.glue", *map(str, args)],
    env=env or ENV,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


# ---------------------------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(
  "override, words",
  [
    ("adapter.sparse_lambda=-1", ["adapter.sparse_lambda", "zero or more", "-1"]),
    ("learning_rate=-1e-3", ["optim.learning_rate", "positive", "-0.001"]),
    ("gate_learning_rate=0", ["optim.gate_learning_rate", "positive"]),
    ("max_steps=0", ["train.max_steps", "positive", "max_steps=none"]),
    ("eval_every=0", ["train.eval_every", "positive"]),
    ("grad_accum=0", ["train.grad_accum", "positive"]),
    ("log_every=-2", ["train.log_every", "positive"]),
    ("keep_checkpoints=0", ["train.keep_checkpoints", "positive"]),
    ("warmup_ratio=1.5", ["optim.warmup_ratio", "[0, 1]"]),
    ("buckets=[16, 0]", ["data.buckets", "positive"]),
    ("on_nonfinite=ignore", ["train.on_nonfinite", "'stop', 'skip'"]),
  ],
)
def test_out_of_range_values_are_config_errors(override, words):
  from train.config import ConfigError, load_config

  with pytest.raises(ConfigError) as e:
    load_config(None, [override])
  assert "\n" not in str(e.value)
  for word in words:
    assert word in str(e.value)


def test_defaults_keep_two_checkpoints_and_stop_on_nonfinite():
  from train.config import load_config

  config = load_config()
  assert config.train.keep_checkpoints == 2 and config.train.on_nonfinite == "stop"


def test_yaml_syntax_error_is_one_line_exit_2(tmp_path):
  path = tmp_path / "broken.yaml"
  path.write_text("optim:\n  learning_rate: 1e-3\n   seed: [1, 2\n")
  proc = _cli(path)
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
  assert str(path) in proc.stderr and "YAML syntax error at line" in proc.stderr
  missing = _cli(tmp_path / "nope.yaml")
  assert missing.returncode == 2 and "cannot read the config file" in missing.stderr


def test_help_lists_every_key_with_default_and_description():
  from train.config import valid_keys
  from train.config_help import describe

  proc = _cli("--help")
  assert proc.returncode == 0
  lines = {
    line.split()[0]: line
    for line in proc.stdout.splitlines()
    if line.startswith("  ") and line.split() and line.split()[0] in valid_keys()
  }
  assert sorted(lines) == valid_keys()
  assert "[default: 0.002]" in lines["optim.learning_rate"] and "learning rate" in lines["optim.learning_rate"]
  assert "[default: stop]" in lines["train.on_nonfinite"]
  assert all(text for _, _, text in describe()), "every field needs a description"


def test_sparsify_help_and_range_checks():
  from train.config import ConfigError
  from train.sparsify import load_configs, main

  with pytest.raises(ConfigError, match="sparsify.stage_steps"):
    load_configs(None, ["stage_steps=0"])
  with pytest.raises(ConfigError, match="adapter.sparse_lambda"):
    load_configs(None, ["sparse_lambda=-0.5"])
  assert main(["--help"]) == 0


def test_transformers_banner_is_silenced():
  hide_torch = "import sys; sys.modules['torch'] = None; "
  loud = subprocess.run(
    [sys.executable, "-c", hide_torch + "import transformers"],
    env=ENV,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert "PyTorch was not found" in loud.stderr  # the banner this test is about
  quiet = subprocess.run(
    [sys.executable, "-c", hide_torch + "from train import cli; cli.quiet_libraries(); import transformers"],
    env=ENV,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert quiet.returncode == 0 and "PyTorch was not found" not in quiet.stderr


# ---------------------------------------------------------------------------------------------------------------
# data


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _local(tmp_path, train, validation, test=None, **config):
  from train import data
  from train.config import DataConfig

  _write(tmp_path / "train.jsonl", train)
  _write(tmp_path / "validation.jsonl", validation)
  if test is not None:
    _write(tmp_path / "test.jsonl", test)
  config = DataConfig(task="local", data_dir=str(tmp_path), **{"num_labels": 3, **config})
  spec = data.task_spec(config)
  return data.load_raw(spec, config)


ROWS = [{"sentence": f"s{i}", "label": i % 3} for i in range(6)]


def test_label_out_of_range_names_file_row_and_value(tmp_path):
  from train.data import DataError

  with pytest.raises(DataError) as e:
    _local(tmp_path, ROWS + [{"sentence": "x", "label": 3}], ROWS)
  message = str(e.value)
  assert "train.jsonl" in message and "row 7" in message and "'label'" in message
  assert "3 is outside [0, 3)" in message
  with pytest.raises(DataError, match="validation.jsonl.*row 1.*7 is outside"):
    _local(tmp_path, ROWS, [{"sentence": "x", "label": 7}] + ROWS)
  with pytest.raises(DataError, match="-2 is outside"):
    _local(tmp_path, ROWS + [{"sentence": "x", "label": -2}], ROWS)
  with pytest.raises(DataError, match="1.5 is not a class index"):
    _local(tmp_path, ROWS + [{"sentence": "x", "label": 1.5}], ROWS)


def test_unlabelled_rows_are_dropped_and_unlabelled_splits_skipped(tmp_path, capsys):
  unlabelled = [{"sentence": "u", "label": -1}, {"sentence": "v", "label": None}]
  raw = _local(tmp_path, ROWS + unlabelled, unlabelled + ROWS, test=unlabelled)
  assert len(raw["train"]) == 6 and len(raw["validation"]) == 6 and "test" not in raw
  assert list(raw["train"]["label"]) == [r["label"] for r in ROWS]  # -1 never wraps to the last class
  out = capsys.readouterr().out
  assert "2 unlabelled rows" in out and "split 'test' is skipped" in out
  from train.data import DataError

  with pytest.raises(DataError, match="no labelled validation rows"):
    _local(tmp_path, ROWS, unlabelled)


def test_string_labels_need_label_names(tmp_path):
  from train.data import DataError

  named = [{"sentence": f"s{i}", "label": ["neg", "neu", "pos"][i % 3]} for i in range(6)]
  with pytest.raises(DataError, match="row 1: 'neg' is not a number.*data.label_names"):
    _local(tmp_path, named, named)
  raw = _local(tmp_path, named, named, num_labels=None, label_names=("neg", "neu", "pos"))
  assert list(raw["train"]["label"]) == [0, 1, 2, 0, 1, 2]
  with pytest.raises(DataError, match="'bad' is not one of"):
    _local(
      tmp_path, named + [{"sentence": "x", "label": "bad"}], named, num_labels=None, label_names=("neg", "neu", "pos")
    )


@pytest.mark.parametrize(
  "content, words",
  [
    (b"", ["train.csv", "empty"]),
    (b"sentence,label\n", ["train.csv", "no rows"]),
    (b"sentence,label\ncaf\xe9 au lait,1\n", ["train.csv", "not UTF-8", "line 2"]),
  ],
)
def test_unreadable_csv_is_a_data_error(tmp_path, content, words):
  from train import data
  from train.config import DataConfig

  (tmp_path / "train.csv").write_bytes(content)
  (tmp_path / "validation.csv").write_text("sentence,label\nok,1\n")
  config = DataConfig(task="local", data_dir=str(tmp_path), num_labels=2)
  with pytest.raises(data.DataError) as e:
    data.load_raw(data.task_spec(config), config)
  assert "\n" not in str(e.value)
  for word in words:
    assert word in str(e.value)


@pytest.mark.slow
def test_cli_errors_are_one_line_exit_2(tiny_model, tmp_path):
  missing = _cli(f"model.name={tmp_path}/no/such/model", f"output_dir={tmp_path}/run")
  assert missing.returncode == 2, missing.stderr[-2000:]
  assert "Traceback" not in missing.stderr and "is not a folder" in missing.stderr
  assert missing.stderr.strip().splitlines()[-1].startswith("error: model.name")
  _write(tmp_path / "train.jsonl", ROWS + [{"sentence": "x", "label": 5}])
  _write(tmp_path / "validation.jsonl", ROWS)
  bad_label = _cli(
    f"model.name={tiny_model}",
    "data.task=local",
    f"data.data_dir={tmp_path}",
    "num_labels=3",
    f"output_dir={tmp_path}/run",
    "progress=false",
  )
  assert bad_label.returncode == 2, bad_label.stderr[-2000:]
  assert "Traceback" not in bad_label.stderr
  assert [l for l in bad_label.stderr.splitlines() if "error" in l.lower()] == [
    bad_label.stderr.strip().splitlines()[-1]
  ]
  assert "train.jsonl" in bad_label.stderr and "5 is outside [0, 3)" in bad_label.stderr


# ---------------------------------------------------------------------------------------------------------------
# NaN gates


def test_soft_threshold_and_proximal_step_keep_nan():
  import jax.numpy as jnp
  import optax
  from sora_jax import sora_proximal
  from sora_jax.optim import soft_threshold

  z = jnp.array([np.nan, 0.05, -0.5, np.inf])
  np.testing.assert_allclose(np.asarray(soft_threshold(z, 0.1)), [np.nan, 0.0, -0.4, np.inf], rtol=1e-6)
  params = {"m": {"sora_gate": jnp.array([1.0, 0.05])}}
  tx = sora_proximal(0.1)
  updates, _ = tx.update({"m": {"sora_gate": jnp.array([np.nan, 0.0])}}, tx.init(params), params)
  gate = np.asarray(optax.apply_updates(params, updates)["m"]["sora_gate"])
  assert np.isnan(gate[0]) and gate[1] == 0.0


def test_rank_report_and_prune_refuse_nan_gates():
  import jax
  from sora_jax import adapters

  params = {"dense": {"kernel": np.ones((4, 4), np.float32)}}
  config = adapters.SoraConfig(rank=2, alpha=2.0, targets=(r"dense/kernel",))
  adapted = adapters.init(jax.random.key(0), params, config)
  adapted["dense"]["sora_gate"] = np.array([np.nan, 1.0], np.float32)
  with pytest.raises(ValueError, match="dense/sora_gate holds NaN"):
    adapters.rank_report(adapted, config)
  with pytest.raises(ValueError, match="NaN"):
    adapters.prune(adapted)


# ---------------------------------------------------------------------------------------------------------------
# non-finite steps


@pytest.mark.slow
def test_nonfinite_step_stops_without_saving_or_is_skipped(tiny_model, tiny_data, tmp_path):
  """learning_rate=1e30 (no warmup) blows the params up at step 1 and the loss is NaN at step 2: the run stops naming
  step 2 and the last good checkpoint (step 1), saving nothing after it. A regression run with one NaN target in
  the batch of step 2: on_nonfinite=skip drops that update only, counts it, and finishes with finite params."""
  import jax
  from train.loop import NonFiniteError, build, finish, fit

  short = ("max_steps=4", "save_every=1", "eval_every=4", "export_peft=false", "warmup_ratio=0")
  with pytest.raises(NonFiniteError) as e:
    fit(
      build(
        tiny_config(tiny_model, tiny_data, tmp_path / "stop", *short, "learning_rate=1e30", "gate_learning_rate=1e30")
      )
    )
  message = str(e.value)
  assert message.startswith("step 2:") and "last good checkpoint is step 1" in message, message
  assert "on_nonfinite=skip" in message and "learning_rate" in message
  assert sorted(os.listdir(tmp_path / "stop" / "checkpoints" / "latest")) == ["1"]

  experiment = build(tiny_config(tiny_model, tiny_data, tmp_path / "skip", *short, "num_labels=1", "on_nonfinite=skip"))
  order = np.random.default_rng([experiment.config.seed, 0]).permutation(len(experiment.splits["train"]))
  experiment.splits["train"].labels[order[8]] = np.nan  # first example of step 2's batch (batch size 8)
  outcome = fit(experiment)
  assert outcome.skipped_steps == 1 and outcome.history[-1]["skipped_steps"] == 1
  assert [r["skipped_steps"] for r in outcome.history] == [0, 1, 1, 1]
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(outcome.params))
  results = finish(experiment, outcome)
  assert results["skipped_steps"] == 1 and results["pruned_merged"]["logits_close"]


# ---------------------------------------------------------------------------------------------------------------
# corrupt checkpoints


def _truncate(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)


def _data_files(step_dir):
  found = []
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    found += [os.path.join(root, f) for f in files if os.path.basename(root) == "d"]
  return found


def test_resume_walks_back_past_corrupt_checkpoints(tmp_path, capfd, monkeypatch):
  import jax.numpy as jnp
  from train.checkpoint import CheckpointError, Checkpoints

  # several leaves: a failed restore then leaves reads in flight, whose callbacks once printed tracebacks
  like = {"w": jnp.zeros((64, 64)), "step": jnp.zeros((), jnp.int32), **{f"v{i}": jnp.zeros(16) for i in range(8)}}
  directory = tmp_path / "checkpoints"
  writer = Checkpoints(str(directory), keep=5)
  for step in (1, 2, 3, 4, 5):
    writer.save(
      step,
      {**like, "w": jnp.full((64, 64), float(step)), "step": jnp.asarray(step)},
      {"step": step, "best": {}, "data_position": {}},
    )
  writer.wait()
  writer.close()
  latest = directory / "latest"
  files = _data_files(str(latest / "5"))
  assert files, os.listdir(latest / "5" / "state")
  for f in files:
    _truncate(f)
  (latest / "4" / "meta" / "metadata").write_text('{"step": 4, "be')  # a truncated meta JSON

  monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  reader = Checkpoints(str(directory), keep=2)
  state, meta = reader.restore_latest(like)
  reader.wait()
  assert meta["step"] == 3 and float(state["w"][0, 0]) == 3.0
  out = capfd.readouterr()
  said = [line for line in out.out.splitlines() if "cannot be restored" in line]
  assert len(said) == 2 and "5.corrupt" in said[0] and "4.corrupt" in said[1]
  assert "Traceback" not in out.err and "Event loop is closed" not in out.err
  # The abandoned reads of a failed restore call back into orbax's closed event loop later, from tensorstore's
  # threads (seen as dozens of tracebacks on `python -m train.glue ... resume=true`): exactly those are dropped.
  sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
  sys.excepthook(KeyError, KeyError("other"), None)
  err = capfd.readouterr().err
  assert "Event loop is closed" not in err and "KeyError" in err
  # moved aside; of the readable ones the newest keep=2 stay, the stale step 1 is deleted
  assert sorted(os.listdir(latest)) == ["2", "3", "4.corrupt", "5.corrupt"]
  for f in _data_files(str(latest / "3")) + _data_files(str(latest / "2")):
    _truncate(f)
  with pytest.raises(CheckpointError, match="no checkpoint in .* can be restored .*3.corrupt, 2.corrupt"):
    reader.restore_latest(like)
  reader.close()


# ---------------------------------------------------------------------------------------------------------------
# multi-host


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_from_jax_env_match_one_process(tiny_model, tiny_data, tmp_path):
  """JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID start 2 processes of 2 CPU devices each; SIGTERM
  to one of them stops both after the same step with a checkpoint; resumed, their loss curve and metrics equal those
  of 1 process with 4 devices."""
  args = [
    f"model.name={tiny_model}",
    "data.task=local",
    f"data.data_dir={tiny_data}",
    "max_length=16",
    "batch_size=8",
    "eval_batch_size=16",
    "max_steps=4",
    "eval_every=4",
    "save_every=4",
    "log_every=1",
    "progress=false",
    "learning_rate=1e-2",
    "gate_init=normal",
    "sparse_lambda=0.05",
    "lambda_scaled_by_lr=false",
    "export_peft=false",
    "mesh.fsdp_min_size=0",
  ]
  env = lambda devices, **extra: dict(ENV, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
  single = _cli(*args, f"output_dir={tmp_path}/one", env=env(4))
  assert single.returncode == 0, single.stderr[-3000:]

  def two(*extra, code=None):
    port = _free_port()
    start = ["-m", "train.glue"] if code is None else ["-c", code]
    procs = [
      subprocess.Popen(
        [sys.executable, *start, *args, f"output_dir={tmp_path}/two", *extra],
        env=env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
      for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]

  # Only process 1 receives SIGTERM, while its step 3 runs: both processes save step 3 and stop (exit 75).
  preempt_process_1 = textwrap.dedent("""
        import os, signal, sys
        from train import data
        call = data.TrainBatches.__call__
        def batches(self, step):
            if step == 2 and os.environ["JAX_PROCESS_ID"] == "1":
                os.kill(os.getpid(), signal.SIGTERM)
            return call(self, step)
        data.TrainBatches.__call__ = batches
        from train.glue import main
        sys.exit(main(sys.argv[1:]))
        """)
  stopped = two(code=preempt_process_1)
  for _, _, err in stopped:
    assert err.strip().splitlines()[-1].startswith("stopped by "), err[-3000:]
    assert "after step 3;" in err.strip().splitlines()[-1]
  assert [code for code, _, _ in stopped] == [75, 75]
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints" / "latest")) == ["3"]
  for code, _, err in two("resume=true"):
    assert code == 0, err[-3000:]
  one = json.loads((tmp_path / "one" / "results.json").read_text())
  two = json.loads((tmp_path / "two" / "results.json").read_text())
  assert one["metrics"] == pytest.approx(two["metrics"], abs=1e-6)
  assert one["ranks"] == two["ranks"]
  curve = lambda d: [
    json.loads(l)["train/loss"] for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines() if "train/loss" in l
  ]
  assert len(curve("one")) == 4
  np.testing.assert_allclose(curve("two"), curve("one"), rtol=1e-5, atol=1e-6)


def test_checkpoint_of_another_layout_is_not_moved_aside(tmp_path):
  """Resuming with a changed config (here another shape) is an error that leaves the intact checkpoints alone."""
  import jax.numpy as jnp
  from train.checkpoint import CheckpointError, Checkpoints

  writer = Checkpoints(str(tmp_path), keep=2)
  for step in (1, 2):
    writer.save(step, {"a": jnp.zeros((4, 8))}, {"step": step, "best": {}, "data_position": {}})
  writer.wait()
  writer.close()
  reader = Checkpoints(str(tmp_path), keep=2)
  with pytest.raises(CheckpointError, match="different set or shape"):
    reader.restore_latest({"a": jnp.zeros((4, 4))})
  reader.close()
  assert sorted(os.listdir(tmp_path / "latest")) == ["1", "2"]


# ---------------------------------------------------------------------------------------------------------------
# data and start-up problems named in one line


@pytest.mark.parametrize(
  "value, problem", [("", "is empty"), ("   ", "is empty"), (None, "is null"), (17, "is int 17, not text")]
)
def test_a_text_field_that_is_not_text_names_file_row_and_column(tmp_path, value, problem):
  from train.data import DataError

  rows = ROWS[:3] + [{"sentence": value, "label": 0}] + ROWS[3:]
  with pytest.raises(DataError) as e:
    _local(tmp_path, rows, ROWS)
  message = str(e.value)
  assert "\n" not in message and "train.jsonl" in message and "column 'sentence', row 4" in message, message
  assert problem in message


def test_two_formats_of_one_split_are_an_error_naming_both(tmp_path):
  from train.data import DataError

  (tmp_path / "train.csv").write_text("sentence,label\nold,1\n")
  with pytest.raises(DataError) as e:
    _local(tmp_path, ROWS, ROWS)
  assert f"{tmp_path}/train.jsonl" in str(e.value) and f"{tmp_path}/train.csv" in str(e.value)


def test_max_length_above_the_model_s_positions_is_a_config_error():
  import transformers
  from train.config import ConfigError, load_config
  from train.build import _check_max_length

  bert = transformers.BertConfig(max_position_embeddings=512)
  _check_max_length(load_config(None, ["max_length=512"]), bert)
  with pytest.raises(ConfigError, match=r"data.max_length=600 is above the 512 positions .*max_length=512 or less"):
    _check_max_length(load_config(None, ["max_length=600"]), bert)
  roberta = transformers.RobertaConfig(max_position_embeddings=514, pad_token_id=1)  # positions start at 2
  with pytest.raises(ConfigError, match="above the 512 positions"):
    _check_max_length(load_config(None, ["max_length=513"]), roberta)
  relative = transformers.DebertaV2Config(max_position_embeddings=512, position_biased_input=False)
  _check_max_length(load_config(None, ["max_length=1024"]), relative)  # no absolute positions: no limit


def test_metrics_log_drops_a_line_cut_short_on_resume(tmp_path, capsys):
  from train.runlog import _truncate_log

  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "train/loss": 0.9}\n{"step": 3, "train/lo')
  _truncate_log(str(path), 2)
  assert path.read_text() == '{"step": 1, "train/loss": 1.0}\n{"step": 2, "train/loss": 0.9}\n'
  assert "dropped 1 unreadable line" in capsys.readouterr().out
  _truncate_log(str(path), 1)
  assert path.read_text() == '{"step": 1, "train/loss": 1.0}\n'


def test_a_multi_host_start_missing_a_process_says_so_and_gives_up(tmp_path):
  """Process 0 of 2 alone: a line within seconds says what it waits for; after SORA_JAX_INIT_TIMEOUT_S one error
  line and exit 2 (not JAX's abort with a C++ stack trace after 300 s)."""
  import time

  env = dict(
    ENV,
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
    JAX_NUM_PROCESSES="2",
    JAX_PROCESS_ID="0",
    SORA_JAX_INIT_TIMEOUT_S="4",
  )
  started = time.time()
  proc = _cli(f"output_dir={tmp_path}", env=env, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines[0].startswith("waiting for 2 processes at 127.0.0.1:") and "giving up after 4 s" in lines[0], lines
  assert lines[-1].startswith("error: not every one of 2 processes") and len(lines) == 2, lines
  assert time.time() - started < 60
