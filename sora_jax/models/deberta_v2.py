"""DeBERTa-v2 / DeBERTa-v3 encoder in Flax linen, with transformers' parameter layout.

Disentangled attention (He et al., 2021, eq. 4) adds to the content score q_i.k_j two relative terms,
  c2p: q_i . k^r_{delta(i, j)}    and    p2c: k_j . q^r_{delta(j, i)},
where q^r, k^r project the (layer-normed) relative embeddings and delta is the log-bucketed relative distance.
All three terms share the scale 1 / sqrt(head_dim * (1 + #relative terms)). Since delta depends on j - i alone, the
relative terms are computed one diagonal of (i, j) at a time (`relative_scores`) rather than with transformers'
gather, whose gradient is a scatter: slow under XLA on CPU.

Module paths follow transformers' module names, so the checkpoint mapping is a rename plus a transpose and SoRA
targets read as in PyTorch:
  deberta/embeddings/..., deberta/encoder/layer_<i>/attention/self/query_proj/kernel (unrolled),
  deberta/encoder/layer/attention/self/query_proj/kernel (under nn.scan, leading layer axis),
  deberta/encoder/rel_embeddings/embedding, deberta/encoder/LayerNorm, deberta/encoder/conv, pooler/dense, classifier.
The conv branch of DeBERTa-v2 xlarge/xxlarge (conv_kernel_size > 0) is supported unrolled only.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.models import activations, layers

# The six dense layers of a block, in both layouts (`layer_<i>` unrolled, `layer` under nn.scan). They match the
# '/'-joined path of the module or of its kernel.
TARGETS = (
  r"(.*/)?encoder/layer(_\d+)?/attention/self/(query_proj|key_proj|value_proj)(/kernel)?",
  r"(.*/)?encoder/layer(_\d+)?/attention/output/dense(/kernel)?",
  r"(.*/)?encoder/layer(_\d+)?/intermediate/dense(/kernel)?",
  r"(.*/)?encoder/layer(_\d+)?/output/dense(/kernel)?",
)

# Head parameters a base-model checkpoint does not carry (re.match on the '/'-joined path).
HEAD = (r"classifier(/|$)", r"pooler/")


def _pos_att_type(config) -> tuple[str, ...]:
  kinds = getattr(config, "pos_att_type", None) or ()
  if isinstance(kinds, str):
    kinds = kinds.lower().split("|")
  return tuple(k.strip() for k in kinds)


def _max_relative_positions(config) -> int:
  max_relative = getattr(config, "max_relative_positions", -1)
  return config.max_position_embeddings if max_relative < 1 else max_relative


def _position_buckets(config) -> int:
  return getattr(config, "position_buckets", -1)


def _attention_span(config) -> int:
  """Half the number of relative embeddings a layer reads (transformers' `pos_ebd_size`)."""
  buckets = _position_buckets(config)
  return buckets if buckets > 0 else _max_relative_positions(config)


def _norm_rel_ebd(config) -> tuple[str, ...]:
  return tuple(x.strip() for x in getattr(config, "norm_rel_ebd", "none").lower().split("|"))


def log_bucket_position(relative_pos: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
  """Maps relative distances to log-spaced buckets as DeBERTa does.

  Distances with |d| < bucket_size // 2 stay exact; larger ones are bucketed logarithmically up to max_position.
  The arithmetic is float32, like the reference, so the ceil lands on the same integers.
  """
  sign = np.sign(relative_pos)
  mid = bucket_size // 2
  abs_pos = np.where((relative_pos < mid) & (relative_pos > -mid), mid - 1, np.abs(relative_pos))
  ratio = abs_pos.astype(np.float32) / np.float32(mid)
  with np.errstate(divide="ignore"):  # log(0) when mid == 1; those entries take the exact branch below
    log_ratio = np.log(ratio) / np.log(np.float32((max_position - 1) / mid))
  log_pos = np.ceil(log_ratio * np.float32(mid - 1)) + np.float32(mid)
  return np.where(abs_pos <= mid, relative_pos.astype(np.float32), log_pos * sign).astype(np.int32)


def relative_positions(seq_len: int, bucket_size: int = -1, max_position: int = -1) -> np.ndarray:
  """Relative positions q - k, bucketed when both sizes are positive. Returns (seq_len, seq_len) int32."""
  ids = np.arange(seq_len, dtype=np.int64)
  relative = ids[:, None] - ids[None, :]
  if bucket_size > 0 and max_position > 0:
    return log_bucket_position(relative, bucket_size, max_position)
  return relative.astype(np.int32)


_Module = layers.EncoderModule


class DebertaV2Embeddings(_Module):
  """Word (+ absolute position when position_biased_input) (+ token type) embeddings, projection, LayerNorm, mask."""

  @nn.compact
  def __call__(self, input_ids, token_type_ids, attention_mask, deterministic: bool = True):
    config = self.config
    embedding_size = getattr(config, "embedding_size", None) or config.hidden_size
    embeddings = self._embed(config.vocab_size, embedding_size, "word_embeddings")(input_ids)
    if getattr(config, "position_biased_input", True):
      positions = jnp.arange(input_ids.shape[-1])[None, :]
      embeddings = embeddings + self._embed(config.max_position_embeddings, embedding_size, "position_embeddings")(
        positions
      )
    if config.type_vocab_size > 0:
      embeddings = embeddings + self._embed(config.type_vocab_size, embedding_size, "token_type_embeddings")(
        token_type_ids
      )
    if embedding_size != config.hidden_size:
      embeddings = self._dense(config.hidden_size, "embed_proj", use_bias=False)(embeddings)
    embeddings = self._layer_norm("LayerNorm")(embeddings)
    # The reference zeroes padded positions after the LayerNorm.
    embeddings = embeddings * attention_mask[..., None].astype(embeddings.dtype)
    return nn.Dropout(config.hidden_dropout_prob)(embeddings, deterministic=deterministic)


def _diagonal_rows(index: np.ndarray) -> np.ndarray | None:
  """The row of each diagonal of a Toeplitz index, or None when `index` is not Toeplitz.

  index: (q, k) int with index[i, j] a function of j - i alone. Returns rows: (q + k - 1,) with
  index[i, j] == rows[j - i + q - 1].
  """
  q, k = index.shape
  rows = np.concatenate([index[::-1, 0], index[0, 1:]])
  i, j = np.indices(index.shape)
  return rows if np.array_equal(rows[j - i + q - 1], index) else None


def _skew(diagonals, k: int):
  """(..., q, q + k - 1) -> (..., q, k): out[..., i, j] = diagonals[..., i, j - i + q - 1].

  Row i of the result starts q - 1 - i entries into row i of the input. Flattening the rows and re-reading them
  with a stride one shorter applies every shift at once (the "relative shift" of Transformer-XL), so the selection
  is reshapes and slices, and its transpose is a pad; an XLA gather's transpose is a scatter, which is slow.
  """
  q, width = diagonals.shape[-2:]
  if q == 1:
    return diagonals
  flat = diagonals.reshape(*diagonals.shape[:-2], q * width)[..., q - 1 : q - 1 + q * (width - 1)]
  return flat.reshape(*diagonals.shape[:-2], q, width - 1)[..., :k]


def _select_rows(pos, rows: tuple[int, ...]):
  """pos[..., rows, :] for static rows; a slice when rows run by +-1 (the unbucketed case)."""
  lo, hi = min(rows), max(rows)
  steps = set(np.diff(rows).tolist())
  if steps <= {1}:
    return pos[..., lo : hi + 1, :]
  if steps == {-1}:
    return pos[..., lo : hi + 1, :][..., ::-1, :]
  return jnp.take(pos, np.asarray(rows), axis=-2)


def _diagonal_products(content, pos, rows: tuple[int, ...]):
  """content (..., q, d) against pos[rows] (..., q + k - 1, d): the (..., q, q + k - 1) scores of every diagonal."""
  return content @ jnp.swapaxes(_select_rows(pos, rows), -1, -2)


def _scores_by_diagonals(content, pos, rows: tuple[int, ...], k: int):
  """One product per diagonal, then _skew."""
  return _skew(_diagonal_products(content, pos, rows), k)


def gathered_scores(content, pos, index: np.ndarray):
  """The same scores as `relative_scores`, the plain way: content against every position row, then an XLA gather
  of each (i, j) entry (what transformers' PyTorch model does). Any index; slow to differentiate on CPU."""
  scores = content @ jnp.swapaxes(pos, -1, -2)  # (..., q, P)
  return jnp.take_along_axis(scores, jnp.broadcast_to(index, scores.shape[:-1] + index.shape[-1:]), -1)


def _scores_by_gather(content, pos, rows: tuple[int, ...], k: int):
  """gathered_scores against the used position rows lo..hi only."""
  q = content.shape[-2]
  lo, hi = min(rows), max(rows)
  i, j = np.indices((q, k))
  return gathered_scores(content, pos[..., lo : hi + 1, :], np.asarray(rows)[j - i + q - 1] - lo)


def _scores_forward(content, pos, rows: tuple[int, ...], k: int):
  # The diagonal products have q + k - 1 columns, the gathered ones hi - lo + 1. With few distinct rows (long
  # sequences, log buckets) the gather's product is the smaller one and wins; otherwise the skew wins.
  if len(rows) <= 1.5 * (max(rows) - min(rows) + 1):
    return _scores_by_diagonals(content, pos, rows, k)
  return _scores_by_gather(content, pos, rows, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _toeplitz_scores(content, pos, rows: tuple[int, ...], k: int):
  return _scores_forward(content, pos, rows, k)


def _toeplitz_scores_fwd(content, pos, rows, k):
  return _scores_forward(content, pos, rows, k), (content, pos)


def _toeplitz_scores_bwd(rows, k, residuals, cotangent):
  # Always through the diagonals: the transpose of _skew is a pad, where the gather's would be a scatter. The padded
  # (..., q, q + k - 1) cotangent is materialised (optimization_barrier) before the two products that read it.
  # Without the barrier XLA fuses the pad into them, and at seq 512 the gradient that reaches the position rows
  # took 1.05x the gather's time instead of 0.92x (docs/results.md, position scores).
  content, pos = residuals
  q = content.shape[-2]
  diagonals = jax.ShapeDtypeStruct(
    jnp.broadcast_shapes(content.shape[:-2], pos.shape[:-2]) + (q, q + k - 1), cotangent.dtype
  )
  (d_diagonals,) = jax.linear_transpose(lambda d: _skew(d, k), diagonals)(cotangent)
  _, vjp = jax.vjp(functools.partial(_diagonal_products, rows=rows), content, pos)
  return vjp(jax.lax.optimization_barrier(d_diagonals))


_toeplitz_scores.defvjp(_toeplitz_scores_fwd, _toeplitz_scores_bwd)


def relative_scores(content, pos, index: np.ndarray):
  """Scores of content vectors against relative-position vectors picked by a static index.

  content: (..., q, d); pos: (..., P, d), broadcasting against content's leading axes; index: (q, k) int in
  [0, P), a NumPy array. Returns (..., q, k) with
      out[..., i, j] = content[..., i, :] . pos[..., index[i, j], :].
  DeBERTa's index depends on j - i alone (it is a bucketed relative distance), so every diagonal of the result
  reads one position row; that is computed as one matmul per diagonal plus a skew rather than with a gather,
  whose gradient is a slow scatter on CPU. Any other index falls back to a gather. The Toeplitz path has a
  hand-written VJP (a `jax.custom_vjp`), so it supports reverse-mode differentiation, not `jax.jvp`.
  """
  index = np.asarray(index)
  if index.ndim != 2 or index.min() < 0 or index.max() >= pos.shape[-2]:
    raise ValueError(
      f"index must be (q, k) with entries in [0, {pos.shape[-2]}); got shape {index.shape} "
      f"and range [{index.min()}, {index.max()}]"
    )
  rows = _diagonal_rows(index)
  if rows is None:
    return gathered_scores(content, pos, index)
  return _toeplitz_scores(content, pos, tuple(rows.tolist()), index.shape[1])


def _split_heads(x, num_heads: int):
  """(..., seq, heads * head_dim) -> (..., heads, seq, head_dim)."""
  x = x.reshape(*x.shape[:-1], num_heads, -1)
  return jnp.swapaxes(x, -2, -3)


class DisentangledSelfAttention(_Module):
  @nn.compact
  def __call__(self, hidden_states, attention_mask, rel_embeddings, deterministic: bool = True):
    """hidden_states: (batch, seq, hidden); attention_mask: (batch, 1, seq, seq) bool;
    rel_embeddings: (2 * span, hidden) or None. Returns (batch, seq, heads*dim)."""
    config = self.config
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "attention_head_size", None) or config.hidden_size // num_heads
    all_head_size = num_heads * head_dim
    kinds = _pos_att_type(config)
    relative_attention = getattr(config, "relative_attention", False)
    share_att_key = getattr(config, "share_att_key", False)

    query_proj = self._dense(all_head_size, "query_proj")
    key_proj = self._dense(all_head_size, "key_proj")
    query = _split_heads(query_proj(hidden_states), num_heads)
    key = _split_heads(key_proj(hidden_states), num_heads)
    value = _split_heads(self._dense(all_head_size, "value_proj")(hidden_states), num_heads)

    scale_factor = 1 + ("c2p" in kinds) + ("p2c" in kinds)
    scale = jnp.sqrt(jnp.float32(head_dim * scale_factor)).astype(query.dtype)
    scores = query @ (jnp.swapaxes(key, -1, -2) / scale)

    if relative_attention:
      span = _attention_span(config)
      # Static: the (q, k) distances depend on the sequence length alone, so they are NumPy, not traced.
      relative_pos = relative_positions(
        hidden_states.shape[-2], _position_buckets(config), _max_relative_positions(config)
      )
      c2p_pos = np.clip(relative_pos + span, 0, 2 * span - 1)  # (q, k)
      p2c_pos = np.clip(-relative_pos + span, 0, 2 * span - 1)  # (k, q) since q and k coincide
      # Only rows lo..hi of the 2 * span relative embeddings are read (half of them at seq 128 in DeBERTa-v3),
      # and each row is projected on its own, so the rest are never projected.
      lo, hi = min(c2p_pos.min(), p2c_pos.min()), max(c2p_pos.max(), p2c_pos.max())
      rel = nn.Dropout(config.hidden_dropout_prob)(rel_embeddings[lo : hi + 1], deterministic=deterministic)
      if share_att_key:
        pos_query_proj, pos_key_proj = query_proj, key_proj
      else:
        pos_key_proj = self._dense(all_head_size, "pos_key_proj") if "c2p" in kinds else None
        pos_query_proj = self._dense(all_head_size, "pos_query_proj") if "p2c" in kinds else None
      if "c2p" in kinds:
        pos_key = _split_heads(pos_key_proj(rel), num_heads)  # (heads, hi - lo + 1, dim)
        c2p = relative_scores(query, pos_key, c2p_pos - lo)  # (batch, heads, q, k)
        scores = scores + c2p / scale
      if "p2c" in kinds:
        pos_query = _split_heads(pos_query_proj(rel), num_heads)
        p2c = relative_scores(key, pos_query, p2c_pos - lo)  # (batch, heads, k, q)
        scores = scores + jnp.swapaxes(p2c, -1, -2) / scale

    # Softmax in float32; masked entries get the dtype's min as in the reference, so a fully padded query row
    # attends uniformly rather than producing NaNs.
    scores = scores.astype(jnp.float32)
    scores = jnp.where(attention_mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    probs = nn.Dropout(config.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    context = probs @ value  # (batch, heads, seq, dim)
    context = jnp.swapaxes(context, -2, -3)
    return context.reshape(*context.shape[:-2], all_head_size)


class DebertaV2SelfOutput(_Module):
  @nn.compact
  def __call__(self, hidden_states, residual, deterministic: bool = True):
    hidden_states = self._dense(self.config.hidden_size, "dense")(hidden_states)
    hidden_states = nn.Dropout(self.config.hidden_dropout_prob)(hidden_states, deterministic=deterministic)
    return self._layer_norm("LayerNorm")(hidden_states + residual)


class DebertaV2Attention(_Module):
  @nn.compact
  def __call__(self, hidden_states, attention_mask, rel_embeddings, deterministic: bool = True):
    common = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    context = DisentangledSelfAttention(**common, name="self")(
      hidden_states, attention_mask, rel_embeddings, deterministic
    )
    return DebertaV2SelfOutput(**common, name="output")(context, hidden_states, deterministic)


class DebertaV2Intermediate(_Module):
  @nn.compact
  def __call__(self, hidden_states):
    hidden_states = self._dense(self.config.intermediate_size, "dense")(hidden_states)
    return activations.by_name(self.config.hidden_act, "hidden_act")(hidden_states)


class DebertaV2Layer(_Module):
  """One encoder block. The call signature (carry, *broadcast) -> (carry, None) suits nn.scan."""

  @nn.compact
  def __call__(self, hidden_states, attention_mask, rel_embeddings, deterministic: bool = True):
    common = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    attention_output = DebertaV2Attention(**common, name="attention")(
      hidden_states, attention_mask, rel_embeddings, deterministic
    )
    intermediate = DebertaV2Intermediate(**common, name="intermediate")(attention_output)
    layer_output = DebertaV2SelfOutput(**common, name="output")(intermediate, attention_output, deterministic)
    return layer_output, None


class DebertaV2ConvLayer(_Module):
  """The convolution branch after the first block (DeBERTa-v2 xlarge/xxlarge; v3 checkpoints have none)."""

  @nn.compact
  def __call__(self, embeddings, layer_output, input_mask, deterministic: bool = True):
    config = self.config
    kernel_size = getattr(config, "conv_kernel_size", 3)
    padding = (kernel_size - 1) // 2
    out = nn.Conv(
      config.hidden_size,
      (kernel_size,),
      padding=[(padding, padding)],
      feature_group_count=getattr(config, "conv_groups", 1),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="conv",
    )(embeddings)
    mask = input_mask[..., None].astype(out.dtype)
    out = out * mask
    out = nn.Dropout(config.hidden_dropout_prob)(out, deterministic=deterministic)
    out = activations.by_name(getattr(config, "conv_act", "tanh"), "conv_act")(out)
    output = self._layer_norm("LayerNorm")(layer_output + out)
    return output * mask


class DebertaV2Encoder(_Module):
  scan_layers: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, embeddings, input_mask, deterministic: bool = True):
    """embeddings: (batch, seq, hidden); input_mask: (batch, seq) of 0/1. Returns (batch, seq, hidden)."""
    config = self.config
    common = dict(config=config, dtype=self.dtype, param_dtype=self.param_dtype)
    keep = input_mask.astype(bool)
    # Pairwise mask: query i may attend key j when both are real tokens (as the reference builds it).
    attention_mask = keep[:, None, :, None] & keep[:, None, None, :]

    rel_embeddings = None
    if getattr(config, "relative_attention", False):
      table = self._embed(2 * _attention_span(config), config.hidden_size, "rel_embeddings")
      rel_embeddings = jnp.asarray(table.embedding, self.dtype)
      if "layer_norm" in _norm_rel_ebd(config):
        rel_embeddings = self._layer_norm("LayerNorm")(rel_embeddings)

    layer_cls = DebertaV2Layer
    if self.remat:
      # Arguments counted with self at 0: deterministic is static.
      layer_cls = nn.remat(layer_cls, static_argnums=(4,), prevent_cse=not self.scan_layers)

    has_conv = getattr(config, "conv_kernel_size", 0) > 0
    hidden_states = embeddings
    if self.scan_layers:
      if has_conv:
        raise ValueError("scan_layers does not support conv_kernel_size > 0 (the conv follows block 0 only)")
      scanned = nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=config.num_hidden_layers,
      )
      hidden_states, _ = scanned(**common, name="layer")(hidden_states, attention_mask, rel_embeddings, deterministic)
    else:
      for i in range(config.num_hidden_layers):
        hidden_states, _ = layer_cls(**common, name=f"layer_{i}")(
          hidden_states, attention_mask, rel_embeddings, deterministic
        )
        if i == 0 and has_conv:
          hidden_states = DebertaV2ConvLayer(**common, name="conv")(
            embeddings, hidden_states, input_mask, deterministic
          )
    return hidden_states


class ContextPooler(_Module):
  """Dropout, dense and activation on the first token, as transformers' ContextPooler."""

  @nn.compact
  def __call__(self, hidden_states, deterministic: bool = True):
    config = self.config
    context = nn.Dropout(getattr(config, "pooler_dropout", 0.0))(hidden_states[:, 0], deterministic=deterministic)
    pooled = self._dense(getattr(config, "pooler_hidden_size", config.hidden_size), "dense")(context)
    return activations.by_name(getattr(config, "pooler_hidden_act", "gelu"), "pooler_hidden_act")(pooled)


class DebertaV2Model(_Module):
  """Embeddings and encoder; returns the last hidden state (batch, seq, hidden)."""

  scan_layers: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True):
    """input_ids, attention_mask, token_type_ids: (batch, seq)."""
    attention_mask, token_type_ids = layers.default_inputs(input_ids, attention_mask, token_type_ids)
    common = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    embeddings = DebertaV2Embeddings(**common, name="embeddings")(
      input_ids, token_type_ids, attention_mask, deterministic
    )
    encoder = DebertaV2Encoder(**common, scan_layers=self.scan_layers, remat=self.remat, name="encoder")
    return encoder(embeddings, attention_mask, deterministic)


class DebertaV2ForSequenceClassification(_Module):
  """DeBERTa-v2/v3 encoder (under `deberta/`) with ContextPooler and a linear classifier; num_labels == 1 is
  regression. `__call__` returns float32 logits (batch, num_labels); `apply(..., method="encode")` returns the
  last hidden state (batch, seq, hidden)."""

  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    common = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    self.deberta = DebertaV2Model(**common, scan_layers=self.scan_layers, remat=self.remat)
    self.pooler = ContextPooler(**common)
    self.classifier = self._dense(self.config.num_labels, None)
    cls_dropout = getattr(self.config, "cls_dropout", None)
    self.dropout = nn.Dropout(self.config.hidden_dropout_prob if cls_dropout is None else cls_dropout)

  def encode(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True):
    return self.deberta(input_ids, attention_mask, token_type_ids, deterministic)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True):
    hidden_states = self.deberta(input_ids, attention_mask, token_type_ids, deterministic)
    pooled = self.pooler(hidden_states, deterministic)
    pooled = self.dropout(pooled, deterministic=deterministic)
    return self.classifier(pooled).astype(jnp.float32)


