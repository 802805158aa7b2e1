"""DeBERTa-v2/v3 in Flax against transformers' PyTorch DebertaV2ForSequenceClassification (random weights, CPU)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import traverse_util  # noqa: E402

from conftest import ENCODER_SIZES  # noqa: E402
from sora_jax.models import deberta_v2  # noqa: E402
from sora_jax.models.loading import from_pretrained  # noqa: E402

VOCAB = 100

# DeBERTa-v3-base's shape (relative attention, 256 log buckets, shared keys, c2p|p2c, no absolute positions, no token
# types, LayerNorm on the relative embeddings), scaled down in width and depth.
V3_BASE = dict(
  ENCODER_SIZES,  # conftest's tiny encoder
  vocab_size=VOCAB,
  intermediate_size=64,
  max_position_embeddings=512,
  relative_attention=True,
  position_buckets=256,
  max_relative_positions=-1,
  share_att_key=True,
  pos_att_type=["p2c", "c2p"],
  position_biased_input=False,
  norm_rel_ebd="layer_norm",
  hidden_act="gelu",
  type_vocab_size=0,
  layer_norm_eps=1e-7,
  num_labels=3,
  initializer_range=0.2,  # wider than 0.02 so that logits are O(1) and their comparison means something
)
CONFIGS = {
  "v3-base": V3_BASE,
  # Few buckets and a sequence longer than them: the log-bucketed and clamped positions are exercised.
  "v3-small-buckets-regression": {**V3_BASE, "position_buckets": 8, "max_position_embeddings": 64, "num_labels": 1},
  # DeBERTa-v2-xlarge's shape: the conv branch after block 0 and an embedding projection, with token types.
  "v2-xlarge-conv": {
    **V3_BASE,
    "conv_kernel_size": 3,
    "conv_act": "gelu",
    "embedding_size": 24,
    "type_vocab_size": 2,
    "pooler_hidden_act": "tanh",
  },
  # The first DeBERTa's recipe in the v2 class: absolute positions, separate position projections, no buckets, a
  # relative window smaller than the sequence, no LayerNorm on the relative embeddings.
  "v1-style": {
    **V3_BASE,
    "position_biased_input": True,
    "share_att_key": False,
    "pos_att_type": "c2p|p2c",
    "position_buckets": -1,
    "max_relative_positions": 8,
    "norm_rel_ebd": "none",
    "type_vocab_size": 2,
    "hidden_act": "gelu_new",
  },
  "c2p-only": {**V3_BASE, "pos_att_type": ["c2p"], "share_att_key": False},
  "no-relative-attention": {
    **V3_BASE,
    "relative_attention": False,
    "pos_att_type": None,
    "position_biased_input": True,
    "norm_rel_ebd": "none",
  },
}
TOLERANCE = 1e-4


def _inputs(config, batch=3, seq=24, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, VOCAB, (batch, seq))
  mask = np.ones_like(ids)
  mask[1, seq - 7 :] = 0  # right padding
  mask[2, 5:] = 0  # mostly padding
  ids[mask == 0] = 0
  types = rng.integers(0, max(config.type_vocab_size, 1), (batch, seq))
  return ids, mask, types


@functools.cache
def _checkpoint(name: str, tmp_root: str):
  """Saves a random transformers model for CONFIGS[name]; returns (directory, config, ids, mask, types, outputs)."""
  config = transformers.DebertaV2Config(**CONFIGS[name])
  torch.manual_seed(0)
  model = transformers.DebertaV2ForSequenceClassification(config).eval()
  directory = f"{tmp_root}/{name}"
  model.save_pretrained(directory)
  ids, mask, types = _inputs(config)
  with torch.no_grad():
    out = model(
      torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      token_type_ids=torch.tensor(types) if config.type_vocab_size else None,
      output_hidden_states=True,
    )
  return directory, config, ids, mask, types, out.hidden_states[-1].numpy(), out.logits.numpy()


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("deberta"))


def _hidden_and_logits(model, params, ids, mask, types):
  types = jnp.asarray(types) if model.config.type_vocab_size else None

  @jax.jit
  def both(params, ids, mask, types):
    variables = {"params": params}
    return model.apply(variables, ids, mask, types, method="encode"), model.apply(variables, ids, mask, types)

  hidden, logits = both(params, jnp.asarray(ids), jnp.asarray(mask), types)
  return np.asarray(hidden), np.asarray(logits)


PARITY_CASES = [(name, False) for name in CONFIGS] + [
  ("v3-base", True),
  ("v3-small-buckets-regression", True),
  ("v1-style", True),
]


@pytest.mark.parametrize(
  "name,scan_layers", PARITY_CASES, ids=[f"{n}-{'scan' if s else 'unrolled'}" for n, s in PARITY_CASES]
)
def test_matches_transformers(name, scan_layers, tmp_root):
  directory, config, ids, mask, types, hidden_ref, logits_ref = _checkpoint(name, tmp_root)
  model, params, _, report = from_pretrained(directory, scan_layers=scan_layers)
  assert report.ok and not report.missing_head and not report.unexpected, str(report)
  layer_keys = {p[2] for p in traverse_util.flatten_dict(params) if p[:2] == ("deberta", "encoder")}
  assert ("layer" in layer_keys) == scan_layers and ("layer_0" in layer_keys) != scan_layers

  hidden, logits = _hidden_and_logits(model, params, ids, mask, types)
  assert logits.shape == (ids.shape[0], config.num_labels) and logits.dtype == np.float32
  np.testing.assert_allclose(hidden, hidden_ref, atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(logits, logits_ref, atol=TOLERANCE, rtol=0)


def test_scan_with_conv_is_refused():
  config = transformers.DebertaV2Config(**CONFIGS["v2-xlarge-conv"])
  with pytest.raises(ValueError, match="conv_kernel_size"):
    deberta_v2.build(config, scan_layers=True)


@pytest.mark.parametrize("bucket_size,max_position", [(8, 64), (32, 128), (256, 512)])
def test_log_buckets_match_transformers(bucket_size, max_position):
  from transformers.models.deberta_v2 import modeling_deberta_v2 as reference

  relative = np.arange(-2 * max_position, 2 * max_position + 1)
  ours = deberta_v2.log_bucket_position(relative, bucket_size, max_position)
  theirs = reference.make_log_bucket_position(torch.tensor(relative), bucket_size, max_position).long().numpy()
  np.testing.assert_array_equal(ours, theirs)


def test_base_model_checkpoint_gets_a_fresh_head(tmp_path):
  """A DebertaV2Model checkpoint (no `deberta.` prefix, no head) loads its encoder; the head is reported new."""
  config = transformers.DebertaV2Config(**V3_BASE)
  torch.manual_seed(1)
  base = transformers.DebertaV2Model(config).eval()
  base.save_pretrained(tmp_path)
  model, params, _, report = from_pretrained(str(tmp_path), num_labels=1)
  assert report.ok and not report.unexpected, str(report)
  assert sorted(report.missing_head) == [
    "classifier/bias",
    "classifier/kernel",
    "pooler/dense/bias",
    "pooler/dense/kernel",
  ]
  ids, mask, types = _inputs(config)
  with torch.no_grad():
    reference = base(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  hidden, logits = _hidden_and_logits(model, params, ids, mask, types)
  np.testing.assert_allclose(hidden, reference, atol=TOLERANCE, rtol=0)
  assert logits.shape == (ids.shape[0], 1)


def test_pretraining_heads_and_buffers_are_unexpected():
  config = transformers.DebertaV2Config(**V3_BASE)
  state = {
    "deberta.embeddings.word_embeddings.weight": np.zeros((VOCAB, 32), np.float32),
    "deberta.embeddings.position_embeddings.weight": np.zeros((512, 32), np.float32),  # unread: not biased input
    "deberta.embeddings.position_ids": np.arange(512)[None],
    "lm_predictions.lm_head.dense.weight": np.zeros((32, 32), np.float32),
    "deberta.encoder.layer.1.attention.self.query_proj.weight": np.ones((32, 16), np.float32),
    "deberta.encoder.LayerNorm.gamma": np.ones((32,), np.float32),
  }
  flat, unexpected = deberta_v2.convert(state, config)
  assert sorted(unexpected) == ["deberta.embeddings.position_embeddings.weight", "lm_predictions.lm_head.dense.weight"]
  assert flat[("deberta", "encoder", "layer_1", "attention", "self", "query_proj", "kernel")].shape == (16, 32)
  assert ("deberta", "encoder", "LayerNorm", "scale") in flat
  assert ("deberta", "embeddings", "word_embeddings", "embedding") in flat


def test_targets_and_module_names(tmp_root):
  """TARGETS pick exactly the six dense kernels per block in both layouts; hf_module_name names torch modules."""
  directory, config, *_ = _checkpoint("v3-base", tmp_root)
  torch_modules = dict(transformers.DebertaV2ForSequenceClassification(config).named_modules())
  for scan_layers in (False, True):
    model = deberta_v2.build(config, scan_layers=scan_layers)
    ids = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, jnp.ones_like(ids)))["params"]
    paths = ["/".join(p) for p in traverse_util.flatten_dict(shapes)]
    hits = [p for p in paths if any(re.fullmatch(t, p) for t in deberta_v2.TARGETS)]
    assert all(p.endswith("/kernel") for p in hits)
    assert len(hits) == 6 * (1 if scan_layers else config.num_hidden_layers), hits
    if not scan_layers:
      for path in traverse_util.flatten_dict(shapes):
        assert deberta_v2.hf_module_name(path[:-1]) in torch_modules, path


def test_dropout_remat_and_bf16(tmp_root):
  directory, config, ids, mask, types, hidden_ref, logits_ref = _checkpoint("v3-base", tmp_root)
  model, params, _, _ = from_pretrained(directory, scan_layers=True, remat=True)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)

  @jax.jit
  def train_step(params, key):
    def loss(params):
      logits = model.apply({"params": params}, ids, mask, deterministic=False, rngs={"dropout": key})
      return logits.sum(), logits

    return jax.grad(loss, has_aux=True)(params)

  # Dropout (rate 0.1 in this config) acts only when deterministic=False and differs between keys; gradients flow
  # through remat under scan.
  (grads, first), (_, second) = train_step(params, jax.random.key(0)), train_step(params, jax.random.key(1))
  assert not np.allclose(first, second) and not np.allclose(first, logits_ref)
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))

  model16 = model.clone(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  params16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)

  @jax.jit
  def evaluate(params, params16):
    return model.apply({"params": params}, ids, mask), model16.apply({"params": params16}, ids, mask)

  logits, logits16 = evaluate(params, params16)
  np.testing.assert_allclose(logits, logits_ref, atol=TOLERANCE, rtol=0)  # remat leaves the forward unchanged
  assert logits16.dtype == jnp.float32  # bf16 compute still returns float32 logits near the reference
  np.testing.assert_allclose(logits16, logits_ref, atol=5e-2, rtol=0)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan"])
def test_sora_factored_equals_merged(scan_layers, tmp_root):
  import sora_jax

  directory, config, ids, mask, types, _, _ = _checkpoint("v3-base", tmp_root)
  model, params, _, _ = from_pretrained(directory, scan_layers=scan_layers)
  sora = sora_jax.SoraConfig(rank=4, targets=deberta_v2.TARGETS, stacked=r".*/layer/.*" if scan_layers else None)
  adapted = sora_jax.init(jax.random.key(0), params, sora)
  n_b = sum(1 for p in traverse_util.flatten_dict(adapted) if p[-1] == "sora_b")
  assert n_b == 6 * (1 if scan_layers else config.num_hidden_layers)
  # Nonzero B so that the adapters change the output.
  adapted = jax.tree_util.tree_map_with_path(lambda path, x: x + 0.05 if path[-1].key == "sora_b" else x, adapted)

  @jax.jit
  def hidden_states(params, adapted, ids, mask):
    with sora_jax.factored(sora):
      factored = model.apply({"params": adapted}, ids, mask, method="encode")
    merged = model.apply({"params": sora_jax.merge(adapted, sora)}, ids, mask, method="encode")
    return factored, merged, model.apply({"params": params}, ids, mask, method="encode")

  factored, merged, base = hidden_states(params, adapted, jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(factored, merged, atol=1e-4, rtol=0)
  assert np.abs(factored - base).max() > 1e-2


GRADIENT_CASES = ["v3-base", "v3-small-buckets-regression", "v1-style", "c2p-only"]


@pytest.mark.parametrize("name", GRADIENT_CASES)
def test_gradients_match_transformers(name, tmp_root):
  """Every parameter's gradient against torch autograd: the relative-position scores have a hand-written VJP."""
  directory, config, ids, mask, types, _, _ = _checkpoint(name, tmp_root)
  model, params, _, _ = from_pretrained(directory)
  weights = np.random.default_rng(1).standard_normal((ids.shape[0], config.num_labels)).astype(np.float32)

  torch_model = transformers.DebertaV2ForSequenceClassification.from_pretrained(directory).eval()
  logits = torch_model(
    torch.tensor(ids),
    attention_mask=torch.tensor(mask),
    token_type_ids=torch.tensor(types) if config.type_vocab_size else None,
  ).logits
  (logits * torch.tensor(weights)).sum().backward()
  torch_grads = {k: p.grad.numpy() for k, p in torch_model.named_parameters() if p.grad is not None}
  expected, _ = deberta_v2.convert(torch_grads, config)

  types_ = jnp.asarray(types) if config.type_vocab_size else None
  grads = jax.jit(
    jax.grad(lambda p: (model.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask), types_) * weights).sum())
  )(params)
  flat = traverse_util.flatten_dict(grads)
  assert set(expected) <= set(flat)
  rel = ("deberta", "encoder", "rel_embeddings", "embedding")
  if config.relative_attention:
    assert np.abs(expected[rel]).max() > 1e-3  # the position path is exercised
  for path, want in expected.items():
    np.testing.assert_allclose(flat[path], want, atol=1e-4, rtol=1e-3, err_msg="/".join(path))


