"""Pins the Tunix behaviour that sora_jax/_tunix.py works around (RoPE theta) or reads from Tunix's private code (the
checkpoint table), and checks the fix on tiny models.

Tunix's Llama3 / Qwen3 ignore `ModelConfig.rope_theta`: if a Tunix upgrade honours it, `test_tunix_ignores_the_
configured_theta` fails and `use_rope_theta` should go. The reference for the fixed model is transformers' own
`LlamaForCausalLM` / `Qwen3ForCausalLM` at the same theta, loaded through `sora_jax.models.load_tunix_llama3` (Llama)
and Tunix's safetensors loader (Qwen3). Random weights on the tests' tiny model (conftest's `tiny_tunix_config` /
`tiny_hf_config`, tied head): 2 layers, hidden 64, 4 query / 2 key-value heads of 24, MLP 96, vocab 128.
"""

import inspect
import json

import numpy as np
import pytest

pytest.importorskip("tunix")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
import tunix  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.models.llama3 import model as llama3  # noqa: E402
from tunix.models.qwen3 import model as qwen3  # noqa: E402
from tunix.models.llama3 import params as llama3_params  # noqa: E402
from tunix.models.qwen3 import params as qwen3_params  # noqa: E402

import sora_jax  # noqa: E402
from sora_jax import _tunix  # noqa: E402
from conftest import tiny_hf_config, tiny_tunix_config  # noqa: E402
from sora_jax.models import TunixNaming, load_tunix_llama3, use_rope_theta  # noqa: E402

SEQ = 24  # long enough for the RoPE frequencies to matter


def _ids() -> np.ndarray:
  return np.random.default_rng(0).integers(0, 128, (2, SEQ))


def _logits(model, ids: np.ndarray) -> np.ndarray:
  batch, seq = ids.shape
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (batch, seq, seq))
  return np.asarray(model(jnp.asarray(ids, jnp.int32), jnp.broadcast_to(jnp.arange(seq), ids.shape), None, mask)[0])


def _tunix_model(family, theta: float, seed: int = 0):
  model_class = llama3.Llama3 if family == "llama3" else qwen3.Qwen3
  return model_class(tiny_tunix_config(family, rope_theta=theta), rngs=nnx.Rngs(seed))


def _hf_checkpoint(family: str, theta: float, directory) -> str:
  torch.manual_seed(0)
  model_class = transformers.LlamaForCausalLM if family == "llama3" else transformers.Qwen3ForCausalLM
  model_class(tiny_hf_config(family, rope_theta=theta, tie_word_embeddings=True)).save_pretrained(directory)
  return str(directory)


def _torch_logits(directory: str, ids: np.ndarray) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def test_version_range():
  major, minor, *_ = (int(p) for p in tunix.__version__.split(".")[:2])
  assert (major, minor) == (0, 1), "sora_jax/_tunix.py is written against google-tunix 0.1.x; re-check use_rope_theta"


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_tunix_ignores_the_configured_theta(family):
  """The upstream behaviour worked around: rope_theta 10,000 and 1,000,000 give the same logits."""
  ids = _ids()
  np.testing.assert_array_equal(_logits(_tunix_model(family, 1e4), ids), _logits(_tunix_model(family, 1e6), ids))
  module = {"llama3": llama3, "qwen3": qwen3}[family]
  assert _tunix.default_rope_theta(_tunix_model(family, 1e4)) == 1e6
  code = module.Attention.block.__code__
  assert "apply_rope" in code.co_names and "apply_rope" in vars(module)  # looked up in the module's globals


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_checkpoint_table_is_the_one_tunix_loads_with(family):
  """`_tunix.checkpoint_table` is Tunix's private `params._get_key_and_transform_mapping(cfg)`, the table its
  safetensors loader reads: its signature, the loader's use of it, and the entries `TunixNaming` runs backwards for the
  tiny model (d 64, 4 query / 2 key-value heads of 24; written out here, not read from Tunix)."""
  params = {"llama3": llama3_params, "qwen3": qwen3_params}[family]
  assert list(inspect.signature(params._get_key_and_transform_mapping).parameters) == ["cfg"]
  assert "_get_key_and_transform_mapping" in params.create_model_from_safe_tensors.__code__.co_names
  layer = r"model\.layers\.([0-9]+)\."
  want = {
    r"model\.embed_tokens\.weight": ("embedder.input_embedding", None),
    r"model\.norm\.weight": ("final_norm.w", None),
    r"lm_head\.weight": ("lm_head.w", ((1, 0), None)),
    layer + r"self_attn\.q_proj\.weight": (r"layers.\1.attn.q_proj.w", ((1, 0), (64, 4, 24))),
    layer + r"self_attn\.k_proj\.weight": (r"layers.\1.attn.k_proj.w", ((1, 0), (64, 2, 24))),
    layer + r"self_attn\.v_proj\.weight": (r"layers.\1.attn.v_proj.w", ((1, 0), (64, 2, 24))),
    layer + r"self_attn\.o_proj\.weight": (r"layers.\1.attn.o_proj.w", ((1, 0), (4, 24, 64))),
    layer + r"input_layernorm\.weight": (r"layers.\1.input_layernorm.w", None),
  }
  for name in ("gate", "up", "down"):
    want[layer + rf"mlp\.{name}_proj\.weight"] = (rf"layers.\1.mlp.{name}_proj.kernel", ((1, 0), None))
  table = _tunix.checkpoint_table(family, tiny_tunix_config(family))
  assert {key: table.get(key) for key in want} == want
  assert table == params._get_key_and_transform_mapping(tiny_tunix_config(family))
  with pytest.raises(ValueError, match="not a Tunix family"):
    _tunix.checkpoint_table("gemma3", tiny_tunix_config(family))


