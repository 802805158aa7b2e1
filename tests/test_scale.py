"""bench.scale: the Tunix behaviour its accelerator program relies on, and a 2-layer Qwen3-8B step compiled for 64
fake devices (in a subprocess, so this process keeps its device count)."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bench import scale_model
from conftest import tiny_tunix_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(family: str):
  module = scale_model.tunix_module(family)
  return getattr(module, scale_model._FAMILIES[family])(tiny_tunix_config(family, num_layers=1), rngs=nnx.Rngs(0))


def _constraints(model, mesh) -> int:
  """Sharding constraints in the jaxpr of `model`'s forward."""
  inputs = scale_model.sample_inputs(2, 4)
  graphdef, state = nnx.split(model)
  with jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(lambda state: nnx.merge(graphdef, state)(**inputs)[0])(state)
  return str(jaxpr).count("sharding_constraint")


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_tunix_skips_activation_constraints_on_cpu_and_the_wrap_applies_them(family):
  """Pins Tunix: `shard` is a module-level function the model looks up at call time, and on CPU it returns its input
  (so a plain CPU compile has no activation constraints); inside `activation_sharding` they are there, and after it
  Tunix's own function is back."""
  module = scale_model.tunix_module(family)
  original = module.shard
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  x = jnp.ones((2, 4, 8))
  with jax.set_mesh(mesh), mesh:
    assert module.shard(x, ("fsdp", None, "tp")) is x  # the CPU early return
  model = _tiny(family)
  assert _constraints(model, mesh) == 0
  with scale_model.activation_sharding(mesh):
    assert module.shard is not original
    assert _constraints(model, mesh) >= 4  # q, k, v, attention output, MLP activations, ...
  assert module.shard is original


# Qwen3 weights (Tunix ShardingConfig) and the axes qwix gives their factors: A keeps the contracted (input) axes'
# specs, B the remaining (output) axes', the rank axis replicated.
EXPECTED = {
  "attn/q_proj/w_lora_a": "P('fsdp', None)",
  "attn/q_proj/w_lora_b": "P(None, 'tp', None)",  # w (d, n, h)
  "attn/k_proj/w_lora_a": "P('fsdp', None)",
  "attn/k_proj/w_lora_b": "P(None, 'tp', None)",
  "attn/v_proj/w_lora_a": "P('fsdp', None)",
  "attn/v_proj/w_lora_b": "P(None, 'tp', None)",
  "attn/o_proj/w_lora_a": "P('tp', None, None)",
  "attn/o_proj/w_lora_b": "P(None, 'fsdp')",  # w (n, h, d)
  "mlp/gate_proj/kernel_lora_a": "P('fsdp', None)",
  "mlp/gate_proj/kernel_lora_b": "P(None, 'tp')",  # (d, f)
  "mlp/up_proj/kernel_lora_a": "P('fsdp', None)",
  "mlp/up_proj/kernel_lora_b": "P(None, 'tp')",
  "mlp/down_proj/kernel_lora_a": "P('tp', None)",
  "mlp/down_proj/kernel_lora_b": "P(None, 'fsdp')",  # (f, d)
}


@pytest.fixture(scope="module")
def compiled_report():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "bench.scale",
      "--model",
      "qwen3-8b",
      "--mesh",
      "8x8",
      "--layers",
      "2",
      "--predict",
      "0",
      "--method",
      "sora",
      "lora",
      "--batch",
      "16",
      "--seq",
      "256",
      "--json",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  return {step["method"]: step for step in report["meshes"][0]["steps"]}


@pytest.mark.slow
def test_qwen3_8b_two_layers_on_64_devices(compiled_report):
  sora, lora = compiled_report["sora"], compiled_report["lora"]
  assert abs(sora["peak"] / lora["peak"] - 1) <= 0.01 and abs(sora["flops"] / lora["flops"] - 1) <= 0.01
  for step in (sora, lora):
    assert step["argument"] == step["argument_shard_bytes"]
    assert step["outputs_match_inputs"]
    specs = {re.sub(r"^layers/\d+/|/value$", "", k): v for k, v in step["trainable_specs"].items()}
    assert {k: v for k, v in specs.items() if "_gate" not in k} == EXPECTED
    moments = {k: v for k, v in step["opt_specs"].items() if re.search(r"/(mu|nu)/", k)}
    # Adam's first and second moments of every trainable leaf but the gates (the recipe's gates take their own step)
    assert len(moments) == 2 * len([k for k in step["trainable_specs"] if "_gate" not in k])
    for path, spec in moments.items():
      assert spec == step["trainable_specs"][re.sub(r"^.*?/(mu|nu)/", "", path)], path
  assert all(v == "P(None,)" for k, v in sora["trainable_specs"].items() if "_gate" in k)


@pytest.mark.parametrize("argv, message", [(["--mesh", "64x64"], "at most 2048"), (["--mesh", "8by8"], "fsdp x tp")])
def test_bad_mesh_is_one_line_and_exit_2(argv, message, capsys):
  from bench import scale

  with pytest.raises(SystemExit) as exit_info:
    scale.parse_args(argv)
  assert exit_info.value.code == 2 and message in capsys.readouterr().err
