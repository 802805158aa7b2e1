"""Flax linen encoders that load transformers checkpoints (BERT, RoBERTa, ELECTRA, DeBERTa-v2/v3)."""
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

__all__ = [
    "FAMILIES",
    "LoadReport",
    "Pretrained",
    "family_module",
    "from_pretrained",
    "read_state_dict",
    "stack_layers",
    "unstack_layers",
]
