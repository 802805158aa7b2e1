"""SoRA through qwix on a Tunix Qwen3 against qwix's own LoRA: train step, merged inference, the proximal step's share.

Model: a random-weight Tunix `Qwen3` of `--layers` x `--hidden` (query heads of 128: hidden / 128 of them, half as
many key/value heads; MLP 3 x hidden; untied LM head over `--vocab`), rank 8, alpha 16 on the seven projections of
every layer (attention einsums q/k/v/o, MLP gate/up/down), seq `--seq`, batch `--batch`, float32. Cases, each a
jitted program called as Tunix's PeftTrainer calls its step (`nnx.jit`, the graph cached with `nnx.cached_partial`):

  sora step    next-token loss, gradients w.r.t. A, B and gates (`nnx.LoRAParam`), then
               `sora_jax.sora_optimizer(lr, lam, adamw)` (the trainer's recipe: AdamW on A and B, the gates'
               own proximal step) through `nnx.Optimizer(..., wrt=nnx.LoRAParam)`
  lora step    the same model with `qwix.LoraProvider` (A and B, no gates) and adamw alone
  merged       inference (logits) of the base model whose weights hold W + s A diag(g) B (`sora_jax.merge`)
  base         inference of the base model
  proximal     the recipe's gate update alone on the model's adapter tree, jitted: `sora_jax.sora_optimizer(lr, lam,
               optax.identity())`, the gates' proximal step with every other leaf passed through

All cases run in one process started with the benches' malloc settings (`bench.measure.case_env`), in turn each
round, the order reversed every other round; each timed call follows one untimed call of the same case (as in
`bench.measure.time_interleaved`). Reported: medians over rounds, and the ratios of each round's pair (median and
range). It runs on whatever backend JAX finds (`jax.default_backend()` is printed), so the same command gives a GPU
or TPU table where one is present. It also prints the bytes of the adapted projections' base weights in float32 and
quantized by qwix (`weight_qtype` int8 / nf4): Qwen3's MLP only (Tunix's Qwen3 attention casts its weight with
`jnp.astype`, which qwix's quantized weight does not support) and all seven projections of a Llama3 of the same shape.

  python -m bench.llm                     # 4 layers x 1024, seq 256, batch 4, vocab 32768, 5 rounds
  python -m bench.llm --layers 2 --seq 128 --rounds 3
  python -m bench.llm --quick             # 2 layers x 256, seq 64, batch 2, vocab 1024 (seconds per round)
  python -m bench.llm --smollm2 --seq 128 --batch 4 --rounds 3 --no-memory

With `--smollm2` the model is the real SmolLM2-135M-Instruct (`sora_jax.models.load_tunix_llama3`, Tunix Llama3, 30
layers x 576, vocab 49,152, tied embedding) and one more case runs: PyTorch PEFT LoRA's train step on transformers'
`LlamaForCausalLM` of the same folder, same tokens, rank 8, alpha 16 on the same seven projections, AdamW, torch on
all cores (`peft step`: loss, backward, optimizer step, zero_grad), timed in turn with the JAX cases.
"""

import argparse
import statistics
import subprocess
import sys
import time

from bench import measure

TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
RANK, ALPHA, LR, LAM = 8, 16.0, 1e-3, 0.1
CASES = ("sora step", "lora step", "merged", "base", "proximal")
PEFT_CASE = "peft step"


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--hidden", type=int, default=1024, help="embed dim; a multiple of 128 (heads of 128)")
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument(
    "--vocab",
    type=int,
    default=32768,
    help="Qwen3's own is 151936; smaller keeps the LM head from dominating a CPU step",
  )
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each case first (the first compiles)")
  parser.add_argument("--quick", action="store_true", help="2 layers x 256, seq 64, batch 2, vocab 1024")
  parser.add_argument("--no-memory", action="store_true", help="skip the quantized-base memory table")
  parser.add_argument(
    "--smollm2", action="store_true", help="the real SmolLM2-135M-Instruct, and PyTorch PEFT LoRA on it (see above)"
  )
  parser.add_argument("--malloc", default="retain", choices=sorted(measure.MALLOC_MODES))
  parser.add_argument("--in-process", action="store_true", help="run here, with this process's malloc settings")
  args = parser.parse_args(argv)
  if args.quick:
    args.layers, args.hidden, args.seq, args.batch, args.vocab = 2, 256, 64, 2, 1024
  if args.hidden % 128:
    parser.error(f"--hidden must be a multiple of 128 (query heads of 128), got {args.hidden}")
  return args


