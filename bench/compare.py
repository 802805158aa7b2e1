"""sora_jax against what users would pick instead, measured side by side in one run (issue 7).

Train step (forward, backward, optimizer) and peak memory, random weights, seq 128, rank 8 on the six dense layers of
every block, for BERT-base and DeBERTa-v3-base shapes:
  ours   SoRA (factored forward, AdamW + proximal gate step), LoRA (the same with gates frozen, no proximal step),
         full fine-tuning -- JAX, jitted, trainable state donated
  torch  PEFT LoRA, PEFT AdaLoRA (init_r 12 -> target_r 8), full fine-tuning with transformers, and a PyTorch
         re-implementation of the SoRA step (bench/torch_cases.py) -- eager, CPU
With --floor, also the floor of both frameworks: forward plus backward to the embedding output, every weight frozen,
no optimizer. Inference (forward only): ours base / SoRA merged into the kernels / factored adapters; torch
base / PEFT LoRA unmerged / merged.

How it times: every case runs in a process of its own (its own memory high-water mark, no thread pools shared between
frameworks), and the cases of one group are alive together and asked for one step each in turn, round after round
(`bench.measure.time_round_robin`), so load that comes and goes on the machine hits ours and theirs alike. Groups per
model and batch (`--layout groups`, the default at batch <= 8): the adapter methods (ours SoRA and LoRA, PEFT LoRA and
AdaLoRA, our torch SoRA), full fine-tuning (and the floors), and inference (one process per framework, its variants
timed in turn inside it: merged and base are one executable, so their ratio is resolved within the process). Above
batch 8 the default is `--layout pairs`: one pair of cases per ratio the report states (ours SoRA with PEFT LoRA, with
our LoRA, with AdaLoRA, with our torch port; our LoRA with PEFT LoRA; full FT; floors), because every case keeps its
peak memory while the others run: at batch 32 a BERT-base adapter case holds about 5.9 GB and a DeBERTa-v3-base torch
case about 10.6 GB, so a group of five does not fit in 24 GB.

  python -m bench.compare                                   # both models, batch 8 (< 15 min on 2 quiet cores)
  python -m bench.compare --batch 8,32                      # the full matrix (batch 32 in pairs: 35 min more)
  python -m bench.compare --models bert --quick             # a subset, fewer rounds
  python -m bench.compare --floor                           # with the floors (about 2 minutes more)
  python -m bench.compare --tiny                            # a 2-layer toy shape: checks that it all runs
"""

import argparse
import os
import statistics
import tempfile
import time

from bench import measure
from bench.model_configs import TINY_SHAPE

