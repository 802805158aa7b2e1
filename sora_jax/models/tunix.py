"""Transformers names and weight layouts of Tunix's causal LMs (Qwen3, Llama3), for PEFT export/import and merged
checkpoints.

The names come from Tunix's own checkpoint table, `sora_jax._tunix.checkpoint_table(family, cfg)`:
{transformers key regex: (Tunix key template, (permute, reshape))}. Tunix loads a transformers weight T as

  W = T.transpose(permute).reshape(reshape)        e.g. q_proj: T (n*h, d) -> (d, n*h) -> W (d, n, h)

and this module runs that table backwards: a Tunix weight path (`layers/3/attn/q_proj/w`) gives the transformers key
(`model.layers.3.self_attn.q_proj.weight`) and the tensor. Which of W's axes are the Linear's input features (its first
k axes) is read off the model's own modules: the axes an `Einsum`'s `einsum_str` contracts with the input (d for
q_proj 'BTD,DNH->BTNH', n and h for o_proj 'BTNH,NHD->BTD'), and the first axis of an `nnx.Linear` kernel.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from typing import Any

import numpy as np
from flax import nnx

from sora_jax import _tunix

Path = tuple[Any, ...]

# Tunix family (module under tunix.models) -> (transformers model_type, causal-LM class, the ModelConfig field that
# ties the output head to the embedding).
_FAMILIES = {
  "qwen3": ("qwen3", "Qwen3ForCausalLM", "use_tied_embedding"),
  "llama3": ("llama", "LlamaForCausalLM", "weight_tying"),
}


def _tunix_family(model: Any) -> str:
  module = type(model).__module__
  for cls in type(model).__mro__:  # qwix's apply_lora_to_model wraps the class in a subclass of its own
    match = re.fullmatch(r"tunix\.models\.(\w+)\.model", cls.__module__)
    if match is not None and match[1] in _FAMILIES:
      return match[1]
  raise ValueError(
    f"TunixNaming: {type(model).__name__} ({module}) is not a supported Tunix model; supported: "
    f"{', '.join(f'tunix.models.{f}' for f in sorted(_FAMILIES))}."
  )


def _template_regex(template: str, torch_regex: str) -> re.Pattern:
  """The Tunix key template (`layers.\\1.attn.q_proj.w`) as a regex whose groups are the transformers regex's."""
  groups = _groups(torch_regex)
  parts = re.split(r"\\(\d)", template)
  out = []
  for i, part in enumerate(parts):
    out.append(re.escape(part) if i % 2 == 0 else f"(?P<g{part}>{groups[int(part) - 1]})")
  return re.compile("".join(out))


def _groups(regex: str) -> list[str]:
  """The top-level capture groups of a simple regex, as written (`[0-9]+`, `gate|up|down`)."""
  groups, depth, start = [], 0, 0
  for i, ch in enumerate(regex):
    if ch == "(" and (i == 0 or regex[i - 1] != "\\"):
      if depth == 0:
        start = i + 1
      depth += 1
    elif ch == ")" and regex[i - 1] != "\\":
      depth -= 1
      if depth == 0:
        groups.append(regex[start:i])
  return groups


def _fill(regex: str, values: list[str]) -> str:
  """The one string a simple regex matches once its capture groups are replaced by `values`."""
  out, depth, k, i = [], 0, 0, 0
  while i < len(regex):
    ch = regex[i]
    if ch == "\\" and depth == 0:
      out.append(regex[i + 1])
      i += 2
      continue
    if ch == "(" and (i == 0 or regex[i - 1] != "\\"):
      if depth == 0:
        out.append(values[k])
        k += 1
      depth += 1
    elif ch == ")" and regex[i - 1] != "\\":
      depth -= 1
    elif depth == 0:
      out.append(ch)
    i += 1
  name = "".join(out)
  if re.fullmatch(regex, name) is None:
    raise ValueError(f"could not spell a name matching {regex!r} (got {name!r})")
  return name


@dataclasses.dataclass(frozen=True)
class _Entry:
  torch_regex: str
  template: re.Pattern
  permute: tuple[int, ...] | None
  reshape: tuple[int, ...] | None


