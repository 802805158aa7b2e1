"""The PyTorch (CPU) side of the comparison: transformers models with random weights, PEFT LoRA / AdaLoRA, full
fine-tuning, and our PyTorch re-implementation of the SoRA step.

Run one case per process (the bench scripts do this through `bench.measure.run_case`):
  python -m bench.torch_cases '{"kind": "train", "model": "bert", "method": "lora", "batch": 8, "seq": 128}'
It prints one JSON object: seconds per step (median) and peak resident memory above the imported-framework baseline.

SoRA here follows the method's description (Ding et al. 2023, Sec. 3): every adapted linear layer computes
`W x + s * B (g * (A x))` with a gate g of shape (rank,) between the factors; A, B and the classifier take an AdamW step,
the gates, in a separate optimizer, take an AdamW step (no weight decay) followed by the proximal operator of the L1
penalty, the soft threshold `S_tau(z) = sign(z) * max(|z| - tau, 0)` with `tau = lr * lam` -- the same update as
`sora_jax.sora_optimizer(lr, lam, gate_update="adam")`, i.e. `optax.chain(optax.adamw(lr, mask=sora_jax.not_gate_mask),
sora_jax.sora_proximal(lam, learning_rate=lr))`.
"""

import json
import math
import sys

from bench import measure

from bench.model_configs import ALPHA, LEARNING_RATE, RANK, SORA_LAMBDA, TARGET_MODULES, hf_config

import torch  # noqa: E402


def make_batch(config, batch: int, seq: int, seed: int = 0) -> dict:
  gen = torch.Generator().manual_seed(seed)
  return {
    "input_ids": torch.randint(0, config.vocab_size, (batch, seq), generator=gen),
    "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    "labels": torch.randint(0, config.num_labels, (batch,), generator=gen),
  }


def build_model(config):
  from transformers import AutoModelForSequenceClassification

  torch.manual_seed(0)
  return AutoModelForSequenceClassification.from_config(config)


class SoraLinear(torch.nn.Module):
  """`base(x) + s * ((x @ A^T) * gate) @ B^T`; the base layer is frozen.

  a: (rank, in) kaiming-uniform, b: (out, rank) zeros, gate: (rank,) ones -- the torch `nn.Linear` weight layout.
  """

  def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
    super().__init__()
    self.base = base
    for p in base.parameters():
      p.requires_grad_(False)
    self.scale = alpha / rank
    self.a = torch.nn.Parameter(torch.empty(rank, base.in_features))
    torch.nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
    self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))
    self.gate = torch.nn.Parameter(torch.ones(rank))

  def forward(self, x):
    return self.base(x) + ((x @ self.a.T) * self.gate) @ self.b.T * self.scale


def add_sora(model, target_regex: str, rank: int = RANK, alpha: float = ALPHA):
  """Replace every targeted `nn.Linear` with a `SoraLinear`; freeze everything but adapters and the classifier."""
  import re

  for p in model.parameters():
    p.requires_grad_(False)
  targets = [
    name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(target_regex, name)
  ]
  for name in targets:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, child, SoraLinear(getattr(parent, child), rank, alpha))
  for p in model.classifier.parameters():
    p.requires_grad_(True)
  return model, len(targets)


class ProximalAdamW(torch.optim.AdamW):
  """AdamW on the gates, then the proximal L1 step: g <- S_tau(g_adamw), tau = lr * lam (no weight decay)."""

  def __init__(self, gates, lr: float, lam: float):
    super().__init__(gates, lr=lr, weight_decay=0.0)
    self.lam = lam

  @torch.no_grad()
  def step(self, closure=None):
    loss = super().step(closure)
    for group in self.param_groups:
      tau = group["lr"] * self.lam
      for g in group["params"]:
        g.copy_(torch.sign(g) * torch.clamp(g.abs() - tau, min=0.0))
    return loss


def train_step(model_name: str, method: str, config, batch: dict):
  """Return a no-argument callable that performs one full training step (forward, backward, optimizer)."""
  from transformers.utils import logging as hf_logging

  hf_logging.set_verbosity_error()
  model = build_model(config)
  model.train()
  extra = None
  if method == "full":
    optimizers = [torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)]
  elif method in ("lora", "adalora"):
    import peft

    if method == "lora":
      peft_config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, task_type="SEQ_CLS", target_modules=TARGET_MODULES[model_name]
      )
    else:  # PEFT's defaults (init_r 12 -> target_r 8, budget re-allocation every step), a long schedule
      peft_config = peft.AdaLoraConfig(
        target_r=RANK,
        init_r=12,
        lora_alpha=ALPHA,
        task_type="SEQ_CLS",
        target_modules=TARGET_MODULES[model_name],
        total_step=100_000,
      )
    model = peft.get_peft_model(model, peft_config)
    optimizers = [torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)]
    if method == "adalora":
      extra = model.base_model.update_and_allocate  # AdaLoRA's importance update and rank masking, per step
  elif method == "sora":
    model, _ = add_sora(model, TARGET_MODULES[model_name])
    gates = [p for n, p in model.named_parameters() if n.endswith(".gate")]
    others = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".gate")]
    optimizers = [torch.optim.AdamW(others, lr=LEARNING_RATE), ProximalAdamW(gates, LEARNING_RATE, SORA_LAMBDA)]
  else:
    raise ValueError(f"unknown method {method!r}")

  counter = [0]

  def step():
    loss = model(**batch).loss
    loss.backward()
    for opt in optimizers:
      opt.step()
    if extra is not None:
      extra(counter[0])
    for opt in optimizers:
      opt.zero_grad(set_to_none=True)
    counter[0] += 1
    return loss

  trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
  return step, trainable