MODELS = ("bert", "deberta")
_MODEL_NAMES = {"bert": "BERT-base", "deberta": "DeBERTa-v3-base"}
# (row label, ours method, torch method, torch label)
TRAIN_ROWS = (
  ("SoRA", "sora", "sora", "SoRA (our torch port)"),
  ("SoRA vs LoRA", "sora", "lora", "PEFT LoRA"),
  ("LoRA", "lora", "lora", "PEFT LoRA"),
  ("SoRA vs AdaLoRA", "sora", "adalora", "PEFT AdaLoRA"),
  ("full FT", "full", "full", "transformers"),
  ("floor", "floor", "floor", "transformers, frozen"),
)
JAX_METHODS = ("sora", "lora", "full", "floor")
TORCH_METHODS = ("lora", "adalora", "sora", "full", "floor")
# The cases timed together, round by round, per layout: {group: ({framework: methods}, kind of rounds)}.
LAYOUTS = {
  "groups": {
    "adapters": ({"jax": ("sora", "lora"), "torch": ("lora", "adalora", "sora")}, "adapters"),
    "full": ({"jax": ("full", "floor"), "torch": ("full", "floor")}, "full"),
  },
  "pairs": {
    "sora/peft-lora": ({"jax": ("sora",), "torch": ("lora",)}, "adapters"),
    "sora/lora": ({"jax": ("sora", "lora")}, "adapters"),
    "lora/peft-lora": ({"jax": ("lora",), "torch": ("lora",)}, "adapters"),
    "sora/adalora": ({"jax": ("sora",), "torch": ("adalora",)}, "adapters"),
    "sora/port": ({"jax": ("sora",), "torch": ("sora",)}, "adapters"),
    "full": ({"jax": ("full",), "torch": ("full",)}, "full"),
    "floor": ({"jax": ("floor",), "torch": ("floor",)}, "full"),
  },
}
_MODULES = {"jax": "bench.jax_cases", "torch": "bench.torch_cases"}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of bert,deberta")
  parser.add_argument("--batch", default="8", help="comma-separated batch sizes (8,32: the full matrix)")
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument(
    "--rounds",
    type=int,
    default=0,
    help="timed rounds of the adapter group (default: 4 at batch <= 8, 2 above; the full FT and "
    "floor group takes half as many, at least 2)",
  )
  parser.add_argument("--quick", action="store_true", help="fewer rounds (2 train, 2 inference)")
  parser.add_argument(
    "--layout",
    default="auto",
    choices=("auto", *LAYOUTS),
    help="which cases are alive and timed together: whole groups, or one pair per ratio "
    "(default auto: groups at batch <= 8, pairs above, for memory)",
  )
  parser.add_argument("--tiny", action="store_true", help="2-layer 64-wide models, seq 16 (smoke test)")
  parser.add_argument("--jax-methods", default="sora,lora,full", help=f"subset of {JAX_METHODS}")
  parser.add_argument("--torch-methods", default="lora,adalora,sora,full", help=f"subset of {TORCH_METHODS}")
  parser.add_argument("--floor", action="store_true", help="add both frameworks' floor (to the full FT group)")
  parser.add_argument("--no-torch", action="store_true", help="only our side")
  parser.add_argument("--no-inference", action="store_true")
  parser.add_argument("--threads", type=int, default=0, help="torch threads (default: the cores of this process)")
  parser.add_argument(
    "--malloc",
    default="retain",
    choices=sorted(measure.MALLOC_MODES),
    help="glibc malloc settings of every case, both frameworks alike (bench/measure.py, MALLOC_MODES; default: retain)",
  )
  return parser.parse_args(argv)


