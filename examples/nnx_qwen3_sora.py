"""Fine-tune a tiny Tunix Qwen3 (Flax NNX) with SoRA on the WordNet glosses shipped in this repository, offline.

The base model is RANDOM-WEIGHT: no registry package carries pretrained decoder weights, so this is a tiny Tunix
`Qwen3` (2 layers, embed 128, 4 query heads and 2 key/value heads of 32, MLP 384) with Tunix's initialisers, except
the MLP kernels, which Tunix initialises to zeros (with LoRA's zero B their adapters would get no gradient) and are
drawn N(0, 1/fan_in) here. What it shows is the workflow on real text and real model code, not a useful model.

Text: the WordNet 3.0 noun glosses of `train/data/wordnet/` (train split for training, validation split for the
held-out loss), tokenised as bytes: token = byte value (vocabulary 256), each gloss preceded by '\\n' (10) and padded
with 0 (no gloss contains a NUL byte); padding is left out of the loss.

SoRA sits on the seven projections of every layer (attention einsums q/k/v/o with weights (d, n, h) / (n, h, d), MLP
nn.Linear gate/up/down) through qwix: `sora_jax.apply_sora`. Training is `nnx.Optimizer(..., wrt=nnx.LoRAParam)` with
`sora_optimizer(gate_lr, lam, adamw(lr))`; Tunix's `PeftTrainer` takes the same model and an
Optax chain (`tests/test_tunix.py`). At the end it prints the rank report, prunes (zero-gate ranks cut), checks that
the pruned model and the merged one (adapters added into the base weights) give the trained model's logits, and writes
the pruned adapter to `<output_dir>/adapter.safetensors` ('/'-joined paths -> arrays) with `adapter_config.json`.

  python examples/nnx_qwen3_sora.py                                # 300 steps, about a minute on 2 CPU cores
  python examples/nnx_qwen3_sora.py --steps 50 --output_dir /tmp/sora_qwen3
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import load_file, save_file
from tunix.models.qwen3 import model as qwen3

import sora_jax

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train", "data", "wordnet")
TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PAD, START = 0, 10


def read_glosses(split: str) -> list[str]:
  with open(os.path.join(DATA_DIR, f"{split}.jsonl"), encoding="utf-8") as f:
    return [json.loads(line)["sentence"] for line in f]


def byte_tokens(texts: list[str], seq: int) -> np.ndarray:
  """(len(texts), seq) int32: '\\n' + UTF-8 bytes of each text, cut to seq or padded with 0."""
  out = np.full((len(texts), seq), PAD, np.int32)
  for i, text in enumerate(texts):
    ids = [START] + list(text.encode("utf-8"))[: seq - 1]
    out[i, : len(ids)] = ids
  return out


def lm_inputs(tokens: np.ndarray) -> dict:
  """Tunix's call arguments for a causal LM: tokens (B, T), positions (B, T), no cache, causal mask (B, T, T)."""
  batch, seq = tokens.shape
  return {
    "input_tokens": jnp.asarray(tokens),
    "positions": jnp.broadcast_to(jnp.arange(seq), (batch, seq)),
    "cache": None,
    "attention_mask": jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (batch, seq, seq)),
  }


def tiny_qwen3(seed: int) -> nnx.Module:
  config = qwen3.ModelConfig(
    num_layers=2,
    vocab_size=256,
    embed_dim=128,
    hidden_dim=384,
    num_heads=4,
    head_dim=32,
    num_kv_heads=2,
    rope_theta=10_000,
    norm_eps=1e-6,
  )
  model = qwen3.Qwen3(config, rngs=nnx.Rngs(seed))
  key = jax.random.key(seed + 1)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, nnx.Linear):  # the MLP kernels (Tunix: zeros)
      key, sub = jax.random.split(key)
      module.kernel.set_value(jax.random.normal(sub, module.kernel.shape) / np.sqrt(module.kernel.shape[0]))
  return model


def loss_fn(model: nnx.Module, inputs: dict) -> jax.Array:
  """Mean next-token cross-entropy over the non-padding targets."""
  logits, _ = model(**inputs)
  targets = inputs["input_tokens"][:, 1:]
  weights = (targets != PAD).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
  return (losses * weights).sum() / weights.sum()


@nnx.jit
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, inputs: dict) -> jax.Array:
  loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, inputs)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def logits_of(model: nnx.Module, inputs: dict) -> jax.Array:
  return model(**inputs)[0]


def adapter_arrays(state: nnx.State) -> dict[str, np.ndarray]:
  """{'/'-joined path: array} of the adapter leaves (A, B, gate) of a model state."""
  return {
    "/".join(map(str, path)): np.asarray(var.get_value())
    for path, var in nnx.to_flat_state(state)
    if "_lora_" in str(path[-1])
  }