def floor_step(config, batch: dict):
  """Forward plus backward to the embedding output only: every weight frozen, no optimizer (the cost floor)."""
  model = build_model(config)
  model.train()
  for p in model.parameters():
    p.requires_grad_(False)
  embeddings = model.get_input_embeddings()
  labels = batch["labels"]
  inputs = {k: v for k, v in batch.items() if k != "labels"}

  def step():
    embedded = embeddings(inputs["input_ids"]).detach().requires_grad_(True)
    out = model(inputs_embeds=embedded, attention_mask=inputs["attention_mask"], labels=labels)
    (grad,) = torch.autograd.grad(out.loss, embedded)
    return grad

  return step, 0


def inference_calls(model_name: str, config, batch: dict) -> dict:
  """Forward-only callables: base model, PEFT LoRA unmerged, PEFT LoRA merged into the weights."""
  import peft

  inputs = {k: v for k, v in batch.items() if k != "labels"}
  base = build_model(config).eval()
  lora = build_model(config)
  peft_config = peft.LoraConfig(
    r=RANK,
    lora_alpha=ALPHA,
    lora_dropout=0.0,
    task_type="SEQ_CLS",
    target_modules=TARGET_MODULES[model_name],
    init_lora_weights=False,
  )
  lora = peft.get_peft_model(lora, peft_config).eval()
  merged = peft.get_peft_model(build_model(config), peft_config)
  merged.load_state_dict(lora.state_dict())
  merged = merged.merge_and_unload().eval()

  def forward(m):
    def call():
      with torch.inference_mode():
        return m(**inputs).logits

    return call

  return {"base": forward(base), "lora_unmerged": forward(lora), "lora_merged": forward(merged)}


def _setup(spec: dict):
  """Set torch's threads, import what every case holds, start the thread pool, then make the spec's config and
  batch: (threads, baseline MiB, config, batch), the baseline being the resident size before any model exists."""
  threads = spec.get("threads") or measure.cpu_count()
  torch.set_num_threads(threads)
  import transformers  # noqa: F401  (part of the baseline, like torch)
  import peft  # noqa: F401

  torch.ones(64, 64) @ torch.ones(64, 64)  # the thread pool exists now
  baseline = measure.rss_mib()
  config = hf_config(spec["model"], **spec.get("shape", {}))
  return threads, baseline, config, make_batch(config, spec["batch"], spec["seq"])


def _step(spec: dict, config, batch: dict):
  """(step callable, trainable parameter count) of the spec's method; "floor" is `floor_step`."""
  if spec["method"] == "floor":
    return floor_step(config, batch)
  return train_step(spec["model"], spec["method"], config, batch)


def main(spec: dict) -> dict:
  threads, baseline, config, batch = _setup(spec)
  warmup, repeats = spec.get("warmup", 1), spec.get("repeats", 3)
  result = {"framework": "torch", "threads": threads, "torch": torch.__version__}
  if spec["kind"] == "train":
    step, trainable = _step(spec, config, batch)
    result.update(measure.measure_step(step, baseline_mib=baseline, warmup=warmup, repeats=repeats))
    result["trainable"] = trainable
  elif spec["kind"] == "inference":
    timings = measure.time_interleaved(inference_calls(spec["model"], config, batch), warmup=warmup, repeats=repeats)
    result["time_s"] = {name: t.median_s for name, t in timings.items()}
  else:
    raise ValueError(f"unknown kind {spec['kind']!r}")
  return result


def serve(spec: dict) -> None:
  """`python -m bench.torch_cases --serve '<spec>'`: build the case, then time it on request (`bench.measure.serve`).

  Kinds: `train` (the method's step, or the floor) and `inference` (base, PEFT LoRA unmerged and merged forwards,
  timed in turn forwards and backwards within each request).
  """
  threads, baseline, config, batch = _setup(spec)
  info = {"framework": "torch", "threads": threads, "torch": torch.__version__}
  if spec["kind"] == "train":
    step, info["trainable"] = _step(spec, config, batch)
    calls, palindrome = {"step": step}, False
  elif spec["kind"] == "inference":
    calls, palindrome = inference_calls(spec["model"], config, batch), True
  else:
    raise ValueError(f"unknown kind {spec['kind']!r} for --serve; choose train or inference")
  measure.serve(calls, baseline_mib=baseline, warmup=spec.get("warmup", 1), palindrome=palindrome, info=info)


if __name__ == "__main__":
  if sys.argv[1] == "--serve":
    serve(json.loads(sys.argv[2]))
  else:
    print(json.dumps(main(json.loads(sys.argv[1]))))
