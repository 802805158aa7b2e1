"""sora_jax against what users would pick instead, measured side by side in one run (issue 7).

Train step (forward, backward, optimizer) and peak memory, random weights, seq 128, rank 8 on the six dense layers of
every block, for BERT-base and DeBERTa-v3-base shapes:
  ours   SoRA (factored forward, AdamW + proximal gate step), LoRA (the same with gates frozen, no proximal step),
         full fine-tuning -- JAX, jitted, trainable state donated
  torch  PEFT LoRA, PEFT AdaLoRA (init_r 12 -> target_r 8), full fine-tuning with transformers, and a PyTorch
         re-implementation of the SoRA step (bench/torch_cases.py) -- eager, CPU
The floor of both frameworks (forward plus backward to the embedding output, every weight frozen) bounds what any
adapter method can reach. Inference (forward only): ours base / SoRA merged into the kernels / factored adapters; torch
base / PEFT LoRA unmerged / merged. Every train case runs in a fresh process (its own memory high-water mark). Ratios
near one -- our SoRA against our LoRA and the floor, merged against base inference -- come from one process per
model that times its variants in turn, round by round, so that load on a shared machine hits them alike.

  python -m bench.compare                                   # both models, batch 8 (< 15 min on 2 quiet cores)
  python -m bench.compare --batch 8,32                      # the full matrix (about three times as long)
  python -m bench.compare --models bert --quick             # a subset, fewer steps
  python -m bench.compare --tiny                            # a 2-layer toy shape: checks that it all runs
"""
import argparse
import os
import tempfile
import time

from bench import measure

MODELS = ("bert", "deberta")
_MODEL_NAMES = {"bert": "BERT-base", "deberta": "DeBERTa-v3-base"}
TINY_SHAPE = {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128, "vocab": 1000}
# (row label, ours method or None, torch method, torch label)
TRAIN_ROWS = (
    ("SoRA", "sora", "sora", "SoRA (our torch port)"),
    ("SoRA vs LoRA", "sora", "lora", "PEFT LoRA"),
    ("LoRA", "lora", "lora", "PEFT LoRA"),
    ("SoRA vs AdaLoRA", "sora", "adalora", "PEFT AdaLoRA"),
    ("full FT", "full", "full", "transformers"),
    ("floor", "floor", "floor", "transformers, frozen"),
)
JAX_METHODS = ("sora", "lora", "full")
TORCH_METHODS = ("lora", "adalora", "sora", "full", "floor")
# Timed in turn in one process: the near-one ratios (SoRA / LoRA, SoRA / floor) and our floor.
INTERLEAVED_METHODS = ("floor", "sora", "lora")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of bert,deberta")
  parser.add_argument("--batch", default="8", help="comma-separated batch sizes (8,32: the full matrix)")
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--quick", action="store_true", help="fewer timed steps (2 per train case, 2 interleaved and inference rounds)")
  parser.add_argument("--tiny", action="store_true", help="2-layer 64-wide models, seq 16 (smoke test)")
  parser.add_argument("--jax-methods", default=",".join(JAX_METHODS), help=f"subset of {JAX_METHODS}")
  parser.add_argument("--torch-methods", default=",".join(TORCH_METHODS), help=f"subset of {TORCH_METHODS}")
  parser.add_argument("--no-torch", action="store_true", help="only our side")
  parser.add_argument("--no-inference", action="store_true")
  parser.add_argument("--no-interleaved", action="store_true",
                      help="skip the one-process floor / SoRA / LoRA timing (the near-one ratios)")
  parser.add_argument("--threads", type=int, default=0, help="torch threads (default: the cores of this process)")
  parser.add_argument("--no-hugepages", action="store_true",
                      help="leave glibc's malloc at its defaults in every case (default: transparent huge pages for "
                           "both frameworks; see bench/measure.py)")
  return parser.parse_args(argv)


def _repeats(batch: int, quick: bool) -> tuple[int, int, int]:
  """(train steps timed per process, interleaved train rounds, inference rounds); fewer for large batches."""
  if quick:
    return 2, 2, 2
  return (2, 3, 4) if batch <= 8 else (2, 2, 2)


def _ms(r: dict | None, key: str = "time_s") -> str:
  if r is None:
    return "-"
  if "error" in r:
    return "error"
  return _fmt_ms(r[key])


def _fmt_ms(seconds: float) -> str:
  ms = 1e3 * seconds
  return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
  return f"{a / b:.2f}" if a and b else "-"


