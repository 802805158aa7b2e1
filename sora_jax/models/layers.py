"""The base of our linen encoder modules: the config and dtypes every module carries, and its layers built with
transformers' initialisation (normal(initializer_range) kernels and embeddings) so that random-weight models match
the PyTorch references' init and pretrained weights load into the same shapes."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class EncoderModule(nn.Module):
  """Fields shared by every encoder module, and constructors for its layers with transformers' init.

  config: a transformers `PretrainedConfig` (BERT, RoBERTa, ELECTRA, DeBERTa-v2).
  dtype: the compute dtype; param_dtype: the parameters' dtype.
  """

  config: Any
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _dense(self, features: int, name: str | None, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.normal(self.config.initializer_range),
      name=name,
    )

  def _layer_norm(self, name: str = "LayerNorm") -> nn.LayerNorm:
    # use_fast_variance=False: E[(x - mean)^2] as torch computes it, not E[x^2] - mean^2.
    return nn.LayerNorm(
      epsilon=self.config.layer_norm_eps,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      use_fast_variance=False,
      name=name,
    )

  def _embed(self, num: int, features: int, name: str) -> nn.Embed:
    return nn.Embed(
      num,
      features,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      embedding_init=nn.initializers.normal(self.config.initializer_range),
      name=name,
    )


def default_inputs(input_ids: jax.Array, attention_mask: jax.Array | None, token_type_ids: jax.Array | None):
  """`(attention_mask, token_type_ids)`, (batch, seq) each: all ones and all zeros where not given, as transformers."""
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  if token_type_ids is None:
    token_type_ids = jnp.zeros_like(input_ids)
  return attention_mask, token_type_ids
