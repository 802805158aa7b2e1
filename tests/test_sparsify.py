"""The staged sparsifying run on a tiny random BERT and tiny jsonl data (the `tiny` fixture of conftest.py); its parts
against closed forms."""

import contextlib
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import sparsify
from train.config import ConfigError

from conftest import tiny_run_args


def _args(tiny, output_dir, *extra):
  return [
    *tiny_run_args(tiny, output_dir),
    "data.buckets=[16]",
    "train.max_steps=6",
    "train.eval_every=1000",
    "train.log_every=3",
    "train.progress=false",
    "optim.learning_rate=1e-2",
    "adapter.rank=4",
    "adapter.gate_init=normal",
    "shape=linear",
    "start=0",
    "max_lambda=4",
    "lambda_num=3",
    "stage_steps=4",
    "memorization_examples=40",
    *extra,
  ]


def _run(tiny, output_dir, *extra):
  config, settings = sparsify.load_configs(None, _args(tiny, output_dir, *extra))
  return sparsify.run_stages(config, settings)


def _run_printing(tiny, output_dir, *extra):
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    table = _run(tiny, output_dir, *extra)
  return table, printed.getvalue()


@pytest.fixture(scope="module")
def fresh_run(tiny, tmp_path_factory):
  out = tmp_path_factory.mktemp("fresh") / "run"
  table, printed = _run_printing(tiny, out)
  return out, table, printed