def _relative_scores_numpy(content, pos, index):
  q, k = index.shape
  out = np.empty(content.shape[:-1] + (k,), np.float64)
  for i in range(q):
    for j in range(k):
      out[..., i, j] = (content[..., i, :] * pos[..., index[i, j], :]).sum(-1)
  return out


INDEX_CASES = {
  "exact": np.clip(np.arange(9)[:, None] - np.arange(9)[None, :] + 12, 0, 23),
  "reversed": np.clip(np.arange(9)[None, :] - np.arange(9)[:, None] + 12, 0, 23),
  "clamped": np.clip(np.arange(9)[:, None] - np.arange(9)[None, :] + 3, 0, 5),
  "log-buckets": deberta_v2.relative_positions(20, 4, 16) + 8,
  "one-query": np.array([[3, 4, 5, 6]]),
  "not-toeplitz": np.random.default_rng(0).integers(0, 24, (5, 7)),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_relative_scores_and_gradients_match_numpy(case):
  """out[..., i, j] = content_i . pos[index[i, j]] and its VJP, against loops in NumPy."""
  index = INDEX_CASES[case]
  rng = np.random.default_rng(2)
  q, k = index.shape
  content = rng.standard_normal((2, 3, q, 4))
  pos = rng.standard_normal((3, int(index.max()) + 2, 4))
  cotangent = rng.standard_normal((2, 3, q, k))
  out, vjp = jax.vjp(
    lambda c, p: deberta_v2.relative_scores(c, p, index),
    jnp.asarray(content, jnp.float32),
    jnp.asarray(pos, jnp.float32),
  )
  np.testing.assert_allclose(out, _relative_scores_numpy(content, pos, index), atol=1e-5, rtol=0)
  d_content, d_pos = vjp(jnp.asarray(cotangent, jnp.float32))
  want_content = np.zeros_like(content)
  want_pos = np.zeros((2,) + pos.shape)
  for i in range(q):
    for j in range(k):
      want_content[..., i, :] += cotangent[..., i, j, None] * pos[:, index[i, j], :]
      want_pos[..., index[i, j], :] += cotangent[..., i, j, None] * content[..., i, :]
  np.testing.assert_allclose(d_content, want_content, atol=1e-5, rtol=0)
  np.testing.assert_allclose(d_pos, want_pos.sum(0), atol=1e-5, rtol=0)


def test_relative_scores_rejects_an_index_out_of_range():
  with pytest.raises(ValueError, match=r"entries in \[0, 4\)"):
    deberta_v2.relative_scores(jnp.zeros((2, 3)), jnp.zeros((4, 3)), np.array([[0, 4], [1, 2]]))
