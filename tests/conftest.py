"""Fixtures shared by the tests: the trainer's tiny BERT and task, and the tiny model of each family (the Tunix
Qwen3 / Llama3 decoder and its transformers twin, the BERT-family encoder, a two-Linear NNX model with SoRA)."""

import json

import numpy as np
import pytest

WORDS = [
  "red",
  "green",
  "blue",
  "cat",
  "dog",
  "bird",
  "runs",
  "sits",
  "flies",
  "big",
  "small",
  "old",
  "new",
  "tree",
  "house",
  "river",
  "the",
  "a",
  "and",
  "near",
]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
  """A random 2-layer BERT with its WordPiece tokenizer, and a two-class jsonl task ("is there an animal?")."""
  torch = pytest.importorskip("torch")
  import transformers

  root = tmp_path_factory.mktemp("tiny")
  model_dir, data_dir = root / "model", root / "data"
  model_dir.mkdir()
  data_dir.mkdir()
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
  (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
  transformers.BertTokenizerFast(vocab_file=str(model_dir / "vocab.txt")).save_pretrained(model_dir)
  # the tiny encoder with this tokenizer and task; its MLP (48) and positions (32) as the trainer tests have them
  config = tiny_encoder_config(
    "bert", vocab_size=len(vocab), num_labels=2, intermediate_size=48, max_position_embeddings=32
  )
  torch.manual_seed(0)
  transformers.BertForSequenceClassification(config).save_pretrained(model_dir)

  rng = np.random.default_rng(0)
  for split, n in (("train", 64), ("validation", 32)):
    with open(data_dir / f"{split}.jsonl", "w") as f:
      for _ in range(n):
        words = list(rng.choice(WORDS, size=int(rng.integers(3, 8))))
        label = int(any(w in ("cat", "dog", "bird") for w in words))
        f.write(json.dumps({"sentence": " ".join(words), "label": label}) + "\n")
  return str(model_dir), str(data_dir)


def tiny_run_args(tiny, output_dir) -> list[str]:
  """The `key=value` arguments that point a trainer run at the `tiny` model and data (two classes, length 16, batch
  8); each test adds its own steps, rates and method after them."""
  model_dir, data_dir = tiny
  return [
    f"output_dir={output_dir}",
    f"model.name={model_dir}",
    "data.task=local",
    f"data.data_dir={data_dir}",
    "data.num_labels=2",
    "data.max_length=16",
    "train.batch_size=8",
    "train.eval_batch_size=16",
  ]


# The tiny Tunix decoder of the tests (Qwen3 and Llama3 share these names): 2 layers, width 64, MLP 96, 4 query and 2
# key/value heads of 24, vocab 128.
TUNIX_SIZES = dict(
  num_layers=2,
  vocab_size=128,
  embed_dim=64,
  hidden_dim=96,
  num_heads=4,
  head_dim=24,
  num_kv_heads=2,
  rope_theta=10_000,
  norm_eps=1e-6,
)


# The same decoder in transformers' names (a `Qwen3Config` / `LlamaConfig`), plus the positions transformers sizes its
# tables for. Both sides default to an untied output head.
_HF_NAMES = dict(
  num_layers="num_hidden_layers",
  vocab_size="vocab_size",
  embed_dim="hidden_size",
  hidden_dim="intermediate_size",
  num_heads="num_attention_heads",
  head_dim="head_dim",
  num_kv_heads="num_key_value_heads",
  rope_theta="rope_theta",
  norm_eps="rms_norm_eps",
)
HF_SIZES = {_HF_NAMES[name]: value for name, value in TUNIX_SIZES.items()} | dict(max_position_embeddings=64)


def tiny_tunix_config(family: str, **overrides):
  """The `ModelConfig` of the tests' tiny Tunix model of `family` ("qwen3" or "llama3"): `TUNIX_SIZES` with
  `overrides` (e.g. a tied head, one layer)."""
  import importlib

  module = importlib.import_module(f"tunix.models.{family}.model")
  return module.ModelConfig(**{**TUNIX_SIZES, **overrides})


def tiny_hf_config(family: str, **overrides):
  """transformers' config of the same tiny model of `family` ("qwen3": `Qwen3Config`, "llama3": `LlamaConfig`):
  `HF_SIZES` with `overrides` (transformers' names, e.g. `tie_word_embeddings=True`)."""
  import transformers

  config_class = {"qwen3": transformers.Qwen3Config, "llama3": transformers.LlamaConfig}[family]
  return config_class(**{**HF_SIZES, **overrides})


# The tests' tiny BERT-family encoder in transformers' names (BERT, RoBERTa, ELECTRA and DeBERTa-v2 configs share
# them): 2 layers, width 32, 4 heads, MLP 37, 64 positions, vocab 99, 3 labels.
ENCODER_SIZES = dict(
  vocab_size=99,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=37,
  max_position_embeddings=64,
  num_labels=3,
)


def tiny_encoder_config(model_type: str, **overrides):
  """transformers' config of the tiny encoder for `model_type` ("bert", "roberta", "electra", "deberta-v2", ...):
  `ENCODER_SIZES` with `overrides`."""
  import transformers

  return transformers.AutoConfig.for_model(model_type, **{**ENCODER_SIZES, **overrides})


def tiny_adapted_nnx():
  """(model, provider): two `nnx.Linear`s (4 -> 3 -> 2) with SoRA rank 2, alpha 2 on both, made by `apply_sora`."""
  import jax.numpy as jnp
  from flax import nnx

  import sora_jax

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(4, 3, rngs=rngs), nnx.Linear(3, 2, rngs=rngs)])

    def __call__(self, x):
      for layer in self.layers:
        x = layer(x)
      return x

  provider = sora_jax.SoraProvider(module_path=".*", rank=2, alpha=2.0)
  return sora_jax.apply_sora(Net(nnx.Rngs(0)), provider, jnp.ones((1, 4)), rngs=nnx.Rngs(1)), provider
