"""Smoke tests of bench/: the scripts run at toy sizes and print their tables (no timing is asserted), and the
PyTorch SoRA re-implementation that the comparison times computes the same step as sora_jax."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from bench import compare, measure, torch_cases, train_step  # noqa: E402


def test_format_table_aligns_columns():
  text = measure.format_table(["a", "long header"], [[1, "x"], ["wide cell", 2.5]])
  lines = text.splitlines()
  assert len(lines) == 4 and len({len(line) for line in lines}) == 1


def test_measure_step_reports_time_and_memory():
  # Each call touches a fresh 64 MiB buffer, so the peak of the timed calls must stand well above the baseline
  # (less what malloc_trim in the peak reset hands back, a few MiB). The baseline is taken after that trim too: heap
  # that earlier tests in this process freed would otherwise count in the baseline but not in the peak.
  measure.release_free_memory()
  result = measure.measure_step(lambda: np.ones(8 * 2**20).sum(), baseline_mib=measure.rss_mib(), warmup=1, repeats=3)
  assert result["time_s"] > 0 and result["repeats"] == 3
  assert result["peak_mib"] > 32.0, result


def test_sora_linear_matches_formula():
  torch.manual_seed(0)
  base = torch.nn.Linear(6, 5)
  layer = torch_cases.SoraLinear(base, rank=3, alpha=6.0)
  with torch.no_grad():
    layer.b.normal_()
    layer.gate.copy_(torch.tensor([1.0, 0.0, -2.0]))
  x = torch.randn(4, 6)
  a, b, g = (t.detach().numpy() for t in (layer.a, layer.b, layer.gate))
  want = base(x).detach().numpy() + 2.0 * ((x.numpy() @ a.T) * g) @ b.T
  np.testing.assert_allclose(layer(x).detach().numpy(), want, rtol=1e-5, atol=1e-5)


def test_torch_sora_step_matches_optax_chain():
  """One step of the torch port (AdamW, then soft threshold of the gates) equals
  `optax.chain(adamw(mask=not_gate), sora_proximal(lam, learning_rate=lr))` on the same gradients."""
  import jax.numpy as jnp
  import optax
  import sora_jax

  lr, lam = 0.1, 0.5
  gate0 = np.array([1.0, 0.02, -0.03, -2.0], np.float32)
  grad = np.array([0.5, 0.0, 0.1, -0.3], np.float32)
  gate = torch.nn.Parameter(torch.tensor(gate0))
  opt = torch_cases.ProximalAdamW([gate], lr=lr, lam=lam)
  gate.grad = torch.tensor(grad)
  opt.step()

  params = {"dense": {"sora_gate": jnp.asarray(gate0)}}
  not_gate = lambda p: __import__("jax").tree.map(lambda m: not m, sora_jax.gate_mask(p))
  tx = optax.chain(optax.adamw(lr, mask=not_gate), sora_jax.sora_proximal(lam, learning_rate=lr))
  updates, _ = tx.update({"dense": {"sora_gate": jnp.asarray(grad)}}, tx.init(params), params)
  want = optax.apply_updates(params, updates)["dense"]["sora_gate"]
  np.testing.assert_allclose(gate.detach().numpy(), np.asarray(want), rtol=1e-6, atol=1e-6)
  assert gate.detach().numpy()[1] == 0.0  # |0.02| < tau = 0.05: exactly zero


@pytest.mark.slow
def test_train_step_script_prints_table():
  text = train_step.main(["--tiny", "--warmup", "1", "--repeats", "1", "--methods", "floor,factored"])
  assert "| floor" in text and "| factored" in text and "error" not in text
  text = train_step.main(["--tiny", "--warmup", "1", "--repeats", "1", "--methods", "floor,full,merge", "--cost",
                           "--interleave"])
  assert "| full" in text and "| merge" in text and "XLA GFLOP" in text and "error" not in text


@pytest.mark.slow
def test_compare_script_prints_tables():
  text = compare.main(["--tiny", "--models", "bert", "--batch", "2", "--quick", "--jax-methods", "sora",
                       "--torch-methods", "lora"])
  assert "SoRA vs LoRA" in text and "Inference" in text and "error" not in text


@pytest.mark.parametrize("model", ["bert", "deberta"])
def test_inference_cases_run_in_process(model):
  from bench import jax_cases
  spec = {"kind": "inference", "model": model, "batch": 2, "seq": 8, "shape": compare.TINY_SHAPE, "warmup": 1,
          "repeats": 1}
  ours = jax_cases.main(spec)["time_s"]
  theirs = torch_cases.main(spec)["time_s"]
  assert set(ours) == {"base", "sora_merged", "sora_factored"}
  assert set(theirs) == {"base", "lora_merged", "lora_unmerged"}


def test_matmul_script_prints_table():
  from bench import matmul
  text = matmul.main(["--repeats", "1"])
  assert text.count("| (1024,") == len(matmul.SHAPES) and "JAX / torch" in text


def test_relative_scores_script_prints_table():
  from bench import relative_scores
  text = relative_scores.main(["--seq", "8", "--repeats", "1"])
  assert text.count("| 8 ") == 3 and "diagonals / gather" in text