def _rounds(batch: int, args) -> dict[str, int]:
  """Timed rounds per group: the adapter rows carry issue 7's targets, full FT and the floors are context."""
  if args.quick:
    return {"adapters": 2, "full": 2, "inference": 2}
  adapters = args.rounds or (4 if batch <= 8 else 2)
  return {"adapters": adapters, "full": max(2, adapters // 2), "inference": 3 if batch <= 8 else 2}


def _layout(batch: int, args) -> str:
  return args.layout if args.layout != "auto" else "groups" if batch <= 8 else "pairs"


def _groups_to_run(layout: str, methods: dict[str, list[str]]) -> dict[str, tuple[tuple[tuple[str, str], ...], str]]:
  """The layout's groups cut to the requested methods, {group: (((framework, method), ...), kind of rounds)}; a group
  whose requested cases another group times too is left out (e.g. under --no-torch, ours SoRA alone from the pair
  with PEFT LoRA: the pair with our LoRA times it)."""
  candidates = {}
  for name, (members, kind) in LAYOUTS[layout].items():
    cases = tuple((fw, m) for fw, wanted in members.items() for m in wanted if m in methods[fw])
    if cases and cases not in (c for c, _ in candidates.values()):  # the first of equal groups is kept
      candidates[name] = (cases, kind)
  return {
    name: (cases, kind)
    for name, (cases, kind) in candidates.items()
    if not any(set(cases) < set(other) for other, _ in candidates.values())
  }


def _side_by_side(cases: dict, a: tuple[str, str], b: tuple[str, str]) -> tuple[dict | None, dict | None, bool]:
  """Results of cases a and b ((framework, method)) from the first group that timed both, and True; else each one's
  first result and False. `cases` maps (framework, method) to {group: result}."""
  for group, result in cases.get(a, {}).items():
    if group in cases.get(b, {}):
      return result, cases[b][group], True
  return _first(cases, a), _first(cases, b), False


def _first(cases: dict, key: tuple[str, str]) -> dict | None:
  """The first group's result of case `key` ((framework, method)), or None."""
  return next(iter(cases.get(key, {}).values()), None)


def _fmt_ms(seconds: float) -> str:
  ms = 1e3 * seconds
  return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _median(result: dict | None, call: str = "step") -> float | None:
  if not result or "error" in result or call not in result.get("times", {}):
    return None
  return statistics.median(result["times"][call])


def _ratio(a: float | None, b: float | None) -> str:
  return f"{a / b:.2f}" if a and b else "-"


def _spread(a: dict | None, b: dict | None, call_a: str = "step", call_b: str = "step") -> str:
  """Range of the per-round ratios a / b (the two were timed in the same rounds)."""
  if _median(a, call_a) is None or _median(b, call_b) is None:
    return "-"
  ratios = [x / y for x, y in zip(a["times"][call_a], b["times"][call_b])]
  return f"{min(ratios):.2f}-{max(ratios):.2f}"


def _mib(result: dict | None) -> float | None:
  return result.get("peak_mib") if result and "error" not in result else None


def run_group(cases: dict[str, tuple[str, dict]], *, rounds: int, malloc: str, errors: list) -> dict:
  """Start the group's cases together, time them round robin, end them; {case: result}."""
  workers = measure.start_workers(cases, malloc=malloc)
  try:
    live = {name: w for name, w in workers.items() if "error" not in w.info}
    results = measure.time_round_robin(live, rounds=rounds) if live else {}
  finally:
    for worker in workers.values():
      worker.close()
  for name, worker in workers.items():
    if worker.error:
      errors.append(f"{name}: {worker.error}")
      results[name] = {"error": worker.error}
  return results


def _store(cases: dict, group: str, keys: dict[str, tuple[str, str]], named: dict[str, dict]) -> None:
  """Put a group's results (`named`, by case name) into `cases`, {(framework, method): {group: result}}."""
  for name, key in keys.items():
    cases.setdefault(key, {})[group] = named[name]


def main(argv=None) -> str:
  args = parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  if set(models) - set(MODELS):
    raise SystemExit(f"unknown models {sorted(set(models) - set(MODELS))}; choose from {MODELS}")
  batches = [int(b) for b in args.batch.split(",") if b]
  methods = {
    "jax": [m for m in args.jax_methods.split(",") if m] + (["floor"] if args.floor else []),
    "torch": []
    if args.no_torch
    else [m for m in args.torch_methods.split(",") if m] + (["floor"] if args.floor else []),
  }
  if set(methods["jax"]) - set(JAX_METHODS) or set(methods["torch"]) - set(TORCH_METHODS):
    raise SystemExit(
      f"unknown methods; choose from {JAX_METHODS} (--jax-methods) and {TORCH_METHODS} (--torch-methods)"
    )
  shape, seq = (TINY_SHAPE, 16) if args.tiny else ({}, args.seq)
  label_of = lambda model: f"{_MODEL_NAMES[model]} shape, 2 layers x 64 (--tiny)" if args.tiny else _MODEL_NAMES[model]
  threads = args.threads or measure.cpu_count()
  start = time.perf_counter()
  results, errors = {}, []
  # One persistent XLA compilation cache for this run: programs that two cases share (the same step at another
  # batch, the inference forward) compile once.
  cache = None
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    cache = tempfile.TemporaryDirectory(prefix="sora_bench_xla_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache.name
  try:
    for model in models:
      for batch in batches:
        rounds = _rounds(batch, args)
        base = {"model": model, "batch": batch, "seq": seq, "shape": shape, "warmup": 1, "threads": threads}
        for group_name, (members, kind) in _groups_to_run(_layout(batch, args), methods).items():
          keys = {f"{fw} {m} {model} b{batch}": (fw, m) for fw, m in members}
          named = run_group(
            {name: (_MODULES[fw], dict(base, kind="train", method=m)) for name, (fw, m) in keys.items()},
            rounds=rounds[kind],
            malloc=args.malloc,
            errors=errors,
          )
          _store(results.setdefault((model, batch), {}), group_name, keys, named)
        if not args.no_inference:
          keys = {
            f"{fw} inference {model} b{batch}": (fw, "inference")
            for fw in ("jax", "torch")
            if fw == "jax" or not args.no_torch
          }
          named = run_group(
            {name: (_MODULES[fw], dict(base, kind="inference")) for name, (fw, _) in keys.items()},
            rounds=rounds["inference"],
            malloc=args.malloc,
            errors=errors,
          )
          _store(results.setdefault((model, batch), {}), "inference", keys, named)
  finally:
    if cache is not None:
      del os.environ["JAX_COMPILATION_CACHE_DIR"]
      cache.cleanup()
  text = report(results, models, batches, args, label_of, seq, threads, errors)
  text += f"\nwall time of the bench: {time.perf_counter() - start:.0f} s"
  print(text)
  return text


def _train_rows(cases, model_label, batch) -> list:
  """The train-step table's rows of one model and batch: ours against theirs, time and memory."""
  rows = []
  ms = lambda r: "error" if r and "error" in r else _fmt_ms(_median(r)) if _median(r) else "-"  # noqa: E731
  for label, ours, theirs, theirs_label in TRAIN_ROWS:
    o, t, together = _side_by_side(cases, ("jax", ours), ("torch", theirs))
    if o is None and t is None:
      continue
    rows.append(
      [
        model_label,
        batch,
        label,
        f"ours {ours}",
        ms(o),
        theirs_label,
        ms(t),
        _ratio(_median(o), _median(t)),
        _spread(o, t) if together else "-",
        f"{_mib(o):.0f}" if _mib(o) else "-",
        f"{_mib(t):.0f}" if _mib(t) else "-",
        _ratio(_mib(o), _mib(t)),
      ]
    )
  return rows


def _train_checks(cases, where: str) -> list[str]:
  """The train-step ratios against their targets, and the floors."""
  checks = []
  for a, b, name, target in (
    (("jax", "sora"), ("torch", "lora"), "our SoRA / PEFT LoRA", 0.75),
    (("jax", "sora"), ("jax", "lora"), "our SoRA / our LoRA", 1.05),
  ):
    ra, rb, together = _side_by_side(cases, a, b)
    if _median(ra) and _median(rb):
      ratio = _median(ra) / _median(rb)
      rounds_note = f"per round {_spread(ra, rb)}" if together else "timed in different rounds"
      checks.append(
        f"{where}: {name} = {ratio:.2f}, {rounds_note} (target <= {target}: {'met' if ratio <= target else 'missed'})"
      )
  ours_floor, torch_floor, _ = _side_by_side(cases, ("jax", "floor"), ("torch", "floor"))
  ours_floor, torch_floor = _median(ours_floor), _median(torch_floor)
  if ours_floor and torch_floor:
    sora, peft_lora = _median(_first(cases, ("jax", "sora"))), _median(_first(cases, ("torch", "lora")))
    checks.append(
      f"{where}: our floor / torch floor = {ours_floor / torch_floor:.2f}; our SoRA / our floor = "
      f"{_ratio(sora, ours_floor)}, PEFT LoRA / torch floor = {_ratio(peft_lora, torch_floor)} "
      "(separate rounds from the adapter rows)"
    )
  return checks


def _inference(cases, model_label, batch, where: str) -> tuple[list, list[str]]:
  """The inference table's row of one model and batch ([] when neither side ran) and its check."""
  o, t, _ = _side_by_side(cases, ("jax", "inference"), ("torch", "inference"))
  if not ((o and "error" not in o) or (t and "error" not in t)):
    return [], []
  cell = lambda r, k: _fmt_ms(_median(r, k)) if _median(r, k) else "-"  # noqa: E731
  row = [
    model_label,
    batch,
    cell(o, "base"),
    cell(o, "sora_merged"),
    _ratio(_median(o, "sora_merged"), _median(o, "base")),
    cell(o, "sora_factored"),
    _ratio(_median(o, "sora_factored"), _median(o, "base")),
    cell(t, "base"),
    cell(t, "lora_merged"),
    cell(t, "lora_unmerged"),
    _ratio(_median(o, "base"), _median(t, "base")),
    _ratio(_median(o, "sora_merged"), _median(t, "lora_merged")),
    _ratio(_median(o, "sora_factored"), _median(t, "lora_unmerged")),
  ]
  checks = []
  if _median(o, "sora_merged") and _median(o, "base"):
    ratio = _median(o, "sora_merged") / _median(o, "base")
    checks.append(
      f"{where}: our merged / base inference = {ratio:.3f}, per round "
      f"{_spread(o, o, 'sora_merged', 'base')} (target 1.00 +- 0.03: "
      f"{'met' if abs(ratio - 1) <= 0.03 else 'missed'})"
    )
  return [row], checks


def report(results, models, batches, args, label_of, seq, threads, errors) -> str:
  """The tables and the checks against issue 7's targets."""
  rows, inf_rows, checks = [], [], []
  for model in models:
    for batch in batches:
      cases = results.get((model, batch), {})
      where = f"{label_of(model)} b{batch}"
      rows += _train_rows(cases, label_of(model), batch)
      checks += _train_checks(cases, where)
      row, inference_checks = _inference(cases, label_of(model), batch, where)
      inf_rows += row
      checks += inference_checks
  return _format_report(rows, inf_rows, checks, batches, args, seq, threads, errors)


def _format_report(rows, inf_rows, checks, batches, args, seq, threads, errors) -> str:
  """The report's text: the train-step table, the inference table, the checks and any errors."""
  rounds = ", ".join(
    f"batch {b} ({_layout(b, args)}): " + ", ".join(f"{n} {k}" for k, n in _rounds(b, args).items()) for b in batches
  )
  model_desc = "2-layer 64-wide toy shapes (--tiny)" if args.tiny else "random weights"
  lines = [
    f"Train step, seq {seq}, rank 8 on six dense layers per block, {model_desc}; one process per case, the cases "
    f"of a group timed in turn, one step each per round, after 2 untimed steps; rounds per group: {rounds}; ms = median over rounds, "
    f"'per round' = range of ours/theirs within the rounds; {measure.cpu_count()} CPU cores, torch threads "
    f"{threads}, XLA: its default CPU thread pool (all cores); every case: "
    f"{measure.malloc_setting(measure.case_env(malloc=args.malloc))}; layout 'groups': the adapter cases alive and "
    f"timed together, 'pairs': the two cases of each ratio",
    "",
    measure.format_table(
      [
        "model",
        "batch",
        "row",
        "ours",
        "ours ms",
        "theirs",
        "theirs ms",
        "time ours/theirs",
        "per round",
        "ours MiB",
        "theirs MiB",
        "mem ours/theirs",
      ],
      rows,
    ),
  ]
  if inf_rows:
    lines += [
      "",
      "Inference (forward only, ms per batch; each framework's variants timed in turn in one process, the two "
      "processes in turn)",
      "",
      measure.format_table(
        [
          "model",
          "batch",
          "ours base",
          "ours merged",
          "merged/base",
          "ours factored",
          "factored/base",
          "torch base",
          "PEFT merged",
          "PEFT unmerged",
          "base ours/torch",
          "merged ours/torch",
          "unmerged ours/torch",
        ],
        inf_rows,
      ),
    ]
  lines += ["", *checks]
  if errors:
    lines += ["", "errors:", *errors]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