@pytest.mark.slow
def test_staged_run_writes_table_and_pictures(fresh_run):
  out, table, printed = fresh_run
  stages = table["stages"]
  assert [s["stage"] for s in stages] == [0, 1, 2]
  np.testing.assert_allclose([s["lambda"] for s in stages], [0.0, 2.0, 4.0], rtol=1e-12)
  assert [s["steps"] for s in stages] == [6, 4, 4]
  retained = [s["retained_params"] for s in stages]
  assert all(b <= a for a, b in zip(retained, retained[1:])), retained
  assert table["retained_non_increasing"]
  assert retained[-1] < stages[0]["max_params"]  # the thresholds switched ranks off
  for s in stages:
    ffn = lambda m: (
      m.endswith("intermediate/dense") or m.endswith("layer_0/output/dense") or m.endswith("layer_1/output/dense")
    )  # noqa: E731
    assert s["retained_params"] == sum(r * (32 + 48 if ffn(m) else 32 + 32) for m, r in s["ranks"].items())
    assert len(s["ranks"]) == 2 * 6 and all(0 <= r <= 4 for r in s["ranks"].values())
    assert s["metrics"]["train_memorization/accuracy"] == s["train_metric"]
    assert s["metrics"]["validation/accuracy"] == s["eval_metric"]
  assert stages[0]["memorization"] == pytest.approx(100.0) and stages[0]["generalization"] == pytest.approx(100.0)
  assert stages[2]["memorization"] == pytest.approx(100 * stages[2]["train_metric"] / stages[0]["train_metric"])
  for name in ("memorization_generalization.png", "rank_heatmap.png", "rank_over_steps.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  assert json.loads((out / "stages.json").read_text())["stages"][1]["ranks"] == stages[1]["ranks"]
  for k in range(3):
    assert (out / "stages" / f"stage_{k:02d}" / "params").is_dir()  # one orbax checkpoint per stage
  assert "sparsifying stages" in printed and "gen. %" in printed and "active rank per module" in printed


@pytest.mark.slow
def test_rerun_skips_completed_stages_and_redoes_an_unfinished_one(fresh_run, tiny):
  out, table, _ = fresh_run
  stages = table["stages"]
  mtimes = [os.path.getmtime(out / "stages" / f"stage_{k:02d}" / "stage.json") for k in range(3)]
  again, printed = _run_printing(tiny, out)
  assert printed.count("done before") == 3
  assert [os.path.getmtime(out / "stages" / f"stage_{k:02d}" / "stage.json") for k in range(3)] == mtimes
  assert [s["metrics"] for s in again["stages"]] == [s["metrics"] for s in stages]
  assert [s["ranks"] for s in again["stages"]] == [s["ranks"] for s in stages]

  # A stage without its record is redone (from its trainer checkpoint) and lands on the same result.
  os.remove(out / "stages" / "stage_02" / "stage.json")
  redone, printed = _run_printing(tiny, out)
  assert printed.count("done before") == 2
  assert redone["stages"][2]["ranks"] == stages[2]["ranks"]
  assert redone["stages"][2]["metrics"] == stages[2]["metrics"]

  # Changing the schedule or a training setting under a finished run is an error, not a silent mix.
  with pytest.raises(ValueError, match="was run with lambda"):
    _run(tiny, out, "max_lambda=5")
  with pytest.raises(ValueError, match="adapter.gate_update: 'gradient' -> 'adam'"):
    _run(tiny, out, "adapter.gate_update=adam")

  # A finished stage whose params no longer match the checksum saved in its record is refused, not reused.
  record_path = out / "stages" / "stage_01" / "stage.json"
  record = json.loads(record_path.read_text())
  assert len(record["params_checksum"]) == 16
  record_path.write_text(json.dumps({**record, "params_checksum": "0" * 16}))
  with pytest.raises(ValueError, match="differ from the checksum saved in its stage.json"):
    _run(tiny, out)
  record_path.write_text(json.dumps(record))  # as it was, for the tests that use the run next


@pytest.mark.slow
def test_finished_stages_are_evaluated_again_under_other_settings_and_refused_when_damaged(fresh_run, tiny):
  out, table, _ = fresh_run
  stages = table["stages"]
  # Another memorization subset: the finished stages' numbers are recomputed, never relabelled.
  again, printed = _run_printing(tiny, out, "memorization_examples=20")
  assert printed.count("evaluated with other settings") == 3
  assert all(s["evaluation"]["memorization_examples"] == 20 for s in again["stages"])
  record = json.loads((out / "stages" / "stage_01" / "stage.json").read_text())
  assert record["evaluation"]["memorization_examples"] == 20
  assert [s["ranks"] for s in again["stages"]] == [s["ranks"] for s in stages]
  # Stage 1's params replaced by stage 0's (readable, but not its own): the checksum refuses them in one line.
  import shutil

  params_1 = out / "stages" / "stage_01" / "params"
  kept = out / "stage_01_params"
  shutil.move(params_1, kept)
  shutil.copytree(out / "stages" / "stage_00" / "params", params_1)
  with pytest.raises(ValueError, match="stage_01/params differ from the checksum"):
    _run(tiny, out, "memorization_examples=20")
  shutil.rmtree(params_1)
  with pytest.raises(ValueError, match="stage_01/params cannot be read"):
    _run(tiny, out, "memorization_examples=20")
  shutil.move(kept, params_1)
  # A stage record cut short by a kill is one line too.
  record_path = out / "stages" / "stage_02" / "stage.json"
  text = record_path.read_text()
  record_path.write_text("")
  with pytest.raises(ValueError, match="stage_02/stage.json cannot be read"):
    _run(tiny, out, "memorization_examples=20")
  record_path.write_text(text)


@pytest.mark.slow
def test_official_stage_schedule_only_thresholds(tiny, tmp_path):
  official = tmp_path / "official"
  gates = ["adapter.gate_update=adam", "adapter.lambda_scaled_by_lr=false", "optim.gate_learning_rate=null"]
  result, printed = _run_printing(tiny, official, *gates, "stage_schedule=official", "lambda_num=2", "max_lambda=0.05")
  first, second = result["stages"]
  assert second["schedule"] == "official" and second["retained_params"] < first["retained_params"]
  assert result["retained_non_increasing"]
  # A rerun reads both finished stages back.
  again, printed = _run_printing(tiny, official, *gates, "stage_schedule=official", "lambda_num=2", "max_lambda=0.05")
  assert printed.count("done before") == 2 and again["stages"][1]["ranks"] == second["ranks"]


def _adapted_tree(rng, lead=()):
  a = jnp.asarray(rng.normal(size=lead + (5, 4)), jnp.float32)
  b = jnp.asarray(rng.normal(size=lead + (4, 3)), jnp.float32)
  alive = rng.random(lead + (4,)) > 0.4
  alive[..., 1], alive[..., 2] = False, True
  gate = jnp.asarray(rng.normal(size=lead + (4,)) * alive, jnp.float32)
  return {"layer": {"dense": {"sora_a": a, "sora_b": b, "sora_gate": gate}}, "classifier": {"bias": jnp.ones(3)}}


@pytest.mark.parametrize("lead", [(), (2,)])
def test_cut_dead_ranks_keeps_the_function_and_zeroes_dead_ranks(lead):
  tree = _adapted_tree(np.random.default_rng(0), lead)
  cut = sparsify.cut_dead_ranks(tree)
  before, after = tree["layer"]["dense"], cut["layer"]["dense"]
  delta = lambda m: jnp.einsum("...ir,...r,...ro->...io", m["sora_a"], m["sora_gate"], m["sora_b"])  # noqa: E731
  np.testing.assert_allclose(delta(after), delta(before), rtol=1e-6, atol=1e-6)
  dead = np.asarray(before["sora_gate"] == 0)
  assert dead.any()
  a, b = np.asarray(after["sora_a"]), np.asarray(after["sora_b"])
  assert np.all(np.moveaxis(a, -1, len(lead))[dead] == 0) and np.all(b[dead] == 0)
  assert np.all(np.moveaxis(a, -1, len(lead))[~dead] == np.moveaxis(np.asarray(before["sora_a"]), -1, len(lead))[~dead])
  np.testing.assert_array_equal(cut["classifier"]["bias"], tree["classifier"]["bias"])


def test_cut_rank_gets_no_update_from_adamw_and_proximal():
  # The monotonicity argument: after the cut, a dead rank's gradient, AdamW update and proximal step are all zero.
  import optax
  from sora_jax.optim import sora_proximal

  tree = sparsify.cut_dead_ranks(_adapted_tree(np.random.default_rng(1))["layer"]["dense"])
  dead = np.asarray(tree["sora_gate"] == 0)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(6, 5)), jnp.float32)
  loss = lambda p: jnp.sum(jnp.sin((x @ p["sora_a"]) * p["sora_gate"] @ p["sora_b"]))  # noqa: E731
  tx = optax.chain(optax.adamw(1e-1, weight_decay=0.1), sora_proximal(1e-3))
  state = tx.init(tree)
  for _ in range(3):
    updates, state = tx.update(jax.grad(loss)(tree), state, tree)
    tree = optax.apply_updates(tree, updates)
  assert np.all(np.asarray(tree["sora_gate"])[dead] == 0)
  assert np.all(np.asarray(tree["sora_a"])[:, dead] == 0) and np.all(np.asarray(tree["sora_b"])[dead] == 0)


