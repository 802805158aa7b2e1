"""A transformers Llama checkpoint folder as a Tunix `Llama3` (Flax NNX) that computes what transformers computes.

`load_tunix_llama3(folder)` reads config.json, builds Tunix's `ModelConfig` from it (tied embedding, norm eps, GQA
heads, RoPE theta), loads the weights with Tunix's own safetensors loader, and makes the model apply the config's RoPE
theta (`sora_jax.models.use_rope_theta`; Tunix alone would use 1,000,000). SoRA attaches to the result as to any Tunix
model (`sora_jax.apply_sora`), and `sora_jax.models.TunixNaming(model)` names its weights for PEFT and merged export.

  folder = sora_jax.models.smollm2_135m_instruct()        # SmolLM2-135M-Instruct, converted once from its GGUF
  model = sora_jax.models.load_tunix_llama3(folder)      # logits within 1e-4 of transformers' LlamaForCausalLM
"""

from __future__ import annotations

import json
import os
from typing import Any

from sora_jax import _tunix


def llama3_config(hf_config: dict) -> Any:
  """Tunix's `llama3.ModelConfig` for a transformers Llama config.json (a dict).

  Raises:
    ValueError: not a Llama config, or one that Tunix's Llama3 does not compute (RoPE scaling, biases, another
      activation).
  """
  from tunix.models.llama3 import model as llama3

  if hf_config.get("model_type") != "llama":
    raise ValueError(
      f"load_tunix_llama3 reads Llama checkpoints; config.json has model_type {hf_config.get('model_type')!r}."
    )
  unsupported = {
    "rope_scaling": hf_config.get("rope_scaling") not in (None, {}),
    "attention_bias": bool(hf_config.get("attention_bias", False)),
    "mlp_bias": bool(hf_config.get("mlp_bias", False)),
    "hidden_act": hf_config.get("hidden_act", "silu") != "silu",
  }
  if any(unsupported.values()):
    raise ValueError(
      f"Tunix's Llama3 does not compute this checkpoint's {', '.join(k for k, v in unsupported.items() if v)} "
      f"({ {k: hf_config.get(k) for k, v in unsupported.items() if v} }); it would give other logits than transformers."
    )
  heads = hf_config["num_attention_heads"]
  return llama3.ModelConfig(
    num_layers=hf_config["num_hidden_layers"],
    vocab_size=hf_config["vocab_size"],
    embed_dim=hf_config["hidden_size"],
    hidden_dim=hf_config["intermediate_size"],
    num_heads=heads,
    head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
    num_kv_heads=hf_config.get("num_key_value_heads") or heads,
    rope_theta=hf_config.get("rope_theta", 10_000.0),
    norm_eps=hf_config["rms_norm_eps"],
    weight_tying=bool(hf_config.get("tie_word_embeddings", False)),
  )


def load_tunix_llama3(folder: str | os.PathLike, dtype: Any = None) -> Any:
  """Tunix `Llama3` with the weights of the transformers checkpoint in `folder`, applying the config's RoPE theta.

  Args:
    folder: config.json + model*.safetensors of a `LlamaForCausalLM`.
    dtype: the weights' dtype (None: as stored).
  """
  from tunix.models.llama3 import params

  path = os.path.join(os.fspath(folder), "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{folder}: no config.json; give the folder of a transformers Llama checkpoint.")
  with open(path) as f:
    config = llama3_config(json.load(f))
  model = params.create_model_from_safe_tensors(os.fspath(folder), config, dtype=dtype)
  return _tunix.use_rope_theta(model)
