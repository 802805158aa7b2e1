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
  # 64 MiB of fresh pages per call: at least 32 faults even if every one were a 2 MiB huge page.
  assert result["minor_faults"] >= 32 and result["system_s"] >= 0 and result["user_s"] > 0, result


def test_case_env_adds_each_malloc_tunable_once(monkeypatch):
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  assert measure.case_env(malloc="hugepages")["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert measure.case_env()["GLIBC_TUNABLES"] == ":".join(measure.MALLOC_MODES["retain"])
  assert "GLIBC_TUNABLES" not in measure.case_env(malloc="default")
  assert measure.malloc_setting(measure.case_env(malloc="default")) == "glibc malloc defaults"
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0")
  assert measure.case_env(malloc="hugepages")["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"
  monkeypatch.setenv(
    "GLIBC_TUNABLES", "glibc.malloc.hugetlb=0:glibc.malloc.mmap_max=7"
  )  # the caller's own choice is kept
  tunables = measure.case_env()["GLIBC_TUNABLES"].split(":")
  assert tunables[:2] == ["glibc.malloc.hugetlb=0", "glibc.malloc.mmap_max=7"] and len(tunables) == 4, tunables
  with pytest.raises(ValueError, match="unknown malloc mode 'fast'"):
    measure.case_env(malloc="fast")


_RETAINED_BUFFERS = """
import json, resource, numpy as np
step = lambda: np.ones(8 * 2**20).sum()  # 64 MiB, freed at the end of each call
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  step()
print(json.dumps({"faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4}))
"""


def test_retain_keeps_freed_blocks_so_later_steps_do_not_fault():
  import json
  import platform
  import subprocess
  import sys

  if platform.libc_ver()[0] != "glibc":
    pytest.skip("glibc tunables")
  faults = {}
  for mode in ("default", "retain"):
    env = measure.case_env(malloc=mode)
    env.pop("GLIBC_TUNABLES", None) if mode == "default" else None
    out = subprocess.run(
      [sys.executable, "-c", _RETAINED_BUFFERS], env=env, capture_output=True, text=True, check=True
    ).stdout
    faults[mode] = json.loads(out.splitlines()[-1])["faults_per_step"]
  # 64 MiB mapped anew each call: at least 32 faults (2 MiB pages) and with 4 KiB pages 16,384; kept: next to none.
  assert faults["default"] >= 32 and faults["retain"] < 16, faults


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
  tx = sora_jax.sora_optimizer(lr, lam, gate_update="adam")  # optax.chain(adamw(mask=not_gate), sora_proximal)
  updates, _ = tx.update({"dense": {"sora_gate": jnp.asarray(grad)}}, tx.init(params), params)
  want = optax.apply_updates(params, updates)["dense"]["sora_gate"]
  np.testing.assert_allclose(gate.detach().numpy(), np.asarray(want), rtol=1e-6, atol=1e-6)
  assert gate.detach().numpy()[1] == 0.0  # |0.02| < tau = 0.05: exactly zero


@pytest.mark.slow
def test_train_step_script_prints_table():
  text = train_step.main(["--tiny", "--warmup", "1", "--repeats", "1", "--methods", "floor,factored"])
  assert "| floor" in text and "| factored" in text and "error" not in text
  text = train_step.main(
    ["--tiny", "--warmup", "1", "--repeats", "1", "--methods", "floor,full,merge", "--cost", "--interleave"]
  )
  assert "| full" in text and "| merge" in text and "XLA GFLOP" in text and "error" not in text


def test_round_robin_rotates_the_order_and_collects_each_cases_times():
  calls = []

  class FakeWorker:
    def __init__(self, name, seconds):
      self.name, self.seconds = name, seconds

    def step(self):
      calls.append(self.name)
      return {"time_s": {"step": self.seconds}}

    def stats(self):
      return {"peak_mib": 1.0, "steps": calls.count(self.name)}

  workers = {name: FakeWorker(name, seconds) for name, seconds in (("a", 1.0), ("b", 2.0), ("c", 3.0))}
  result = measure.time_round_robin(workers, rounds=3, pause_s=0.0)
  assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
  assert result["b"] == {"times": {"step": [2.0, 2.0, 2.0]}, "peak_mib": 1.0, "steps": 3}


def test_worker_reports_a_broken_case_as_an_error_and_serves_a_working_one():
  spec = {"kind": "train", "model": "bert", "batch": 2, "seq": 8, "shape": compare.TINY_SHAPE, "warmup": 1}
  workers = measure.start_workers(
    {
      "bad": ("bench.torch_cases", dict(spec, method="no-such-method")),
      "good": ("bench.torch_cases", dict(spec, method="lora")),
    },
    progress=False,
  )
  try:
    assert "unknown method 'no-such-method'" in workers["bad"].info["error"]
    assert workers["bad"].step()["error"] == workers["bad"].error
    assert workers["good"].info["built"] and workers["good"].info["trainable"] > 0
    times = [workers["good"].step()["time_s"]["step"] for _ in range(2)]
    stats = workers["good"].stats()
    assert all(t > 0 for t in times) and stats["steps"] == 2 and stats["peak_mib"] >= 0, stats
    assert "unknown command" in workers["good"].request("jump")["error"]
  finally:
    for worker in workers.values():
      worker.close()


def test_compare_script_prints_tables():
  text = compare.main(
    ["--tiny", "--models", "bert", "--batch", "2", "--quick", "--jax-methods", "sora", "--torch-methods", "lora"]
  )
  assert "SoRA vs LoRA" in text and "Inference" in text and "error" not in text


def test_pairs_layout_times_each_ratio_in_a_pair_and_skips_what_was_timed():
  everything = {"jax": list(compare.JAX_METHODS), "torch": list(compare.TORCH_METHODS)}
  pairs = compare._groups_to_run("pairs", everything)
  assert all(len(cases) == 2 for cases, _ in pairs.values())
  for _, ours, theirs, _ in compare.TRAIN_ROWS:  # every row of the table has a pair of its own
    assert any(set(cases) == {("jax", ours), ("torch", theirs)} for cases, _ in pairs.values())
  assert any(set(cases) == {("jax", "sora"), ("jax", "lora")} for cases, _ in pairs.values())
  # Without torch, the pairs that would hold ours alone again are left out.
  alone = compare._groups_to_run("pairs", {"jax": ["sora", "lora", "full"], "torch": []})
  assert [cases for cases, _ in alone.values()] == [(("jax", "sora"), ("jax", "lora")), (("jax", "full"),)]
  groups = compare._groups_to_run("groups", {"jax": ["sora"], "torch": ["lora"]})
  assert groups == {"adapters": ((("jax", "sora"), ("torch", "lora")), "adapters")}
  assert compare._layout(8, compare.parse_args([])) == "groups"
  assert compare._layout(32, compare.parse_args([])) == "pairs"
  assert compare._layout(32, compare.parse_args(["--layout", "groups"])) == "groups"


def test_side_by_side_takes_both_results_from_the_group_that_timed_them_together():
  sora_a, sora_b, peft, port = ({"times": {"step": [t]}} for t in (1.0, 2.0, 3.0, 4.0))
  cases = {
    ("jax", "sora"): {"sora/port": sora_a, "sora/peft-lora": sora_b},
    ("torch", "lora"): {"sora/peft-lora": peft},
    ("torch", "sora"): {"sora/port": port},
  }
  assert compare._side_by_side(cases, ("jax", "sora"), ("torch", "lora")) == (sora_b, peft, True)
  assert compare._side_by_side(cases, ("jax", "sora"), ("torch", "sora")) == (sora_a, port, True)
  assert compare._side_by_side(cases, ("torch", "lora"), ("torch", "sora")) == (peft, port, False)
  assert compare._side_by_side(cases, ("jax", "full"), ("torch", "lora")) == (None, peft, False)


@pytest.mark.parametrize("model", ["bert", "deberta"])
def test_inference_cases_run_in_process(model):
  from bench import jax_cases

  spec = {
    "kind": "inference",
    "model": model,
    "batch": 2,
    "seq": 8,
    "shape": compare.TINY_SHAPE,
    "warmup": 1,
    "repeats": 1,
  }
  ours = jax_cases.main(spec)["time_s"]
  theirs = torch_cases.main(spec)["time_s"]
  assert set(ours) == {"base", "sora_merged", "sora_factored"}
  assert set(theirs) == {"base", "lora_merged", "lora_unmerged"}