def test_loaded_llama_gives_transformers_logits_at_its_theta(tmp_path):
  directory = _hf_checkpoint("llama3", 1e4, tmp_path)
  ids = _ids()
  model = load_tunix_llama3(directory)
  assert _tunix.rope_theta(model) == 1e4
  want = _torch_logits(directory, ids)
  error = np.abs(_logits(model, ids) - want).max()
  assert error < 1e-5, error
  plain = nnx.clone(model)
  use_rope_theta(plain, 1e6)  # Tunix's behaviour: other logits (small ones: transformers draws weights at std 0.02)
  assert np.abs(_logits(plain, ids) - want).max() > max(1e-3, 100 * error)


def test_qwen3_fixed_at_its_theta_gives_transformers_logits(tmp_path):
  directory = _hf_checkpoint("qwen3", 5e6, tmp_path)
  config = tiny_tunix_config("qwen3", rope_theta=5e6, use_tied_embedding=True)
  model = use_rope_theta(qwen3_params.create_model_from_safe_tensors(directory, config))
  np.testing.assert_allclose(_logits(model, _ids()), _torch_logits(directory, _ids()), atol=1e-4, rtol=0)


def test_the_fix_is_per_model_and_survives_clone_jit_and_sora():
  ids = _ids()
  qwen, llama = _tunix_model("qwen3", 1e6), _tunix_model("llama3", 1e4)
  before = {"qwen": _logits(qwen, ids), "llama": _logits(llama, ids)}
  fixed = use_rope_theta(_tunix_model("llama3", 1e4))
  changed = _logits(fixed, ids)
  assert np.abs(changed - before["llama"]).max() > 1e-4  # small: Tunix draws its MLP kernels as zeros
  # other models, of the same family or another, built before or after, keep Tunix's theta
  np.testing.assert_array_equal(_logits(qwen, ids), before["qwen"])
  np.testing.assert_array_equal(_logits(llama, ids), before["llama"])
  np.testing.assert_array_equal(_logits(_tunix_model("llama3", 1e4), ids), before["llama"])
  assert _tunix.rope_theta(llama) == 1e6 and _tunix.rope_theta(fixed) == 1e4
  # nnx.clone, nnx.jit and qwix's class wrapper keep it
  np.testing.assert_allclose(_logits(nnx.clone(fixed), ids), changed, atol=1e-6)
  np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: _logits_traced(m, x))(fixed, ids)), changed, atol=1e-6)
  provider = sora_jax.SoraProvider(module_path=".*/(q_proj|k_proj)", rank=2, alpha=2.0)
  adapted = sora_jax.apply_sora(fixed, provider, *_call_args(ids[:1, :4]), rngs=nnx.Rngs(0))
  assert _tunix.rope_theta(adapted) == 1e4
  np.testing.assert_allclose(_logits(adapted, ids), changed, atol=1e-6)  # B = 0: the fixed base


def _call_args(ids):
  batch, seq = ids.shape
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (batch, seq, seq))
  return jnp.asarray(ids, jnp.int32), jnp.broadcast_to(jnp.arange(seq), ids.shape), None, mask


def _logits_traced(model, ids):
  return model(*_call_args(ids))[0]


def test_export_config_has_the_applied_theta_or_refuses(tmp_path):
  fixed = use_rope_theta(_tunix_model("llama3", 1e5))
  assert TunixNaming(fixed).hf_config()["rope_theta"] == 1e5
  assert TunixNaming(_tunix_model("qwen3", 1e6)).hf_config()["rope_theta"] == 1e6
  with pytest.raises(ValueError, match=r"applies RoPE theta 1e\+06 .* config says 100000.*use_rope_theta"):
    TunixNaming(_tunix_model("llama3", 1e5)).hf_config()
  provider = sora_jax.SoraProvider(module_path=".*/q_proj", rank=2, alpha=2.0)
  adapted = sora_jax.apply_sora(fixed, provider, *_call_args(_ids()[:1, :4]), rngs=nnx.Rngs(0))
  sora_jax.save_merged(tmp_path, nnx.state(adapted), provider, naming=TunixNaming(adapted))
  assert json.loads((tmp_path / "config.json").read_text())["rope_theta"] == 1e5


def test_errors_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match="not a Tunix"):
    use_rope_theta(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_tunix_llama3(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_scaling": {"rope_type": "llama3"}}))
  with pytest.raises(ValueError, match="rope_scaling"):
    load_tunix_llama3(tmp_path)