def _config(family_module, args):
  heads = args.hidden // 128
  return family_module.ModelConfig(
    num_layers=args.layers,
    vocab_size=args.vocab,
    embed_dim=args.hidden,
    hidden_dim=3 * args.hidden,
    num_heads=heads,
    head_dim=128,
    num_kv_heads=max(1, heads // 2),
    rope_theta=1_000_000,
    norm_eps=1e-6,
  )


def _random_mlp(model, seed: int):
  """Tunix initialises MLP kernels to zeros; draw them N(0, 1/fan_in) so the base is a generic random network."""
  import jax
  import numpy as np
  from flax import nnx

  key = jax.random.key(seed)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, nnx.Linear):
      key, sub = jax.random.split(key)
      module.kernel.set_value(jax.random.normal(sub, module.kernel.shape) / np.sqrt(module.kernel.shape[0]))
  return model


def _inputs(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
  import jax.numpy as jnp
  import numpy as np

  tokens = np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int32)
  return {
    "input_tokens": jnp.asarray(tokens),
    "positions": jnp.broadcast_to(jnp.arange(seq), (batch, seq)),
    "cache": None,
    "attention_mask": jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (batch, seq, seq)),
  }


def build(args) -> dict:
  """The five cases as zero-argument callables that block until their result exists."""
  import jax
  import numpy as np
  import optax
  import qwix
  from flax import nnx
  from tunix.models.qwen3 import model as qwen3

  import sora_jax

  if args.smollm2:
    from sora_jax.models import load_tunix_llama3, smollm2_135m_instruct

    base = load_tunix_llama3(smollm2_135m_instruct())
    args.vocab = base.config.vocab_size
  else:
    base = _random_mlp(qwen3.Qwen3(_config(qwen3, args), rngs=nnx.Rngs(0)), seed=1)
  sample = _inputs(1, 4, args.vocab)
  sora_provider = sora_jax.SoraProvider(module_path=TARGETS, rank=RANK, alpha=ALPHA)
  sora = sora_jax.apply_sora(base, sora_provider, **sample, rngs=nnx.Rngs(2))
  lora = qwix.apply_lora_to_model(
    base, qwix.LoraProvider(module_path=TARGETS, rank=RANK, alpha=ALPHA), **sample, rngs=nnx.Rngs(2)
  )
  inputs = _inputs(args.batch, args.seq, args.vocab, seed=3)

  def loss_fn(model, inputs):
    logits, _ = model(**inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], inputs["input_tokens"][:, 1:]).mean()

  def train_step(model, optimizer, inputs):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, inputs)
    optimizer.update(model, grads)
    return loss

  sora_tx = sora_jax.sora_optimizer(LR, LAM, optax.adamw(LR, weight_decay=0.01))  # the trainer's recipe
  lora_tx = optax.adamw(LR, weight_decay=0.01)
  jitted_step = nnx.jit(train_step, donate_argnames=("optimizer",))
  sora_step = nnx.cached_partial(jitted_step, sora, nnx.Optimizer(sora, sora_tx, wrt=nnx.LoRAParam))
  lora_step = nnx.cached_partial(jitted_step, lora, nnx.Optimizer(lora, lora_tx, wrt=nnx.LoRAParam))

  # Inference: the base model, and a copy holding the merged weights of a SoRA tree with nonzero B and some zero gates.
  state = nnx.state(sora)
  rng = np.random.default_rng(4)
  for path, var in nnx.to_flat_state(state):
    name = str(path[-1])
    if name.endswith("_lora_b"):
      var.set_value(jax.numpy.asarray(0.01 * rng.standard_normal(var.get_value().shape), var.get_value().dtype))
    elif name.endswith("_lora_gate"):
      var.set_value(jax.numpy.asarray((rng.random(var.get_value().shape) > 0.25), var.get_value().dtype))
  merged_model = nnx.clone(base)
  nnx.update(merged_model, sora_jax.merge(state, sora_provider))
  forward = nnx.jit(lambda model, inputs: model(**inputs)[0])
  merged_forward = nnx.cached_partial(forward, merged_model)
  base_forward = nnx.cached_partial(forward, base)

  adapters = nnx.to_pure_dict(nnx.state(sora, nnx.LoRAParam))
  proximal = sora_jax.sora_optimizer(LR, LAM, optax.identity())  # the recipe's gate step alone
  prox_state = proximal.init(adapters)
  prox_update = jax.jit(proximal.update)

  calls = {
    "sora step": lambda: sora_step(inputs).block_until_ready(),
    "lora step": lambda: lora_step(inputs).block_until_ready(),
    "merged": lambda: merged_forward(inputs).block_until_ready(),
    "base": lambda: base_forward(inputs).block_until_ready(),
    "proximal": lambda: jax.block_until_ready(prox_update(adapters, prox_state, adapters)),
  }
  if args.smollm2:
    calls[PEFT_CASE] = _peft_step(np.asarray(inputs["input_tokens"]))
  counts = {
    "adapter params (SoRA)": sum(v.size for v in jax.tree.leaves(adapters)),
    "adapter params (LoRA)": sum(v.size for v in jax.tree.leaves(nnx.state(lora, nnx.LoRAParam))),
    "base params": sum(v.size for v in jax.tree.leaves(nnx.state(base))),
  }
  return {"calls": calls, "counts": counts}


