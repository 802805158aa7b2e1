"""Run config: YAML files, key=value overrides, type checks and the errors that name valid keys."""

import glob
import os

import numpy as np
import pytest

from train.config import METHOD_DEFAULTS, ConfigError, RunConfig, config_warnings, load_config, valid_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_are_the_builtin_run():
  config = load_config()
  assert config == RunConfig()
  assert config.data.task == "wordnet" and config.model.name == "all-MiniLM-L6-v2"
  assert config.adapter.method == "sora"
  shipped = load_config(os.path.join(ROOT, "configs", "glue", "wordnet.yaml"), [f"output_dir={config.output_dir}"])
  assert shipped == config  # configs/glue/wordnet.yaml spells out the built-in defaults


def test_yaml_then_overrides(tmp_path):
  path = tmp_path / "run.yaml"
  path.write_text(
    "seed: 3\ndata:\n  task: rte\n  max_length: 128\noptim:\n  learning_rate: 8.0e-4\n"
    "adapter: {rank: 4, targets: ['.*query/kernel']}\n"
  )
  config = load_config(
    str(path),
    [
      "seed=21",
      "optim.learning_rate=1e-3",
      "output_dir=/tmp/x",
      "rank=2",
      "buckets=[16, 32]",
      "max_steps=none",
      "bf16=true",
    ],
  )
  assert config.seed == 21 and config.output_dir == "/tmp/x"
  assert config.data.task == "rte" and config.data.max_length == 128
  assert config.optim.learning_rate == 1e-3
  assert config.adapter.rank == 2 and config.adapter.targets == (".*query/kernel",)
  assert config.data.buckets == (16, 32)
  assert config.train.max_steps is None and config.model.bf16 is True


def test_int_is_accepted_for_float():
  assert load_config(None, ["learning_rate=1"]).optim.learning_rate == 1.0


@pytest.mark.parametrize(
  "override, words",
  [
    ("not_a_key=1", ["unknown", "optim.learning_rate"]),
    ("optim.nope=1", ["unknown", "train.batch_size"]),
    ("seed=abc", ["seed", "integer", "valid keys"]),
    ("rank=1.5", ["adapter.rank", "integer"]),
    ("bf16=3", ["model.bf16", "true/false"]),
    ("learning_rate=fast", ["optim.learning_rate", "float"]),
    ("novalue", ["key=value"]),
    ("final_params=worst", ["train.final_params", "'best', 'last'", "worst"]),
    ("malloc=fast", ["train.malloc", "'retain', 'default'", "fast"]),
  ],
)
def test_errors_name_valid_keys(override, words):
  with pytest.raises(ConfigError) as e:
    load_config(None, [override])
  for word in words:
    assert word in str(e.value)