class TunixNaming:
  """The naming object of a Tunix Qwen3 / Llama3 model for `sora_jax.save_peft`, `load_peft` and `save_merged`.

  Build it from the model (with or without SoRA applied): `naming = TunixNaming(model)`.

  Attributes:
    family: the Tunix family ('qwen3', 'llama3').
    model_type: transformers' `config.model_type` ('qwen3', 'llama').
    architecture: the transformers causal-LM class ('Qwen3ForCausalLM', 'LlamaForCausalLM').
    task_type: PEFT's task type, "CAUSAL_LM".
  """

  task_type = "CAUSAL_LM"

  def __init__(self, model: nnx.Module):
    self.family = _tunix_family(model)
    self.model_type, self.architecture, self._tie_field = _FAMILIES[self.family]
    self.config = model.config
    self._rope_theta = _tunix.rope_theta(model)
    self._model_module = importlib.import_module(f"tunix.models.{self.family}.model")
    table = _tunix.checkpoint_table(self.family, self.config)  # Tunix's own transformers <-> Tunix table
    self._entries = []
    for torch_regex, (template, transform) in table.items():
      permute, reshape = transform if transform is not None else (None, None)
      self._entries.append(
        _Entry(
          torch_regex,
          _template_regex(template, torch_regex),
          tuple(permute) if permute else None,
          tuple(reshape) if reshape else None,
        )
      )
    self._in_axes: dict[Path, int] = {}
    self._weights: dict[str, Path] | None = None
    for path, module in nnx.iter_modules(model):
      einsum_str = getattr(module, "einsum_str", None)
      if isinstance(einsum_str, str) and hasattr(module, "w"):
        inputs, _ = einsum_str.replace(" ", "").split("->")
        x_sub, w_sub = inputs.split(",")
        contracted = [i for i, c in enumerate(w_sub) if c in x_sub]
        if contracted != list(range(len(contracted))):
          raise ValueError(
            f"TunixNaming: {'/'.join(map(str, path))} contracts weight axes {contracted} of "
            f"{einsum_str!r}; a transformers Linear needs its input axes first."
          )
        self._in_axes[tuple(path) + ("w",)] = len(contracted)
      elif isinstance(module, nnx.Linear):
        self._in_axes[tuple(path) + ("kernel",)] = 1

  def __repr__(self) -> str:
    return f"TunixNaming({self.family}: {self.architecture})"

  def _entry(self, weight: Path) -> tuple[_Entry, str] | None:
    key = ".".join(str(k) for k in weight)
    for entry in self._entries:
      match = entry.template.fullmatch(key)
      if match:
        values = [match[f"g{i + 1}"] for i in range(len(_groups(entry.torch_regex)))]
        return entry, _fill(entry.torch_regex, values)
    return None

  def hf_name(self, weight: Path) -> str | None:
    """The transformers key of a Tunix weight path (`model.layers.0.self_attn.q_proj.weight`), None when Tunix's
    table has no entry for it."""
    found = self._entry(weight)
    return None if found is None else found[1]

  def module_name(self, weight: Path) -> str | None:
    """The transformers module name of the Linear a Tunix weight becomes (`model.layers.0.self_attn.q_proj`)."""
    name = self.hf_name(weight)
    if name is None or not name.endswith(".weight") or weight not in self._in_axes:
      return None
    return name[: -len(".weight")]

  def in_axes(self, weight: Path) -> int:
    """k: the first k axes of the weight are the Linear's input features, the rest its outputs (torch's (out, in)
    weight is `W.reshape(prod(shape[:k]), -1).T`)."""
    if weight not in self._in_axes:
      raise ValueError(
        f"{'/'.join(map(str, weight))} is not the weight of an Einsum or Linear of this {self.family} model."
      )
    return self._in_axes[weight]

  def weight_path(self, module_name: str) -> Path | None:
    """The Tunix weight path of a transformers Linear module name (inverse of `module_name`)."""
    if self._weights is None:
      self._weights = {self.module_name(w): w for w in self._in_axes if self.module_name(w) is not None}
    return self._weights.get(module_name)

  def hf_tensor(self, weight: Path, array: np.ndarray) -> tuple[str, np.ndarray]:
    """(transformers key, tensor) of one Tunix weight: the inverse of Tunix's load transform."""
    found = self._entry(weight)
    if found is None:
      raise ValueError(
        f"{'/'.join(map(str, weight))} has no transformers name in Tunix's {self.family} table "
        f"(tunix.models.{self.family}.params); it cannot be written to a transformers checkpoint."
      )
    entry, name = found
    array = np.asarray(array)
    if entry.reshape is not None:
      k = self.in_axes(weight)
      array = array.reshape(math.prod(array.shape[:k]), math.prod(array.shape[k:]))
    if entry.permute is not None:
      array = array.transpose(np.argsort(entry.permute))
    return name, array

  def hf_config(self) -> dict:
    """config.json of the matching transformers model, with the RoPE theta the model applies.

    Raises:
      ValueError: the model applies another theta than its `ModelConfig.rope_theta` (Tunix alone applies 1e6 whatever
        the config says): transformers would get either the config's theta (other logits than ours) or Tunix's
        (wrong for the checkpoint); fix the model with `sora_jax.models.use_rope_theta(model)`.
    """
    cfg = self.config
    rope_theta = self._rope_theta
    if rope_theta != float(cfg.rope_theta):
      raise ValueError(
        f"this Tunix {self.family} model applies RoPE theta {rope_theta:g} (Tunix's default) but its config says "
        f"{float(cfg.rope_theta):g}; call sora_jax.models.use_rope_theta(model) before training "
        "(sora_jax.models.load_tunix_llama3 does), so that the model and its export agree."
      )
    return {
      "architectures": [self.architecture],
      "model_type": self.model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.hidden_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "rms_norm_eps": cfg.norm_eps,
      "rope_theta": float(rope_theta),
      "hidden_act": "silu",
      "attention_bias": False,
      "tie_word_embeddings": bool(getattr(cfg, self._tie_field)),
      "dtype": "float32",
    }