def _peft_step(tokens):
  """PyTorch PEFT LoRA's train step on transformers' SmolLM2 (same folder, tokens, rank, alpha and projections)."""
  import peft
  import torch
  import transformers

  from sora_jax.models import smollm2_135m_instruct

  torch.set_num_threads(measure.cpu_count())
  model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_135m_instruct(), dtype=torch.float32)
  config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(_PROJECTIONS))
  model = peft.get_peft_model(model, config).train()
  optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
  ids = torch.tensor(tokens, dtype=torch.long)

  def step():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)

  return step


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def time_rounds(calls: dict, *, rounds: int, warmup: int, settle: int = 1) -> dict[str, list[float]]:
  """Per-round wall times of each call: cases in turn, order reversed every other round, each timed call after
  `settle` untimed calls of the same case."""
  for call in calls.values():
    for _ in range(warmup):
      call()
  times = {name: [] for name in calls}
  for round_index in range(rounds):
    for name in list(calls) if round_index % 2 == 0 else list(reversed(calls)):
      for _ in range(settle):
        calls[name]()
      start = time.perf_counter()
      calls[name]()
      times[name].append(time.perf_counter() - start)
  return times


def _ratio(times: dict, a: str, b: str) -> tuple[float, float, float, float]:
  """(median(a) / median(b), median, min, max of the per-round ratios)."""
  per_round = [x / y for x, y in zip(times[a], times[b])]
  return (
    statistics.median(times[a]) / statistics.median(times[b]),
    statistics.median(per_round),
    min(per_round),
    max(per_round),
  )


def base_memory(args) -> list[list[object]]:
  """Rows: model, quantized projections, weight type, MiB of the adapted projections' base weights (values and
  scales as stored; JAX stores a 4-bit value in a byte, the packed size is given beside it)."""
  import jax.numpy as jnp
  from flax import nnx
  from tunix.models.llama3 import model as llama3
  from tunix.models.qwen3 import model as qwen3

  import sora_jax

  sample = _inputs(1, 4, args.vocab)
  projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  mlp, attn = r".*/mlp/(gate_proj|up_proj|down_proj)", r".*/attn/(q_proj|k_proj|v_proj|o_proj)"
  setups = [
    ("qwen3", qwen3.Qwen3, qwen3, "MLP", [(mlp, True), (attn, False)]),
    ("llama3", llama3.Llama3, llama3, "all 7", [(TARGETS, True)]),
  ]
  rows = []
  for name, cls, family, which, rules in setups:
    base = cls(_config(family, args), rngs=nnx.Rngs(0))
    for qtype in (None, "int8", "nf4"):
      provider = sora_jax.SoraProvider(
        [
          sora_jax.SoraRule(module_path=path, rank=RANK, alpha=ALPHA, weight_qtype=qtype if quantized else None)
          for path, quantized in rules
        ]
      )
      model = sora_jax.apply_sora(base, provider, **sample, rngs=nnx.Rngs(1))
      stored = packed = 0
      for path, var in nnx.to_flat_state(nnx.state(model)):
        keys = [str(k) for k in path]
        if "_lora_" in keys[-1] or not any(k in projections for k in keys):
          continue
        value = var.get_value()
        stored += value.nbytes
        bits = jnp.iinfo(value.dtype).bits if jnp.issubdtype(value.dtype, jnp.integer) else 8 * value.dtype.itemsize
        packed += value.size * bits // 8
      rows.append([name, which if qtype else "-", qtype or "float32", f"{stored / 2**20:.1f}", f"{packed / 2**20:.1f}"])
  return rows


