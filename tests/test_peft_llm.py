"""SoRA on Tunix's Qwen3 and Llama3 out to PyTorch and back: PEFT LoRA export/import and merged checkpoints.

References are independent of our code: transformers' own `Qwen3ForCausalLM` / `LlamaForCausalLM` (random weights,
saved with `save_pretrained`), loaded into Tunix through Tunix's own safetensors loader, and `peft.PeftModel` on the
torch model. The tests' tiny model (conftest's `TUNIX_SIZES` / `HF_SIZES`: 2 layers, hidden 64, 4 query heads of 24,
2 key/value heads (GQA), MLP 96, vocab 128), with tied and untied output heads. Tunix's Qwen3/Llama3 apply RoPE with theta 1e6 whatever `ModelConfig.rope_theta` says,
so the transformers configs use 1e6.
"""

import json

import numpy as np
import pytest

pytest.importorskip("tunix")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.models.llama3 import params as llama3_params  # noqa: E402
from tunix.models.qwen3 import params as qwen3_params  # noqa: E402

import sora_jax  # noqa: E402
from conftest import TUNIX_SIZES, tiny_hf_config, tiny_tunix_config  # noqa: E402
from sora_jax.models.tunix import TunixNaming  # noqa: E402

TOL = 1e-4
VOCAB, SEQ = TUNIX_SIZES["vocab_size"], 10
THETA = 1e6  # the RoPE theta Tunix's Qwen3 / Llama3 apply (see the module docstring)
TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
R_MAX, ALPHA = 8, 16.0
# (Tunix family, tied output head)
CASES = [("qwen3", True), ("qwen3", False), ("llama3", True), ("llama3", False)]


def _hf_model(family: str, tied: bool):
  config = tiny_hf_config(family, rope_theta=THETA, tie_word_embeddings=tied)
  return (transformers.Qwen3ForCausalLM if family == "qwen3" else transformers.LlamaForCausalLM)(config)


def _tunix_from_safetensors(family: str, tied: bool, directory: str) -> nnx.Module:
  """Tunix's own loader, from a local transformers checkpoint."""
  if family == "qwen3":
    config = tiny_tunix_config("qwen3", rope_theta=THETA, use_tied_embedding=tied)
    return qwen3_params.create_model_from_safe_tensors(directory, config)
  config = tiny_tunix_config("llama3", rope_theta=THETA, weight_tying=tied)
  return llama3_params.create_model_from_safe_tensors(directory, config)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """(family, tied) -> directory of a random-weight transformers causal LM (written once)."""
  out = {}
  for i, (family, tied) in enumerate(CASES):
    torch.manual_seed(i)
    directory = str(tmp_path_factory.mktemp(f"{family}_{'tied' if tied else 'untied'}"))
    _hf_model(family, tied).save_pretrained(directory)
    out[family, tied] = directory
  return out


def _ids(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, (2, SEQ))


def _tunix_logits(model: nnx.Module, ids: np.ndarray) -> np.ndarray:
  batch, seq = ids.shape
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (batch, seq, seq))
  return np.asarray(model(jnp.asarray(ids, jnp.int32), jnp.broadcast_to(jnp.arange(seq), ids.shape), None, mask)[0])


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.float().numpy()


def _torch_base(directory: str):
  return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("family,tied", CASES)
def test_tunix_loader_gives_transformers_logits(family, tied, checkpoints):
  directory = checkpoints[family, tied]
  model = _tunix_from_safetensors(family, tied, directory)
  ids = _ids()
  want = _torch_logits(_torch_base(directory), ids)
  np.testing.assert_allclose(_tunix_logits(model, ids), want, atol=TOL, rtol=0)


# --- SoRA with mixed ranks ------------------------------------------------------------------------------------------


def _provider() -> sora_jax.SoraProvider:
  return sora_jax.SoraProvider(module_path=TARGETS, rank=R_MAX, alpha=ALPHA)


def _sora_model(family: str, tied: bool, directory: str, seed: int = 0):
  """The Tunix model with SoRA on all seven projections; B random, gates with 8, 3 or 0 nonzero entries (cycling over
  modules and layers, so every rank occurs in each layer), at random places and values."""
  provider = _provider()
  base = _tunix_from_safetensors(family, tied, directory)
  ids = _ids()[:1, :4]
  model = sora_jax.apply_sora(
    base,
    provider,
    jnp.asarray(ids, jnp.int32),
    jnp.broadcast_to(jnp.arange(4), (1, 4)),
    None,
    jnp.ones((1, 4, 4), bool),
    rngs=nnx.Rngs(seed),
  )
  rng = np.random.default_rng(seed + 10)
  state = nnx.state(model)
  adapters = [path for path, _ in nnx.to_flat_state(state) if str(path[-1]).endswith("_lora_gate")]
  flat = dict(nnx.to_flat_state(state))
  for i, gate_path in enumerate(sorted(adapters, key=lambda p: "/".join(map(str, p)))):
    active = (R_MAX, 3, 0)[i % 3]
    gate = np.zeros(R_MAX, np.float32)
    idx = rng.permutation(R_MAX)[:active]
    gate[idx] = rng.uniform(0.5, 1.5, active) * rng.choice([-1, 1], active)
    flat[gate_path].set_value(jnp.asarray(gate))
    b_path = gate_path[:-1] + (str(gate_path[-1]).replace("_lora_gate", "_lora_b"),)
    b = flat[b_path].get_value()
    flat[b_path].set_value(jnp.asarray(0.3 * rng.standard_normal(b.shape), b.dtype))
  nnx.update(model, state)
  return model, provider