def build(config, *, dtype=jnp.float32, param_dtype=jnp.float32, scan_layers=False, remat=False) -> nn.Module:
  """The sequence classifier for a transformers DebertaV2Config (DeBERTa-v2 and v3 checkpoints)."""
  if getattr(config, "conv_kernel_size", 0) > 0 and scan_layers:
    raise ValueError("scan_layers is not supported with conv_kernel_size > 0 (DeBERTa-v2 xlarge/xxlarge)")
  return DebertaV2ForSequenceClassification(
    config, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat
  )


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint conversion: transformers' state dict (PyTorch names, (out, in) Linear weights) -> our parameter tree.

_BASE_PREFIX = "deberta"  # transformers' base_model_prefix for DeBERTa-v2
_BASE_MODULES = ((_BASE_PREFIX, "embeddings"), (_BASE_PREFIX, "encoder"))
_HEAD_MODULES = (("pooler",), ("classifier",))


def hf_module_name(path: tuple[str, ...]) -> str:
  """Our unrolled module path, e.g. ('deberta', 'encoder', 'layer_3', 'attention', 'self', 'query_proj'), -> the
  module name in transformers' DebertaV2ForSequenceClassification, 'deberta.encoder.layer.3.attention.self.query_proj'.
  """
  parts = []
  for part in path:
    match = re.fullmatch(r"layer_(\d+)", part)
    parts.extend(["layer", match.group(1)] if match else [part])
  return ".".join(parts)