def load_adapter(model: nnx.Module, arrays: dict[str, np.ndarray]) -> None:
  """Puts saved adapter leaves (any rank) into a model made by `apply_sora` with the same provider."""
  state = nnx.state(model)
  for path, var in nnx.to_flat_state(state):
    name = "/".join(map(str, path))
    if name in arrays:
      var.set_value(jnp.asarray(arrays[name]))
  nnx.update(model, state)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--alpha", type=float, default=16.0)
  parser.add_argument("--lr", type=float, default=1e-2)
  parser.add_argument("--gate-lr", dest="gate_lr", type=float, default=5e-2, help="the gates' step size eta")
  parser.add_argument(
    "--lam",
    type=float,
    default=0.5,
    help="L1 strength: a gate ends at zero unless |dL/dg| > lam * (RMS of all gate gradients)",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output_dir", default="/tmp/nnx_qwen3_sora")
  return parser.parse_args(argv)


def save_adapter(args, pruned_state) -> tuple[dict, dict]:
  """Writes the pruned adapter's arrays and a small config to `args.output_dir`; (arrays, rank per weight)."""
  os.makedirs(args.output_dir, exist_ok=True)
  adapter = adapter_arrays(pruned_state)
  save_file(adapter, os.path.join(args.output_dir, "adapter.safetensors"))
  ranks = {k[: -len("_lora_a")]: int(v.shape[-1]) for k, v in adapter.items() if k.endswith("_lora_a")}
  with open(os.path.join(args.output_dir, "adapter_config.json"), "w") as f:
    json.dump(
      {
        "base_model": "random-weight tiny Tunix Qwen3 (examples/nnx_qwen3_sora.py, seed %d)" % args.seed,
        "module_path": TARGETS,
        "rank_max": args.rank,
        "alpha": args.alpha,
        "scale": args.alpha / args.rank,
        "ranks": ranks,
      },
      f,
      indent=1,
    )
  return adapter, ranks


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.perf_counter()

  train, valid = byte_tokens(read_glosses("train"), args.seq), byte_tokens(read_glosses("validation")[:128], args.seq)
  print(f"data: {len(train)} train / {len(valid)} validation WordNet glosses as bytes, seq {args.seq}")

  base = tiny_qwen3(args.seed)  # random weights: see the module docstring
  provider = sora_jax.SoraProvider(module_path=TARGETS, rank=args.rank, alpha=args.alpha)
  model = sora_jax.apply_sora(base, provider, **lm_inputs(train[:1, :8]), rngs=nnx.Rngs(args.seed + 2))

  # Gates: the proximal-gradient step on their raw gradient, g <- S_{eta lam}(g - eta dL/dg / rms); AdamW on A and B.
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    sora_jax.sora_optimizer(args.gate_lr, args.lam, optax.adamw(args.lr, weight_decay=0.01)),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

  valid_inputs = lm_inputs(valid)
  print(f"step 0: validation loss {float(loss_fn(model, valid_inputs)):.3f} (uniform over bytes: {np.log(256):.3f})")
  rng = np.random.default_rng(args.seed)
  for step in range(1, args.steps + 1):
    loss = train_step(model, optimizer, lm_inputs(train[rng.integers(0, len(train), args.batch)]))
    if step % 50 == 0 or step == args.steps:
      print(f"step {step}: train loss {float(loss):.3f}, validation loss {float(loss_fn(model, valid_inputs)):.3f}")

  state = nnx.state(model)
  gates = np.concatenate([v.ravel() for k, v in adapter_arrays(state).items() if k.endswith("_lora_gate")])
  print(f"gates exactly zero: {int((gates == 0).sum())} of {gates.size}")
  print(sora_jax.rank_report(state, provider))

  trained = np.asarray(logits_of(model, valid_inputs))
  pruned_state = sora_jax.prune(state, provider)
  pruned = np.asarray(logits_of(nnx.merge(nnx.graphdef(model), pruned_state), valid_inputs))
  merged_model = nnx.clone(base)
  nnx.update(merged_model, sora_jax.merge(state, provider))  # W + s A diag(g) B, no adapter leaves
  merged = np.asarray(logits_of(merged_model, valid_inputs))
  close = lambda x, y: bool(np.allclose(x, y, atol=1e-5, rtol=1e-5))  # float32 rounding of W + delta, relative
  diffs = {
    "pruned_vs_merged": float(np.abs(pruned - merged).max()),
    "pruned_vs_trained": float(np.abs(pruned - trained).max()),
    "equal": close(pruned, merged) and close(pruned, trained),
  }
  print(
    f"max |logit difference| (logits up to {np.abs(trained).max():.1f}): pruned vs merged "
    f"{diffs['pruned_vs_merged']:.2e}, pruned vs trained {diffs['pruned_vs_trained']:.2e}; all within atol = "
    f"rtol = 1e-5: {diffs['equal']}"
  )

  adapter, ranks = save_adapter(args, pruned_state)
  reloaded = sora_jax.apply_sora(base, provider, **lm_inputs(train[:1, :8]), rngs=nnx.Rngs(99))
  load_adapter(reloaded, load_file(os.path.join(args.output_dir, "adapter.safetensors")))
  reloaded_logits = np.asarray(logits_of(reloaded, valid_inputs))
  diffs["reloaded_vs_trained"] = float(np.abs(reloaded_logits - trained).max())
  diffs["equal"] = diffs["equal"] and close(reloaded_logits, trained)
  print(
    f"wrote {args.output_dir}/adapter.safetensors ({sum(v.size for v in adapter.values())} values, ranks "
    f"{min(ranks.values())}-{max(ranks.values())}); reloaded vs trained max |logit difference| "
    f"{diffs['reloaded_vs_trained']:.2e}"
  )
  print(f"done in {time.perf_counter() - start:.0f} s")
  return {"gates_zero": int((gates == 0).sum()), "gates": int(gates.size), **diffs}


if __name__ == "__main__":
  main()
