"""BERT-family encoders (BERT, RoBERTa, ELECTRA discriminator) as Flax linen modules.

The three share one block layout; they differ in position ids (RoBERTa counts from `pad_token_id + 1` and skips
padding), in the embedding width (ELECTRA's `embedding_size` with a projection to `hidden_size`) and in the head:
BERT pools the first token through dense-tanh and classifies; RoBERTa and ELECTRA apply dense-act-dense to the
first token (tanh for RoBERTa, exact GELU for ELECTRA).

Module paths follow transformers' module names (`bert/encoder/layer_0/attention/self/query`), so the checkpoint
mapping is a rename plus a transpose of linear weights and SoRA targets read as in PyTorch. Under `scan_layers`
the layers live at `.../encoder/layer` with a leading layer axis.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sora_jax.models import activations, layers
from sora_jax.models import loading

# The six dense kernels of a block, in both layouts (`layer_<i>` unrolled, `layer` under nn.scan). They match the
# '/'-joined path of the module or of its kernel.
TARGETS = (
  r"(.*/)?encoder/layer(_\d+)?/attention/self/(query|key|value)(/kernel)?",
  r"(.*/)?encoder/layer(_\d+)?/attention/output/dense(/kernel)?",
  r"(.*/)?encoder/layer(_\d+)?/intermediate/dense(/kernel)?",
  r"(.*/)?encoder/layer(_\d+)?/output/dense(/kernel)?",
)

# Kernels that carry a leading layer axis under scan_layers (SoraConfig.stacked).
STACKED = loading.STACKED

# Head parameters a base-model checkpoint does not carry (re.match on the '/'-joined path).
HEAD = (r"classifier(/|$)", r"[^/]+/pooler/")

_MODEL_TYPES = ("bert", "roberta", "electra")


def _classifier_dropout(config) -> float:
  rate = getattr(config, "classifier_dropout", None)
  return config.hidden_dropout_prob if rate is None else rate


_Module = layers.EncoderModule


def position_ids(input_ids, config):
  """Absolute positions; RoBERTa's start at pad_token_id + 1 and padding tokens keep pad_token_id."""
  if config.model_type == "roberta":
    not_pad = (input_ids != config.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + config.pad_token_id
  return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)