def test_threshold_only_is_the_composed_soft_threshold():
  tree = _adapted_tree(np.random.default_rng(3))
  out = sparsify.threshold_only(tree, 0.05, 7)
  gate = np.asarray(tree["layer"]["dense"]["sora_gate"])
  expected = np.sign(gate) * np.maximum(np.abs(gate) - 7 * 0.05, 0)  # S_a(S_b(z)) = S_{a+b}(z)
  np.testing.assert_allclose(out["layer"]["dense"]["sora_gate"], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["layer"]["dense"]["sora_a"], tree["layer"]["dense"]["sora_a"])
  np.testing.assert_array_equal(out["classifier"]["bias"], tree["classifier"]["bias"])


def test_config_parsing(tmp_path):
  path = tmp_path / "run.yaml"
  path.write_text("seed: 21\nsparsify:\n  shape: exp_linear\n  start: 1.0e-4\n  max_lambda: 1.0e-2\n")
  config, settings = sparsify.load_configs(
    str(path), ["lambda_num=5", "sparsify.stage_schedule=official", "optim.learning_rate=1e-3"]
  )
  assert (settings.shape, settings.start, settings.max_lambda, settings.lambda_num) == ("exp_linear", 1e-4, 1e-2, 5)
  assert settings.stage_schedule == "official" and config.seed == 21 and config.optim.learning_rate == 1e-3
  assert config.output_dir == sparsify.DEFAULT_OUTPUT_DIR
  np.testing.assert_allclose(sparsify.stage_lambdas(settings), np.geomspace(1e-4, 1e-2, 5), rtol=1e-12)
  with pytest.raises(ConfigError, match="valid"):
    sparsify.load_configs(None, ["sparsify.lambda_count=3"])
  with pytest.raises(ConfigError):
    sparsify.load_configs(None, ["lambda_num=three"])
  with pytest.raises(ValueError, match="exp_linear"):
    sparsify.check(*sparsify.load_configs(None, ["shape=exp_linear", "start=0"]))
  with pytest.raises(ValueError, match="gate_update=adam"):
    sparsify.check(*sparsify.load_configs(None, ["stage_schedule=official"]))
  with pytest.raises(ValueError, match="lambda_scaled_by_lr"):
    sparsify.check(*sparsify.load_configs(None, ["stage_schedule=official", "adapter.gate_update=adam"]))
  with pytest.raises(ValueError, match="method"):
    sparsify.check(*sparsify.load_configs(None, ["adapter.method=lora"]))
  assert sparsify.main(["stage_schedule=sometimes"]) == 2


