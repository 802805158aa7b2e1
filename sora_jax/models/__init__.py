"""Flax linen encoders that load transformers checkpoints (BERT, RoBERTa, ELECTRA, DeBERTa-v2/v3), and the naming
objects that tell `sora_jax.peft` the transformers names of our encoders and of Tunix's causal LMs."""

from sora_jax.models.loading import (
  FAMILIES,
  LoadReport,
  Pretrained,
  family_module,
  from_pretrained,
  read_state_dict,
  stack_layers,
  unstack_layers,
)
from sora_jax.models.naming import EncoderNaming
from sora_jax.models.tunix import TunixNaming

__all__ = [
  "EncoderNaming",
  "FAMILIES",
  "LoadReport",
  "Pretrained",
  "TunixNaming",
  "family_module",
  "from_pretrained",
  "read_state_dict",
  "stack_layers",
  "unstack_layers",
]