def _leaf_name(module: tuple[str, ...], leaf: str) -> str | None:
  """Our leaf name for a transformers parameter `leaf` of `module`; None for buffers and unknown names."""
  if leaf in ("bias", "beta"):
    return "bias"
  if leaf not in ("weight", "gamma"):
    return None
  if module[-1] == "LayerNorm":
    return "scale"
  if module[-1].endswith("embeddings"):
    return "embedding"
  return "kernel"


def _to_ours(leaf: str, weight: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and weight.ndim == 2:  # Linear: (out, in) -> (in, out)
    return weight.T
  if leaf == "kernel" and weight.ndim == 3:  # Conv1d: (out, in / groups, width) -> (width, in / groups, out)
    return weight.transpose(2, 1, 0)
  return weight


def convert(state_dict: dict[str, np.ndarray], config) -> tuple[dict[tuple[str, ...], np.ndarray], list[str]]:
  """Maps a transformers DeBERTa-v2 state dict onto our unrolled parameter paths.

  Reads checkpoints of DebertaV2ForSequenceClassification, of the pretraining models (their masked-LM / RTD heads
  come back as unexpected) and of a bare DebertaV2Model (no `deberta.` prefix); old `gamma`/`beta` LayerNorm names
  too. Linear weights are transposed to (in, out), Conv1d weights to (width, in / groups, out).

  Returns:
    (flat_params, unexpected): {our path tuple: array}, e.g. ('deberta', 'encoder', 'layer_0', 'attention', 'self',
    'query_proj', 'kernel'), and the transformers keys not used.
  """
  uses_positions = getattr(config, "position_biased_input", True)
  flat, unexpected = {}, []
  for key, value in state_dict.items():
    parts = key.split(".")
    if parts[0] in ("embeddings", "encoder"):  # a bare DebertaV2Model checkpoint
      parts = [_BASE_PREFIX] + parts
    module, leaf = _merge_layer_index(tuple(parts[:-1])), parts[-1]
    name = _leaf_name(module, leaf) if module else None
    ours = module[:1] in _HEAD_MODULES or module[:2] in _BASE_MODULES
    # Some v3 checkpoints carry absolute position embeddings that position_biased_input=False never reads.
    if module[1:3] == ("embeddings", "position_embeddings") and not uses_positions:
      ours = False
    if name is None or not ours:
      if not key.endswith("position_ids"):  # a buffer, not a weight
        unexpected.append(key)
      continue
    flat[module + (name,)] = _to_ours(name, np.asarray(value))
  return flat, unexpected


def _merge_layer_index(module: tuple[str, ...]) -> tuple[str, ...]:
  """('deberta', 'encoder', 'layer', '3', ...) -> ('deberta', 'encoder', 'layer_3', ...)."""
  out = []
  for part in module:
    if part.isdigit() and out and out[-1] == "layer":
      out[-1] = f"layer_{part}"
    else:
      out.append(part)
  return tuple(out)
