"""Train-step cost of SoRA in JAX against the floor and full fine-tuning (issue 2's table).

One linen encoder (BERT-base shape by default: 12 layers x 768 hidden, seq 128, batch 8), all six dense kernels of each
layer adapted with rank 8, random weights. Rows:
  floor     forward plus backward to the embedding output only (no weight gradients, no optimizer)
  factored  SoRA, factored forward, gradients w.r.t. adapters + classifier, AdamW + proximal gate step
  merge     SoRA merge-then-apply: the kernels `W + s A diag(g) B` are formed inside the differentiated function
  lora      the factored forward with gates frozen (plain LoRA), for reference
  full      full fine-tuning with AdamW
Each row runs in its own process (fresh memory high-water mark, nothing cached from another row). With --interleave,
all rows run in one process and each round times every method in turn: no memory column, but ratios that hold up on a
machine shared with other work (load that comes and goes hits every method alike).

  python -m bench.train_step                       # the issue's configuration
  python -m bench.train_step --interleave         # time ratios on a busy machine
  python -m bench.train_step --cost               # add XLA's FLOP and byte counts of each compiled step
  python -m bench.train_step --tiny --repeats 2    # a seconds-long smoke run
"""

import argparse
import time

from bench import measure
from bench.model_configs import TINY_SHAPE

METHODS = ("floor", "factored", "merge", "lora", "full")
_CASE_METHOD = {"floor": "floor", "factored": "sora", "merge": "merge", "lora": "lora", "full": "full"}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="bert", choices=("bert", "deberta"))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--hidden", type=int, default=768)
  parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first one compiles)")
  parser.add_argument("--repeats", type=int, default=5, help="timed steps; the median is reported")
  parser.add_argument(
    "--malloc",
    default="retain",
    choices=sorted(measure.MALLOC_MODES),
    help="glibc malloc settings of the cases' processes (bench/measure.py, MALLOC_MODES)",
  )
  parser.add_argument(
    "--interleave", action="store_true", help="one process, methods timed in turn each round (no memory column)"
  )
  parser.add_argument(
    "--cost", action="store_true", help="also compile every step once more for XLA's cost analysis (GFLOP, GB accessed)"
  )
  parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model, seq 16, batch 2 (smoke test)")
  return parser.parse_args(argv)


def _measure(args, methods, shape, batch, seq) -> dict:
  """{method: {"time_s", "peak_mib", "trainable"} or {"error"}}: each method in a process of its own, or all in one
  (`--interleave`)."""
  base = {"model": args.model, "batch": batch, "seq": seq, "shape": shape, "warmup": args.warmup}
  if not args.interleave:
    return {
      method: measure.run_case(
        "bench.jax_cases",
        {"kind": "train", **base, "method": _CASE_METHOD[method], "repeats": args.repeats},
        malloc=args.malloc,
      )
      for method in methods
    }
  spec = {"kind": "train_interleaved", **base, "methods": [_CASE_METHOD[m] for m in methods], "repeats": args.repeats}
  joint = measure.run_case("bench.jax_cases", spec, malloc=args.malloc)
  if "error" in joint:
    return {method: joint for method in methods}
  return {
    method: {"time_s": joint["time_s"][_CASE_METHOD[method]], "peak_mib": None, "trainable": None} for method in methods
  }


def _rows(results: dict, cost: dict, with_cost: bool) -> list:
  """The table's rows: ms per step, against the floor and full fine-tuning, memory, trainable parameters."""
  floor = results.get("floor", {}).get("time_s")
  full = results.get("full", {}).get("time_s")
  rows = []
  for method, r in results.items():
    if "error" in r:
      rows.append([method, "error: " + r["error"][:120], "", "", "", ""] + (["", ""] if with_cost else []))
      continue
    t = r["time_s"]
    row = [
      method,
      f"{1e3 * t:.1f}",
      f"{t / floor:.2f}" if floor else "-",
      f"{t / full:.2f}" if full else "-",
      "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}",
      "-" if r["trainable"] is None else f"{r['trainable']:,}",
    ]
    if with_cost:
      c = cost.get(_CASE_METHOD[method], {})
      row += [f"{c['gflop']:.1f}" if c else "-", f"{c['gbytes']:.2f}" if c else "-"]
    rows.append(row)
  return rows


def main(argv=None) -> str:
  args = parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
  if args.tiny:
    shape, batch, seq = TINY_SHAPE, 2, 16
  else:
    shape = {
      "layers": args.layers,
      "hidden": args.hidden,
      "heads": max(1, args.hidden // 64),
      "intermediate": 4 * args.hidden,
    }
    batch, seq = args.batch, args.seq
  start = time.perf_counter()
  results = _measure(args, methods, shape, batch, seq)
  cost = {}
  if args.cost:
    spec = {
      "kind": "cost",
      "model": args.model,
      "methods": [_CASE_METHOD[m] for m in methods],
      "batch": batch,
      "seq": seq,
      "shape": shape,
    }
    cost = measure.run_case("bench.jax_cases", spec, malloc=args.malloc).get("cost", {})
  floor = results.get("floor", {}).get("time_s")
  title = (
    f"JAX train step, {args.model} {shape['layers']} layers x {shape['hidden']} hidden, seq {seq}, "
    f"batch {batch}, rank 8 on six kernels per layer; median of {args.repeats} steps after {args.warmup} "
    f"warm-up{', methods interleaved in one process' if args.interleave else ', one process per method'}; "
    f"{measure.cpu_count()} CPU cores, {measure.malloc_setting(measure.case_env(malloc=args.malloc))}"
  )
  header = ["method", "ms/step", "x floor", "x full FT", "peak MiB", "trainable params"]
  table = measure.format_table(
    header + (["XLA GFLOP", "XLA GB accessed"] if args.cost else []), _rows(results, cost, args.cost)
  )
  notes = []
  if floor and "factored" in results and "time_s" in results["factored"]:
    ratio = results["factored"]["time_s"] / floor
    notes.append(f"factored / floor = {ratio:.2f} (target <= 1.10: {'met' if ratio <= 1.10 else 'missed'})")
  notes.append(f"wall time of the bench: {time.perf_counter() - start:.0f} s")
  text = "\n".join([title, "", table, ""] + notes)
  print(text)
  return text


if __name__ == "__main__":
  main()