def main(argv=None) -> str:
  args = parse_args(argv)
  if not args.in_process:
    argv = list(sys.argv[1:] if argv is None else argv) + ["--in-process"]
    out = subprocess.run(
      [sys.executable, "-m", "bench.llm", *argv],
      env=measure.case_env(malloc=args.malloc),
      check=True,
      capture_output=True,
      text=True,
    ).stdout
    print(out, end="")
    return out

  import jax

  start = time.perf_counter()
  built = build(args)
  build_s = time.perf_counter() - start
  times = time_rounds(built["calls"], rounds=args.rounds, warmup=args.warmup)
  medians = {name: statistics.median(t) for name, t in times.items()}
  model = (
    "SmolLM2-135M-Instruct (Tunix Llama3, 30 layers x 576, vocab 49152; PEFT LoRA on transformers' model)"
    if args.smollm2
    else f"Tunix Qwen3 {args.layers} layers x {args.hidden} (heads {args.hidden // 128} x 128, MLP "
    f"{3 * args.hidden}, vocab {args.vocab})"
  )
  title = (
    f"{model}, seq {args.seq}, batch {args.batch}, rank {RANK} on 7 projections "
    f"per layer, float32; backend {jax.default_backend()} ({jax.device_count()} x "
    f"{jax.devices()[0].device_kind}), {measure.cpu_count()} CPU cores, {measure.malloc_setting()}; "
    f"{args.rounds} rounds, cases in turn"
  )
  table = measure.format_table(
    ["case", "ms (median)", "ms per round"],
    [[name, f"{1e3 * medians[name]:.2f}", " ".join(f"{1e3 * t:.1f}" for t in times[name])] for name in times],
  )
  rows = []
  pairs = [("SoRA step / PEFT LoRA step (PyTorch)", "sora step", PEFT_CASE, "<= 1")] if args.smollm2 else []
  for label, a, b, target in pairs + [
    ("SoRA step / LoRA step", "sora step", "lora step", "<= 1.05"),
    ("merged / base inference", "merged", "base", "1.00 +- 0.03"),
    ("proximal / SoRA step", "proximal", "sora step", "< 0.01"),
  ]:
    overall, median, low, high = _ratio(times, a, b)
    rows.append(
      [
        label,
        f"{overall:.4f}" if b == "sora step" else f"{overall:.3f}",
        f"{median:.3f} ({low:.3f}-{high:.3f})",
        target,
      ]
    )
  ratios = measure.format_table(["ratio", "of medians", "per round: median (range)", "target"], rows)
  counts = ", ".join(f"{k} {v:,}" for k, v in built["counts"].items())
  text = [title, "", table, "", ratios, "", counts]
  if not args.no_memory and not args.smollm2:
    text += [
      "",
      "Base weights of the 7 adapted projections per layer (MiB), float32 against qwix weight_qtype:",
      "",
      measure.format_table(["model", "quantized", "weights", "MiB as stored", "MiB packed"], base_memory(args)),
    ]
  text += ["", f"models built in {build_s:.0f} s; wall time of the bench {time.perf_counter() - start:.0f} s"]
  out = "\n".join(text)
  print(out)
  return out


if __name__ == "__main__":
  main()
