"""Tunix behaviour that sora_jax works around, wrapped in one place: the RoPE theta of Tunix's Llama3 and Qwen3.

google-tunix 0.1.7's `Attention.block` (tunix/models/{llama3,qwen3}/model.py) calls the module's `apply_rope(x,
positions, head_dim=...)` without a theta, so RoPE always uses `apply_rope`'s default of 1,000,000 whatever
`ModelConfig.rope_theta` says. That is right for Qwen3 (1e6) but wrong for Llama 3 (500,000) or SmolLM2 (100,000).

`use_rope_theta(model)` fixes one model, not the library: each of its attention modules gets a subclass of Tunix's
`Attention` whose `block` is Tunix's own code run with `apply_rope` bound to the model's theta (nothing copied from
Tunix, no global patched; qwix swaps a model's class the same way). Other models in the process, and new models of the
same family, keep Tunix's behaviour. `rope_theta(model)` says which theta a model applies. `tests/test_tunix_private.py`
pins what this relies on (block reads `apply_rope` from its module's globals and does not pass a theta), so a Tunix
upgrade that changes it fails there first.

`checkpoint_table(family, config)` is Tunix's own transformers <-> Tunix weight table, which its safetensors loader
reads and which Tunix keeps private (`tunix.models.<family>.params._get_key_and_transform_mapping`); the same test file
pins its signature, its entries for a tiny model and that the loader still reads it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import types
from typing import Any

from flax import nnx

_FAMILIES = ("llama3", "qwen3")
# Class attributes of the fixed attention classes: the theta they apply, and Tunix's class they derive from.
_THETA, _BASE = "_sora_jax_rope_theta", "_sora_jax_tunix_attention"


def _family_module(model: Any):
  for cls in type(model).__mro__:  # qwix wraps the class in a subclass of its own
    match = re.fullmatch(r"tunix\.models\.(\w+)\.model", cls.__module__)
    if match is not None and match[1] in _FAMILIES:
      return importlib.import_module(cls.__module__)
  raise ValueError(
    f"{type(model).__name__} is not a Tunix {' / '.join(_FAMILIES)} model; RoPE theta is fixed on those only."
  )


def default_rope_theta(model: Any) -> float:
  """The theta Tunix's `apply_rope` applies when not told (1,000,000 in google-tunix 0.1.7)."""
  return float(inspect.signature(_family_module(model).apply_rope).parameters["rope_theta"].default)


@functools.cache
def _attention_class(base: type, theta: float) -> type:
  """`base` (a Tunix Attention class) whose `block` calls `apply_rope(..., rope_theta=theta)`."""
  block = base.block
  namespace = dict(block.__globals__)
  namespace["apply_rope"] = functools.partial(namespace["apply_rope"], rope_theta=theta)
  fixed = types.FunctionType(block.__code__, namespace, block.__name__, block.__defaults__, block.__closure__)
  fixed = functools.update_wrapper(fixed, block)
  attributes = {"block": fixed, _THETA: theta, _BASE: base, "__module__": base.__module__}
  return type(base.__name__, (base,), attributes)


def _attentions(model: Any, family) -> list:
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, family.Attention)]


def use_rope_theta(model: Any, theta: float | None = None) -> Any:
  """Makes `model` (a Tunix Llama3 / Qwen3) apply RoPE with `theta` (default: `model.config.rope_theta`); in place,
  returns the model. Only this model changes."""
  family = _family_module(model)
  theta = float(model.config.rope_theta if theta is None else theta)
  attentions = _attentions(model, family)
  if not attentions:
    raise ValueError(f"{type(model).__name__} has no {family.__name__}.Attention module to fix.")
  for attention in attentions:
    base = getattr(type(attention), _BASE, type(attention))
    attention.__class__ = _attention_class(base, theta)
  return model


def rope_theta(model: Any) -> float:
  """The RoPE theta `model` (a Tunix Llama3 / Qwen3) applies: set by `use_rope_theta`, else Tunix's default."""
  family = _family_module(model)
  thetas = {getattr(type(a), _THETA, None) for a in _attentions(model, family)}
  if len(thetas) != 1:
    raise ValueError(
      f"{type(model).__name__}'s attention modules apply different RoPE thetas: {sorted(map(str, thetas))}"
    )
  (theta,) = thetas
  return default_rope_theta(model) if theta is None else float(theta)


def checkpoint_table(family: str, config: Any) -> dict[str, tuple[str, tuple[Any, Any] | None]]:
  """Tunix's table from transformers weights to `family`'s ("llama3" or "qwen3") Tunix weights for `config` (its
  `ModelConfig`): {transformers key regex: (Tunix key template, (permute, reshape) or None)}. Tunix's loader reads a
  transformers tensor T matching the regex as `T.transpose(permute).reshape(reshape)` (reshape None: no reshape) into
  the Tunix path the template gives (`\\1` the regex's layer index)."""
  if family not in _FAMILIES:
    raise ValueError(f"{family!r} is not a Tunix family with a checkpoint table here; expected one of {_FAMILIES}.")
  params = importlib.import_module(f"tunix.models.{family}.params")
  return params._get_key_and_transform_mapping(config)