def test_module_names_and_rank_grid():
  from train import plots

  assert plots.split_module("bert/encoder/layer_3/attention/self/query") == (3, "query")
  assert plots.split_module("bert/encoder/layer/output/dense[5]") == (5, "ffn out")
  assert plots.split_module("deberta/encoder/layer_0/attention/self/value_proj") == (0, "value")
  assert plots.split_module("bert/pooler/dense") == (-1, "bert/pooler/dense")
  layers, kinds, grid = plots.rank_grid(
    {"m/layer_1/intermediate/dense": 2, "m/layer_0/attention/self/key": 7, "m/layer_0/attention/self/query": 8}
  )
  assert layers == [0, 1] and kinds == ["query", "key", "ffn in"]
  np.testing.assert_array_equal(grid, [[8, 7, np.nan], [np.nan, np.nan, 2]])


def test_plots_redraw_a_staged_run_from_its_table(tmp_path):
  # `python -m train.plots RUN_DIR` redraws the three pictures from stages.json; ranks over steps are the stage ends.
  from train import plots

  modules = [f"bert/encoder/layer_{i}/{m}" for i in range(2) for m in ("attention/self/query", "output/dense")]
  stages = [
    {
      "stage": k,
      "lambda": 0.01 * k,
      "steps": 10 if k == 0 else 5,
      "retained_params": 100 - 10 * k,
      "fraction": 1 - 0.1 * k,
      "memorization": 100.0 - k,
      "generalization": 100.0 - 2 * k,
      "ranks": {m: 8 - k - j for j, m in enumerate(modules)},
    }
    for k in range(3)
  ]
  table = {"stages": stages, "rank_max": 8}
  assert [s for s, _ in plots.stage_rank_records(table)] == [10, 15, 20]
  (tmp_path / "stages.json").write_text(json.dumps(table))
  plots.main([str(tmp_path)])
  for name in ("memorization_generalization.png", "rank_heatmap.png", "rank_over_steps.png"):
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(SystemExit, match="stages.json"):
    plots.main([str(tmp_path / "missing")])


@pytest.mark.slow
def test_stages_share_one_compiled_training_step(tiny, tmp_path, caplog):
  """lambda, the stage's length and its learning-rate schedule enter the jitted step as arrays: a staged run of
  three stages (two lambdas, two lengths) compiles the training step once."""
  import logging

  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    table = _run(tiny, tmp_path / "run")
  assert [s["lambda"] for s in table["stages"]] == [0.0, 2.0, 4.0]
  assert [s["steps"] for s in table["stages"]] == [6, 4, 4]
  compiled = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(")]
  steps = [r for r in compiled if r.getMessage().startswith("Compiling jit(step)")]
  assert len(compiled) > 1 and len(steps) == 1  # the log does see compilations; the step's happens once
