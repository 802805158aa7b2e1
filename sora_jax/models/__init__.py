"""Flax linen encoders that load transformers checkpoints (BERT, RoBERTa, ELECTRA, DeBERTa-v2/v3), and the naming
objects that tell `sora_jax.peft` the transformers names of our encoders and of Tunix's causal LMs; a Llama GGUF file
or transformers folder loaded into Tunix's Llama3 with the checkpoint's RoPE theta."""

from sora_jax._tunix import use_rope_theta
from sora_jax.models.gguf_checkpoint import convert_gguf, smollm2_135m_instruct
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
from sora_jax.models.tunix_loading import llama3_config, load_tunix_llama3

__all__ = [
  "EncoderNaming",
  "FAMILIES",
  "LoadReport",
  "Pretrained",
  "TunixNaming",
  "convert_gguf",
  "family_module",
  "from_pretrained",
  "llama3_config",
  "load_tunix_llama3",
  "read_state_dict",
  "smollm2_135m_instruct",
  "stack_layers",
  "unstack_layers",
  "use_rope_theta",
]
