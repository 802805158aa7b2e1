"""Transformers names of our linen encoders (BERT, RoBERTa, ELECTRA, DeBERTa-v2), for PEFT export and import.

`sora_jax.peft` knows no model family: it asks a naming object (`sora_jax.PeftNaming`: `module_name(weight path)`,
`in_axes(weight path)`). This one wraps the encoder family modules (`hf_module_name`, `convert`, `HEAD`, `TARGETS`)
and the loader's layer stacking, and adds what only encoders have: a head saved whole (`head`, `convert`) and the
scanned layout (`is_stacked`, `stack`, `unstack`). `sora_jax.models.tunix.TunixNaming` answers the same two questions
for Tunix's causal LMs in the qwix layout.
"""

from __future__ import annotations

from typing import Any

from sora_jax.models import loading

Path = tuple[Any, ...]


class EncoderNaming:
  """The naming object of one of our encoders, from its transformers config (`from_pretrained(...).config`).

  Attributes:
    model_type: transformers' `config.model_type`.
    task_type: PEFT's task type of the sequence classifiers, "SEQ_CLS".
    model_config: the transformers config.
    head: regexes (`re.match` on '/'-joined paths) of the head parameters (classifier, pooler), PEFT's default
      `modules_to_save`.
    targets: regexes of the six dense kernels per block (the default `SoraConfig.targets`).
    stacked: the `SoraConfig.stacked` regex of the scanned layout.
  """

  stacked = loading.STACKED
  task_type = "SEQ_CLS"

  def __init__(self, model_config: Any):
    self.model_config = model_config
    self.model_type = getattr(model_config, "model_type", None)
    self._family = loading.family_module(self.model_type)
    self.head = tuple(self._family.HEAD)
    self.targets = tuple(self._family.TARGETS)

  def __repr__(self) -> str:
    return f"EncoderNaming({self.model_type})"

  def module_name(self, weight: Path) -> str:
    """The transformers name of the module that holds the leaf `weight` of our unrolled tree: a Dense kernel's path
    (`bert/encoder/layer_0/attention/self/query/kernel`) -> its Linear (`bert.encoder.layer.0.attention.self.query`);
    a bias or LayerNorm scale -> its module."""
    return self._family.hf_module_name(tuple(weight)[:-1])

  @staticmethod
  def in_axes(weight: Path) -> int:
    """1: our Dense kernel is (in, out), the transposed (out, in) weight of a transformers Linear."""
    del weight
    return 1

  def convert(self, state_dict: dict) -> tuple[dict, list[str]]:
    """transformers tensors -> ({our unrolled path: array}, unexpected keys), as the family's loader reads them."""
    return self._family.convert(state_dict, self.model_config)

  @staticmethod
  def is_stacked(params) -> bool:
    """True for the scanned layout (a `layer` module with a leading layer axis)."""
    from flax import traverse_util

    return any("layer" in path for path in traverse_util.flatten_dict(params))

  @staticmethod
  def unstack(params) -> dict:
    return loading.unstack_layers(params)

  @staticmethod
  def stack(params) -> dict:
    return loading.stack_layers(params)