class BertEmbeddings(_Module):
  @nn.compact
  def __call__(self, input_ids, token_type_ids, deterministic: bool = True):
    config = self.config
    width = getattr(config, "embedding_size", None) or config.hidden_size
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
      raise NotImplementedError(f"position_embedding_type {config.position_embedding_type!r}")
    x = self._embed(config.vocab_size, width, "word_embeddings")(input_ids)
    x = x + self._embed(config.max_position_embeddings, width, "position_embeddings")(position_ids(input_ids, config))
    x = x + self._embed(config.type_vocab_size, width, "token_type_embeddings")(token_type_ids)
    x = self._layer_norm()(x)
    return nn.Dropout(config.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(_Module):
  @nn.compact
  def __call__(self, x, mask_bias, deterministic: bool = True):
    config = self.config
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads

    def split_heads(y):  # (batch, seq, hidden) -> (batch, seq, heads, head_dim)
      return y.reshape(*y.shape[:2], heads, head_dim)

    # Heads-major layouts, (batch, heads, seq, head_dim) and keys as (batch, heads, head_dim, seq), made explicit
    # so that both products are plain batched matmuls. XLA's CPU backend fused the equivalent einsums over
    # (batch, seq, heads, head_dim) into one slow kernel; with this layout the whole BERT-base forward went from
    # 1.40x to 0.99x of PyTorch's (`python -m bench.compare`, inference table).
    query = split_heads(self._dense(config.hidden_size, "query")(x)).transpose(0, 2, 1, 3)
    key = split_heads(self._dense(config.hidden_size, "key")(x)).transpose(0, 2, 3, 1)
    value = split_heads(self._dense(config.hidden_size, "value")(x)).transpose(0, 2, 1, 3)
    scores = jnp.matmul(query, key) * head_dim**-0.5 + mask_bias  # (batch, heads, q, k)
    # Softmax in float32 also under bf16 compute; it is the step where bf16 loses the most.
    probs = nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
    probs = nn.Dropout(config.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    context = jnp.matmul(probs, value).transpose(0, 2, 1, 3)  # (batch, q, heads, head_dim)
    return context.reshape(*context.shape[:2], config.hidden_size)


class BertAddNorm(_Module):
  """dense -> dropout -> add the residual -> LayerNorm (transformers' BertSelfOutput and BertOutput)."""

  @nn.compact
  def __call__(self, x, residual, deterministic: bool = True):
    x = self._dense(self.config.hidden_size, "dense")(x)
    x = nn.Dropout(self.config.hidden_dropout_prob)(x, deterministic=deterministic)
    return self._layer_norm()(x + residual)


class BertAttention(_Module):
  @nn.compact
  def __call__(self, x, mask_bias, deterministic: bool = True):
    context = BertSelfAttention(self.config, self.dtype, self.param_dtype, name="self")(x, mask_bias, deterministic)
    return BertAddNorm(self.config, self.dtype, self.param_dtype, name="output")(context, x, deterministic)


class BertIntermediate(_Module):
  @nn.compact
  def __call__(self, x):
    hidden = self._dense(self.config.intermediate_size, "dense")(x)
    return activations.by_name(self.config.hidden_act, "hidden_act")(hidden)


class BertLayer(_Module):
  """One transformer block. Under nn.scan (`scanned=True`) it returns `(hidden, None)`."""

  scanned: bool = False

  @nn.compact
  def __call__(self, x, mask_bias, deterministic: bool = True):
    args = (self.config, self.dtype, self.param_dtype)
    x = BertAttention(*args, name="attention")(x, mask_bias, deterministic)
    h = BertIntermediate(*args, name="intermediate")(x)
    x = BertAddNorm(*args, name="output")(h, x, deterministic)
    return (x, None) if self.scanned else x


class BertEncoder(_Module):
  scan_layers: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, x, mask_bias, deterministic: bool = True):
    layer = BertLayer
    if self.remat:
      # argnums count self: (self, x, mask_bias, deterministic)
      layer = nn.remat(layer, static_argnums=(3,), prevent_cse=not self.scan_layers)
    args = (self.config, self.dtype, self.param_dtype)
    if self.scan_layers:
      layers = nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=self.config.num_hidden_layers,
      )
      x, _ = layers(*args, scanned=True, name="layer")(x, mask_bias, deterministic)
      return x
    for i in range(self.config.num_hidden_layers):
      x = layer(*args, name=f"layer_{i}")(x, mask_bias, deterministic)
    return x


class BertPooler(_Module):
  """First token -> dense -> tanh (BERT's pooler)."""

  @nn.compact
  def __call__(self, hidden):
    return jnp.tanh(self._dense(self.config.hidden_size, "dense")(hidden[:, 0]))


class BertModel(_Module):
  """Embeddings, encoder and (for BERT) the pooler; returns `(last hidden state, pooled or None)`."""

  scan_layers: bool = False
  remat: bool = False
  add_pooler: bool = False

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True):
    attention_mask, token_type_ids = layers.default_inputs(input_ids, attention_mask, token_type_ids)
    args = (self.config, self.dtype, self.param_dtype)
    x = BertEmbeddings(*args, name="embeddings")(input_ids, token_type_ids, deterministic)
    if x.shape[-1] != self.config.hidden_size:  # ELECTRA's smaller embeddings
      x = self._dense(self.config.hidden_size, "embeddings_project")(x)
    # Padding keys get the dtype's most negative value added to the scores, as transformers does.
    mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(self.dtype).min)
    hidden = BertEncoder(*args, scan_layers=self.scan_layers, remat=self.remat, name="encoder")(
      x, mask_bias.astype(self.dtype), deterministic
    )
    pooled = BertPooler(*args, name="pooler")(hidden) if self.add_pooler else None
    return hidden, pooled


class FirstTokenHead(_Module):
  """RoBERTa's and ELECTRA's head: first token -> dropout -> dense -> activation -> dropout -> out_proj."""

  activation: Any = jnp.tanh

  @nn.compact
  def __call__(self, hidden, deterministic: bool = True):
    dropout = nn.Dropout(_classifier_dropout(self.config))
    x = dropout(hidden[:, 0], deterministic=deterministic)
    x = self.activation(self._dense(self.config.hidden_size, "dense")(x))
    x = dropout(x, deterministic=deterministic)
    return self._dense(self.config.num_labels, "out_proj")(x)