def test_yaml_with_unknown_key_fails(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("optim:\n  learnin_rate: 1e-3\n")
  with pytest.raises(ConfigError, match="learnin_rate"):
    load_config(str(path))


def test_every_shipped_config_parses():
  files = sorted(glob.glob(os.path.join(ROOT, "configs", "glue", "*.yaml")))
  tasks = {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"}
  names = {os.path.basename(f)[:-5] for f in files}
  assert tasks <= names and {t + "_lora" for t in tasks} <= names
  for f in files:
    config = load_config(f)
    if os.path.basename(f).endswith("_lora.yaml"):
      assert config.adapter.method == "lora"


def test_valid_keys_are_dotted():
  keys = valid_keys()
  assert "optim.learning_rate" in keys and "seed" in keys and "mesh.fsdp" in keys


def test_full_fine_tuning_has_its_own_defaults(tmp_path):
  full = load_config(None, ["adapter.method=full"])
  assert full.optim.learning_rate == METHOD_DEFAULTS["full"]["optim.learning_rate"] < 1e-3
  assert full.optim.gate_learning_rate is None and full.adapter.sparse_lambda == 0.0
  assert full.optim.head_learning_rate == METHOD_DEFAULTS["full"]["optim.head_learning_rate"] == 2e-3
  assert full.optim.weight_decay == RunConfig().optim.weight_decay  # the other defaults are the built-in run's
  assert load_config(None, ["adapter.method=full", "learning_rate=3e-5"]).optim.learning_rate == 3e-5
  path = tmp_path / "full.yaml"
  path.write_text("adapter: {method: full}\noptim: {learning_rate: 2.0e-5}\n")
  assert load_config(str(path)).optim.learning_rate == 2e-5  # the file beats the method's default
  assert load_config(str(path), ["learning_rate=4e-5"]).optim.learning_rate == 4e-5
  path.write_text("adapter: {method: full}\n")
  assert load_config(str(path), ["adapter.method=lora"]).optim.learning_rate == RunConfig().optim.learning_rate
  shipped = load_config(os.path.join(ROOT, "configs", "glue", "wordnet_full.yaml"), [f"output_dir={full.output_dir}"])
  assert shipped == full  # configs/glue/wordnet_full.yaml spells out the method's defaults


def test_full_fine_tuning_at_an_adapter_learning_rate_warns(capsys, monkeypatch):
  assert config_warnings(load_config(None, ["adapter.method=full"])) == []
  assert config_warnings(load_config(None, ["learning_rate=5e-3"])) == []  # adapters: not a warning
  (line,) = config_warnings(load_config(None, ["adapter.method=full", "learning_rate=2e-3"]))
  assert "optim.learning_rate=0.002" in line and "above 0.001" in line and "\n" not in line
  from train import allocator, glue, loop
  import sora_jax.sharding

  runs = []
  monkeypatch.setattr(allocator, "configure", lambda mode: None)  # the real one changes this process's malloc
  monkeypatch.setattr(sora_jax.sharding, "maybe_initialize_distributed", lambda **kwargs: None)
  monkeypatch.setattr(loop, "run", lambda config: runs.append(config) or {})
  assert glue.main(["adapter.method=full", "learning_rate=2e-3"]) == 0
  assert capsys.readouterr().err == f"warning: {line}\n"
  assert glue.main(["adapter.method=full"]) == 0 and capsys.readouterr().err == ""
  assert [c.optim.learning_rate for c in runs] == [2e-3, METHOD_DEFAULTS["full"]["optim.learning_rate"]]


def test_full_fine_tuning_moves_the_head_at_its_own_rate():
  import jax.numpy as jnp
  from train.loop import make_optimizer

  config = load_config(None, ["adapter.method=full", "optim.weight_decay=0", "optim.warmup_ratio=0"])
  params = {"bert": {"dense": {"kernel": jnp.zeros((3, 2))}}, "classifier": {"kernel": jnp.zeros((2, 4))}}
  grads = {"bert": {"dense": {"kernel": jnp.ones((3, 2))}}, "classifier": {"kernel": jnp.ones((2, 4))}}
  tx, schedule = make_optimizer(config, params, total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  body, head = updates["bert"]["dense"]["kernel"], updates["classifier"]["kernel"]
  # One Adam step on equal gradients moves every entry by the learning rate: 2e-4 for the body, 2e-3 for the head.
  np.testing.assert_allclose(body, -schedule(0), rtol=1e-5)
  np.testing.assert_allclose(head, -10 * schedule(0), rtol=1e-5)


@pytest.mark.parametrize("program", ["glue", "sparsify", "pareto"])
def test_the_three_programs_share_one_main(program, capsys, monkeypatch):
  """--help, an unknown option, a bad key, and the start order (malloc, jax.distributed, run) are the same for all."""
  import importlib
  from train import allocator, cli

  module = importlib.import_module(f"train.{program}")
  assert module.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith(module.__doc__[:40]) and "keys" in out and "train.max_steps" in out
  assert module.main(["--nonsense"]) == 2
  assert capsys.readouterr().err.startswith("error: unknown option --nonsense")
  assert module.main(["adapter.no_such_key=1"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1
  calls = []
  monkeypatch.setattr(allocator, "configure", lambda mode: calls.append(("malloc", mode)))
  monkeypatch.setattr(cli, "initialize_distributed", lambda: calls.append(("distributed",)))
  runner = {"glue": ("loop", "run"), "sparsify": (module, "run_stages"), "pareto": (module, "run_study")}[program]
  target = importlib.import_module("train.loop") if runner[0] == "loop" else runner[0]
  monkeypatch.setattr(target, runner[1], lambda *a: calls.append(("run",)) or {})
  assert module.main(["train.max_steps=3"]) == 0
  assert calls == [("malloc", "retain"), ("distributed",), ("run",)]
  monkeypatch.setattr(target, runner[1], lambda *a: None)  # a run that stopped without a result
  assert module.main([]) == 1


def test_help_into_a_closed_pipe_exits_quietly():
  """`python -m train.glue --help | head -1`: the reader has gone; no BrokenPipeError traceback, exit 0."""
  import subprocess
  import sys

  read_end, write_end = os.pipe()
  os.close(read_end)  # every write to the pipe now fails with EPIPE
  try:
    program = subprocess.run(
      [sys.executable, "-c", "import sys; from train import glue; sys.exit(glue.main(['--help']))"],
      cwd=ROOT,
      stdout=write_end,
      stderr=subprocess.PIPE,
      text=True,
      timeout=120,
      env={**os.environ, "PYTHONPATH": ROOT},
    )
  finally:
    os.close(write_end)
  assert program.returncode == 0 and "Traceback" not in program.stderr, program.stderr