def _get(r: dict | None, key: str) -> float | None:
  return r.get(key) if r and "error" not in r else None


def main(argv=None) -> str:
  args = parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  if set(models) - set(MODELS):
    raise SystemExit(f"unknown models {sorted(set(models) - set(MODELS))}; choose from {MODELS}")
  batches = [int(b) for b in args.batch.split(",") if b]
  jax_methods = [m for m in args.jax_methods.split(",") if m]
  torch_methods = [] if args.no_torch else [m for m in args.torch_methods.split(",") if m]
  if set(jax_methods) - set(JAX_METHODS) or set(torch_methods) - set(TORCH_METHODS):
    raise SystemExit(f"unknown methods; choose from {JAX_METHODS} (--jax-methods) and {TORCH_METHODS} "
                     "(--torch-methods)")
  shape, seq = (TINY_SHAPE, 16) if args.tiny else ({}, args.seq)
  label_of = lambda model: f"{_MODEL_NAMES[model]} shape, 2 layers x 64 (--tiny)" if args.tiny else _MODEL_NAMES[model]
  threads = args.threads or measure.cpu_count()
  start = time.perf_counter()
  train, infer, interleaved, errors = {}, {}, {}, []
  # One persistent XLA compilation cache for this run: the interleaved process reuses the steps that the per-method
  # processes compiled (identical programs), instead of compiling them again.
  cache = None
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    cache = tempfile.TemporaryDirectory(prefix="sora_bench_xla_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache.name
  interleave = [m for m in INTERLEAVED_METHODS if m == "floor" or m in jax_methods]

  def run(module, spec):
    result = measure.run_case(module, spec, timeout=900, hugepages=not args.no_hugepages)
    if "error" in result:
      errors.append(f"{module} {spec['kind']} {spec.get('method', '')} {spec['model']} b{spec['batch']}: "
                    f"{result['error']}")
    return result

  for model in models:
    for batch in batches:
      repeats, rounds, inference_rounds = _repeats(batch, args.quick)
      base = {"model": model, "batch": batch, "seq": seq, "shape": shape, "warmup": 1}
      for method in jax_methods:
        train["jax", model, batch, method] = run(
            "bench.jax_cases", dict(base, kind="train", method=method, repeats=repeats))
      for method in torch_methods:
        train["torch", model, batch, method] = run(
            "bench.torch_cases", dict(base, kind="train", method=method, repeats=repeats, threads=threads))
      # One JAX process times floor / SoRA / LoRA in turn, then (unless --no-inference) the inference variants.
      if not args.no_interleaved:
        joint = run("bench.jax_cases", dict(base, kind="train_interleaved", methods=interleave, repeats=rounds,
                                            inference_repeats=0 if args.no_inference else inference_rounds))
        interleaved[model, batch] = joint
        if "time_s" in joint:
          train["jax", model, batch, "floor"] = {"time_s": joint["time_s"]["floor"]}
        if "inference_s" in joint:
          infer["jax", model, batch] = {"time_s": joint["inference_s"]}
      elif not args.no_inference:
        infer["jax", model, batch] = run("bench.jax_cases", dict(base, kind="inference", repeats=inference_rounds))
      if not args.no_inference:
        if not args.no_torch:
          infer["torch", model, batch] = run(
              "bench.torch_cases", dict(base, kind="inference", repeats=inference_rounds, threads=threads))

  if cache is not None:
    del os.environ["JAX_COMPILATION_CACHE_DIR"]
    cache.cleanup()

  rows, checks = [], []
  for model in models:
    for batch in batches:
      for label, ours, theirs, theirs_label in TRAIN_ROWS:
        o = train.get(("jax", model, batch, ours))
        t = train.get(("torch", model, batch, theirs))
        if o is None and t is None:
          continue
        rows.append([label_of(model), batch, label, f"ours {ours}", _ms(o), theirs_label, _ms(t),
                     _ratio(_get(o, "time_s"), _get(t, "time_s")),
                     f"{_get(o, 'peak_mib'):.0f}" if _get(o, "peak_mib") else "-",
                     f"{_get(t, 'peak_mib'):.0f}" if _get(t, "peak_mib") else "-",
                     _ratio(_get(o, "peak_mib"), _get(t, "peak_mib"))])
      sora = _get(train.get(("jax", model, batch, "sora")), "time_s")
      peft_lora = _get(train.get(("torch", model, batch, "lora")), "time_s")
      torch_floor = _get(train.get(("torch", model, batch, "floor")), "time_s")
      together = _get(interleaved.get((model, batch)), "time_s") or {}
      where = f"{label_of(model)} b{batch}"
      if sora and peft_lora:
        checks.append(f"{where}: our SoRA / PEFT LoRA = {sora / peft_lora:.2f} (target <= 0.75: "
                      f"{'met' if sora / peft_lora <= 0.75 else 'missed'})")
      if together.get("floor") and peft_lora:
        checks.append(f"{where}: our floor / PEFT LoRA = {together['floor'] / peft_lora:.2f}, our floor / torch "
                      f"floor = {_ratio(together['floor'], torch_floor)} (no adapter step can cost less than the floor)")
      if together.get("sora") and together.get("lora"):
        ratio = together["sora"] / together["lora"]
        checks.append(f"{where}: our SoRA / our LoRA = {ratio:.2f}, timed in turn in one process (target <= 1.05: "
                      f"{'met' if ratio <= 1.05 else 'missed'}); SoRA / floor = "
                      f"{_ratio(together['sora'], together.get('floor'))}")
      else:
        lora = _get(train.get(("jax", model, batch, "lora")), "time_s")
        if sora and lora:
          checks.append(f"{where}: our SoRA / our LoRA = {sora / lora:.2f}, separate processes (target <= 1.05: "
                        f"{'met' if sora / lora <= 1.05 else 'missed'})")
      jax_inf = _get(infer.get(("jax", model, batch)), "time_s")
      if jax_inf:
        ratio = jax_inf["sora_merged"] / jax_inf["base"]
        checks.append(f"{where}: our merged / base inference = {ratio:.3f} (target 1.00 +- 0.03: "
                      f"{'met' if abs(ratio - 1) <= 0.03 else 'missed'})")

  inf_rows = []
  for model in models:
    for batch in batches:
      o = _get(infer.get(("jax", model, batch)), "time_s") or {}
      t = _get(infer.get(("torch", model, batch)), "time_s") or {}
      if not o and not t:
        continue
      ms = lambda d, k: _fmt_ms(d[k]) if k in d else "-"
      rat = lambda d1, k1, d2, k2: _ratio(d1.get(k1), d2.get(k2))
      inf_rows.append([label_of(model), batch, ms(o, "base"), ms(o, "sora_merged"),
                       rat(o, "sora_merged", o, "base"), ms(o, "sora_factored"), rat(o, "sora_factored", o, "base"),
                       ms(t, "base"), ms(t, "lora_merged"), ms(t, "lora_unmerged"),
                       rat(o, "base", t, "base"), rat(o, "sora_merged", t, "lora_merged"),
                       rat(o, "sora_factored", t, "lora_unmerged")])

  train_steps = ", ".join(f"batch {b}: median of {_repeats(b, args.quick)[0]} steps" for b in batches)
  train_steps += " (ours floor: the one-process interleaved timing)"
  model_desc = "2-layer 64-wide toy shapes (--tiny)" if args.tiny else "random weights"
  lines = [
      f"Train step, seq {seq}, rank 8 on six dense layers per block, {model_desc}; {train_steps} after 1 warm-up; "
      f"{measure.cpu_count()} CPU cores, torch threads {threads}, XLA: its default CPU thread pool (all cores); "
      f"every case: {measure.malloc_setting(measure.case_env(hugepages=not args.no_hugepages))}",
      "",
      measure.format_table(["model", "batch", "row", "ours", "ours ms", "theirs", "theirs ms", "time ours/theirs",
                            "ours MiB", "theirs MiB", "mem ours/theirs"], rows),
  ]
  if inf_rows:
    lines += [
        "",
        "Inference (forward only, ms per batch, variants interleaved in one process)",
        "",
        measure.format_table(["model", "batch", "ours base", "ours merged", "merged/base", "ours factored",
                              "factored/base", "torch base", "PEFT merged", "PEFT unmerged", "base ours/torch",
                              "merged ours/torch", "unmerged ours/torch"], inf_rows),
    ]
  lines += ["", *checks]
  if errors:
    lines += ["", "errors:", *errors]
  lines.append(f"wall time of the bench: {time.perf_counter() - start:.0f} s")
  text = "\n".join(lines)
  print(text)
  return text


if __name__ == "__main__":
  main()