def _expected_ranks(model: nnx.Module, naming: TunixNaming) -> dict[str, int]:
  """transformers module name -> number of nonzero gates, for modules with any (spelled here from Tunix's layout)."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, sora_jax.SoraGate)):
    layer, group, proj = path[1], path[2], path[3]
    count = int((np.asarray(var.get_value()) != 0).sum())
    if count:
      out[f"model.layers.{layer}.{'self_attn' if group == 'attn' else 'mlp'}.{proj}"] = count
  assert sorted(set(out.values())) == [3, 8] and len(out) == 10  # 14 adapters: five at 8, five at 3, four at 0
  return out


@pytest.mark.parametrize("family,tied", [("qwen3", True), ("llama3", False)])
def test_save_peft_loads_in_peft_with_equal_logits(family, tied, checkpoints, tmp_path):
  directory = checkpoints[family, tied]
  model, provider = _sora_model(family, tied, directory)
  naming = TunixNaming(model)
  ids = _ids(1)
  want = _tunix_logits(model, ids)
  assert np.abs(want - _tunix_logits(_tunix_from_safetensors(family, tied, directory), ids)).max() > 1e-2
  for uniform in (False, True):
    out = tmp_path / f"uniform_{uniform}"
    ranks = sora_jax.save_peft(
      out, nnx.state(model), provider, naming=naming, base_model_name_or_path=directory, uniform_rank=uniform
    )
    assert ranks == _expected_ranks(model, naming)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == directory and config["task_type"] == "CAUSAL_LM"
    if uniform:
      assert config["r"] == config["lora_alpha"] == 8 and not config["rank_pattern"] and not config["alpha_pattern"]
    else:
      assert config["rank_pattern"] == config["alpha_pattern"] and set(config["rank_pattern"].values()) == {
        3 if config["r"] == 8 else 8
      }
    torch_model = peft.PeftModel.from_pretrained(_torch_base(directory), str(out)).eval()
    np.testing.assert_allclose(_torch_logits(torch_model, ids), want, atol=TOL, rtol=0)
  # the pure-dict view of the same state writes the same tensors
  from safetensors.numpy import load_file

  sora_jax.save_peft(tmp_path / "pure", nnx.to_pure_dict(nnx.state(model)), provider, naming=naming)
  pure, state = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("pure", "uniform_False"))
  assert pure.keys() == state.keys() and all(np.array_equal(pure[k], state[k]) for k in pure)


@pytest.mark.parametrize("family,tied", [("qwen3", False), ("llama3", True)])
def test_save_merged_loads_in_transformers_with_equal_logits(family, tied, checkpoints, tmp_path):
  directory = checkpoints[family, tied]
  model, provider = _sora_model(family, tied, directory, seed=2)
  ids = _ids(2)
  want = _tunix_logits(model, ids)
  files = sora_jax.save_merged(tmp_path, nnx.state(model), provider, naming=TunixNaming(model), max_shard_size=200_000)
  assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").exists()
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert type(merged).__name__ == TunixNaming(model).architecture
  np.testing.assert_allclose(_torch_logits(merged, ids), want, atol=TOL, rtol=0)


# --- import: any PEFT LoRA onto the Tunix model ---------------------------------------------------------------------


@pytest.mark.parametrize("family,tied", [("qwen3", False), ("llama3", True)])
def test_peft_lora_with_patterns_and_rslora_loads_with_equal_logits(family, tied, checkpoints, tmp_path):
  directory = checkpoints[family, tied]
  torch.manual_seed(3)
  lora = peft.LoraConfig(
    r=4,
    lora_alpha=8,
    use_rslora=True,
    task_type="CAUSAL_LM",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    rank_pattern={"model.layers.0.self_attn.q_proj": 2, "down_proj": 6},
    alpha_pattern={"o_proj": 3, "model.layers.1.mlp.up_proj": 20},
  )
  torch_model = peft.get_peft_model(_torch_base(directory), lora).eval()
  with torch.no_grad():
    for name, param in torch_model.named_parameters():
      if "lora_B" in name:
        param.copy_(0.3 * torch.randn_like(param))
  torch_model.save_pretrained(tmp_path)
  ids = _ids(4)
  want = _torch_logits(torch_model, ids)

  model, provider = _sora_model(family, tied, directory)  # adapters at r_max 8 with random values, overwritten
  naming = TunixNaming(model)
  loaded = sora_jax.load_peft(tmp_path, nnx.state(model), config=provider, naming=naming)
  assert loaded.ranks["model.layers.0.self_attn.q_proj"] == 2 and loaded.ranks["model.layers.1.mlp.down_proj"] == 6
  assert loaded.ranks["model.layers.1.self_attn.q_proj"] == 4 and len(loaded.ranks) == 14
  nnx.update(model, loaded.params)
  gates = [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(model, sora_jax.SoraGate))]
  assert all(np.all(g == 1.0) for g in gates)
  np.testing.assert_allclose(_tunix_logits(model, ids), want, atol=TOL, rtol=0)
  # and back out: the exported adapter gives PEFT the same logits
  sora_jax.save_peft(tmp_path / "again", nnx.state(model), provider, naming=naming, base_model_name_or_path=directory)
  again = peft.PeftModel.from_pretrained(_torch_base(directory), str(tmp_path / "again")).eval()
  np.testing.assert_allclose(_torch_logits(again, ids), want, atol=TOL, rtol=0)


# --- clear errors ---------------------------------------------------------------------------------------------------


def test_errors_name_the_problem(checkpoints, tmp_path):
  from safetensors.numpy import load_file, save_file

  directory = checkpoints["qwen3", True]
  base = _tunix_from_safetensors("qwen3", True, directory)
  model, provider = _sora_model("qwen3", True, directory)
  naming = TunixNaming(model)
  with pytest.raises(ValueError, match="no adapters"):
    sora_jax.save_peft(tmp_path / "none", nnx.state(base), provider, naming=naming)
  with pytest.raises(ValueError, match="no adapters"):
    sora_jax.save_merged(tmp_path / "none", nnx.state(base), provider, naming=naming)
  with pytest.raises(ValueError, match="not a supported Tunix model"):
    TunixNaming(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError, match="naming object"):
    sora_jax.save_peft(tmp_path / "x", nnx.state(model), provider, naming=None)

  adapter = tmp_path / "qwen3"
  sora_jax.save_peft(adapter, nnx.state(model), provider, naming=naming, base_model_name_or_path=directory)
  llama, llama_provider = _sora_model("llama3", False, checkpoints["llama3", False])
  with pytest.raises(ValueError, match="made for a 'qwen3' model"):
    sora_jax.load_peft(adapter, nnx.state(llama), TunixNaming(llama), config=llama_provider)

  tensors = load_file(adapter / "adapter_model.safetensors")
  save_file(
    {k.replace(".layers.1.", ".layers.7."): v for k, v in tensors.items()}, str(adapter / "adapter_model.safetensors")
  )
  with pytest.raises(ValueError, match=r"model\.layers\.7\..* maps to no weight"):
    sora_jax.load_peft(adapter, nnx.state(model), naming, config=provider)


def test_adapter_trained_on_a_quantized_base_exports_like_on_the_float_base(checkpoints, tmp_path):
  """QLoRA (qwix int8 base weights): the adapter alone goes to PEFT, to be served on the float base; the tensors are
  those of the same adapter on the float model."""
  directory = checkpoints["llama3", False]
  model, provider = _sora_model("llama3", False, directory)
  quantized_provider = sora_jax.SoraProvider(
    [sora_jax.SoraRule(module_path=TARGETS, rank=R_MAX, alpha=ALPHA, weight_qtype="int8")]
  )
  base = _tunix_from_safetensors("llama3", False, directory)
  ids = _ids()[:1, :4]
  quantized = sora_jax.apply_sora(
    base,
    quantized_provider,
    jnp.asarray(ids, jnp.int32),
    jnp.broadcast_to(jnp.arange(4), (1, 4)),
    None,
    jnp.ones((1, 4, 4), bool),
    rngs=nnx.Rngs(0),
  )
  adapters = {k: v for k, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
  state = nnx.state(quantized)
  for path, var in nnx.to_flat_state(state):
    if path in adapters:
      var.set_value(adapters[path].get_value())
  assert any(str(p[-1]) == "qvalue" for p, _ in nnx.to_flat_state(state))
  from safetensors.numpy import load_file

  sora_jax.save_peft(tmp_path / "float", nnx.state(model), provider, naming=TunixNaming(model))
  sora_jax.save_peft(tmp_path / "int8", state, quantized_provider, naming=TunixNaming(quantized))
  want, got = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("float", "int8"))
  assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
  with pytest.raises(ValueError, match="quantized"):
    sora_jax.save_merged(tmp_path / "merged", state, quantized_provider, naming=TunixNaming(quantized))