class BertForSequenceClassification(_Module):
  """Sequence classifier for `config.model_type` in bert, roberta, electra, with that family's head.

  `__call__` returns float32 logits `(batch, num_labels)`; `encode` (use `method="encode"`) returns the encoder's
  last hidden state. The base model sits under the transformers prefix (`bert`, `roberta`, `electra`).
  """

  scan_layers: bool = False
  remat: bool = False

  @nn.compact
  def __call__(
    self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True, return_hidden: bool = False
  ):
    config = self.config
    if config.model_type not in _MODEL_TYPES:
      raise ValueError(f"model_type {config.model_type!r} is not in {_MODEL_TYPES}")
    is_bert = config.model_type == "bert"
    hidden, pooled = BertModel(
      config,
      self.dtype,
      self.param_dtype,
      scan_layers=self.scan_layers,
      remat=self.remat,
      add_pooler=is_bert and not return_hidden,
      name=config.model_type,
    )(input_ids, attention_mask, token_type_ids, deterministic)
    if return_hidden:
      return hidden
    if is_bert:
      pooled = nn.Dropout(_classifier_dropout(config))(pooled, deterministic=deterministic)
      logits = self._dense(config.num_labels, "classifier")(pooled)
    else:
      # transformers' ElectraClassificationHead uses exact GELU whatever hidden_act says.
      activation = jnp.tanh if config.model_type == "roberta" else activations.gelu
      logits = FirstTokenHead(config, self.dtype, self.param_dtype, activation=activation, name="classifier")(
        hidden, deterministic
      )
    return logits.astype(jnp.float32)

  def encode(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True):
    return self(input_ids, attention_mask, token_type_ids, deterministic, return_hidden=True)


def build(
  config, *, dtype=jnp.float32, param_dtype=jnp.float32, scan_layers: bool = False, remat: bool = False
) -> BertForSequenceClassification:
  """The sequence classifier for a transformers BERT, RoBERTa or ELECTRA config."""
  return BertForSequenceClassification(config, dtype, param_dtype, scan_layers=scan_layers, remat=remat)


def _leaf_name(parts: list[str]) -> list[str]:
  """transformers parameter name parts -> ours: LayerNorm weight -> scale, embedding weight -> embedding."""
  *module, leaf = parts
  leaf = {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)  # old TF-converted checkpoints
  if leaf == "bias":
    return [*module, "bias"]
  if module[-1] == "LayerNorm":
    return [*module, "scale"]
  if module[-1].endswith("_embeddings"):
    return [*module, "embedding"]
  return [*module, "kernel"]


def convert(state_dict: dict[str, np.ndarray], config) -> tuple[dict[tuple[str, ...], np.ndarray], list[str]]:
  """transformers state dict -> (flat params keyed by our unrolled paths, unused transformers keys).

  Accepts keys with the base-model prefix (`bert.encoder...`) and without it (sentence-transformers checkpoints);
  linear weights `(out, in)` become kernels `(in, out)`.
  """
  prefix = config.model_type + "."
  base_modules = ("embeddings.", "encoder.", "pooler.", "embeddings_project.")
  flat, unexpected = {}, []
  for key, value in state_dict.items():
    if key.endswith(("position_ids", "token_type_ids")):  # buffers, not parameters
      continue
    name = key[len(prefix) :] if key.startswith(prefix) else key
    if name.startswith(base_modules):
      head = [config.model_type]
    elif name.startswith("classifier."):
      head = []
    else:
      unexpected.append(key)
      continue
    parts = re.sub(r"\.layer\.(\d+)\.", r".layer_\1.", name).split(".")
    path = tuple(head + _leaf_name(parts))
    flat[path] = np.asarray(value).T if path[-1] == "kernel" else np.asarray(value)
  return flat, unexpected


def hf_module_name(path) -> str:
  """Our unrolled module path (`("bert", "encoder", "layer_0", "attention", "self", "query")`) -> the transformers
  module name (`bert.encoder.layer.0.attention.self.query`). A trailing `kernel` is dropped."""
  parts = list(path)
  if parts and parts[-1] == "kernel":
    parts = parts[:-1]
  return ".".join(re.sub(r"^layer_(\d+)$", r"layer.\1", p) for p in parts)
