"""Plan a pod before you have one: a real-size SoRA / LoRA / full fine-tuning step compiled for a mesh of up to 2048
devices on a CPU host, never run, weights never allocated.

For each mesh (fsdp x tp, Tunix's axes: weights and the batch over 'fsdp', heads and features over 'tp') and each
method it builds the Tunix model abstractly (`nnx.eval_shape`), attaches adapters (rank 8 on the seven projections of
every layer), compiles the whole train step ahead of time (bench/scale_step.py) on fake CPU devices, with Tunix's
activation sharding constraints applied as on an accelerator (bench/scale_model.py), and prints per device:
argument / temporary / peak memory, FLOPs, collectives by kind (count and MiB) and the mesh axes they span, which
device memories the peak fits in, and SoRA's ratios to LoRA and full fine-tuning (train/aot.py).

Depth: the step is compiled at each of `--layers` (a few small depths) and every number is fitted linearly in the
depth and predicted at `--predict` (default: the model's own depth); `--layers 36` compiles the full depth itself.
Memory and FLOPs are the partitioned program's; collective counts and temporaries are XLA's CPU compiler's, to be read
as ratios between methods (docs/scale.md).

  python -m bench.scale                                         # qwen3-8b, fsdp 8 x tp 8, batch 16 x 1024
  python -m bench.scale --model llama3-70b --mesh 16x8 32x8 --batch 64 --dtype bfloat16
  python -m bench.scale --mesh 8x8 --layers 36 --predict 0      # the full-depth compile, no fit
  python -m bench.scale --layers 36 --method sora lora --attach-only   # time attaching adapters, no compile
Bad arguments are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
  from train import aot

MAX_DEVICES = 2048  # the CPU backend's device ids must stay below this


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  from bench import scale_model
  from train import aot

  parser = argparse.ArgumentParser(
    prog="python -m bench.scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--model", default="qwen3-8b", choices=sorted(scale_model.MODELS))
  parser.add_argument("--mesh", nargs="+", default=["8x8"], help="fsdp x tp, e.g. 8x8 64x4 (up to 2048 devices)")
  parser.add_argument("--batch", type=int, default=16, help="global batch (sequences); divisible by fsdp")
  parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
  parser.add_argument("--dtype", default="float32", choices=scale_model.DTYPES, help="weights and activations")
  parser.add_argument("--method", nargs="+", default=["sora", "lora", "full"], choices=scale_model.METHODS)
  parser.add_argument("--layers", nargs="+", type=int, default=[2, 4], help="depths to compile")
  parser.add_argument(
    "--predict",
    type=int,
    default=None,
    help="depth to predict by a linear fit over --layers (default: the model's; 0: no fit)",
  )
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument(
    "--memory",
    nargs="+",
    type=float,
    default=list(aot.DEVICE_MEMORIES_GIB),
    help="device memories (GiB) to check the peak against",
  )
  parser.add_argument(
    "--cpu-program",
    action="store_true",
    help="leave Tunix's activation constraints off, as Tunix does on CPU (not an accelerator's program)",
  )
  parser.add_argument(
    "--attach-only",
    action="store_true",
    help="time building the abstract model with each method's adapters at each --layers; no compile",
  )
  parser.add_argument("--json", action="store_true", help="also print one JSON line with every number")
  args = parser.parse_args(argv)
  meshes = []
  for text in args.mesh:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if match is None:
      parser.error(f"--mesh {text!r}: write fsdp x tp as e.g. 8x8")
    meshes.append((int(match[1]), int(match[2])))
    if int(match[1]) * int(match[2]) > MAX_DEVICES:
      parser.error(
        f"--mesh {text} needs {int(match[1]) * int(match[2])} devices; XLA's CPU backend has at most {MAX_DEVICES}"
      )
  args.mesh = meshes
  _set_devices(max(f * t for f, t in meshes))  # reading Tunix's configs imports JAX
  config = scale_model.model_config(args.model)
  args.predict = config.num_layers if args.predict is None else args.predict
  for fsdp, tp in meshes:
    if config.num_kv_heads % tp:
      parser.error(f"--mesh {fsdp}x{tp}: tp must divide {args.model}'s {config.num_kv_heads} key/value heads")
    if args.batch % fsdp:
      parser.error(f"--batch {args.batch} must be divisible by fsdp = {fsdp} (the batch is split over 'fsdp')")
  if min(args.layers) < 1:
    parser.error("--layers must be positive")
  if args.predict and args.predict not in args.layers and len(set(args.layers)) < 2 and not args.attach_only:
    parser.error(f"--predict {args.predict} needs at least two different --layers to fit (or --predict 0)")
  return args


def _set_devices(count: int) -> None:
  """Fake CPU devices for the mesh; must run before JAX is imported."""
  if "jax" in sys.modules:
    import jax

    if jax.device_count() < count:
      raise SystemExit(
        f"error: JAX is already running with {jax.device_count()} devices; run `python -m "
        f"bench.scale` in a fresh process (it needs {count})"
      )
    return
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"


def predict(costs: dict[int, "aot.StepCost"], depth: int) -> "aot.StepCost":
  """Every number of `costs` (one StepCost per compiled depth) fitted as a + b * depth, evaluated at `depth`."""
  import numpy as np

  from train import aot

  depths = sorted(costs)
  if depth in costs:
    return costs[depth]

  def fit(values):
    slope, intercept = np.polyfit(depths, values, 1)
    return max(0.0, float(intercept + slope * depth))

  field = lambda name: round(fit([getattr(costs[d], name) for d in depths]))
  keys = sorted({(c.kind, c.axes) for d in depths for c in costs[d].collectives})
  collectives = []
  for kind, axes in keys:
    of = lambda d, attr: sum(getattr(c, attr) for c in costs[d].collectives if (c.kind, c.axes) == (kind, axes))
    count = round(fit([of(d, "count") for d in depths]))
    if count:
      collectives.append(aot.Collective(kind, axes, count, round(fit([of(d, "bytes") for d in depths]))))
  return aot.StepCost(
    argument=field("argument"),
    output=field("output"),
    alias=field("alias"),
    temp=field("temp"),
    flops=fit([costs[d].flops for d in depths]),
    collectives=tuple(collectives),
  )


def _ratio(a: float, b: float) -> str:
  return f"{a / b:.4f}" if b else "-"


def ratios(costs: dict[str, "aot.StepCost"]) -> str:
  """SoRA against LoRA and full fine-tuning: peak, temp, FLOPs, collective count and bytes."""
  from train import aot

  rows = []
  for other in ("lora", "full"):
    if "sora" in costs and other in costs:
      s, o = costs["sora"], costs[other]
      rows.append(
        [
          f"sora / {other}",
          _ratio(s.peak, o.peak),
          _ratio(s.temp, o.temp),
          _ratio(s.flops, o.flops),
          _ratio(s.count(), o.count()),
          f"{s.count() - o.count():+d}",
          _ratio(s.collective_bytes(), o.collective_bytes()),
        ]
      )
  if not rows:
    return ""
  return aot._markdown(["ratio", "peak", "temp", "FLOPs", "collectives", "difference", "collective bytes"], rows)  # pylint: disable=protected-access


def time_attach(args: argparse.Namespace) -> dict:
  """Seconds to build the abstract model with each method's adapters (`scale_model.abstract_model`) per depth."""
  import jax

  from bench import scale_model

  fsdp, tp = args.mesh[0]
  mesh = jax.make_mesh(
    (fsdp, tp), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[: fsdp * tp]
  )
  family = scale_model.MODELS[args.model][0]
  seconds = {}
  for depth in sorted(set(args.layers)):
    config = scale_model.model_config(args.model, layers=depth, dtype=args.dtype)
    for method in args.method:
      start = time.perf_counter()
      scale_model.abstract_model(config, family, method, mesh, rank=args.rank, dtype=args.dtype)
      seconds[f"{method} L={depth}"] = time.perf_counter() - start
      print(
        f"{args.model} {method} {depth} layers on {fsdp} x {tp}: abstract model with adapters in "
        f"{seconds[f'{method} L={depth}']:.1f} s"
      )
  return {"attach_s": seconds}


def run(args: argparse.Namespace) -> dict:
  """Compiles every (mesh, method, depth), prints the tables, returns every number."""
  import jax

  from bench import measure, scale_model, scale_step
  from train import aot

  config = scale_model.model_config(args.model)
  print(
    f"{args.model}: {config.num_layers} layers x {config.embed_dim} (MLP {config.hidden_dim}, heads "
    f"{config.num_heads}/{config.num_kv_heads} x {config.head_dim}, vocab {config.vocab_size}); batch {args.batch} "
    f"x {args.seq} tokens, {args.dtype}, rank {args.rank} on 7 projections per layer; "
    f"{'CPU program (no activation constraints)' if args.cpu_program else 'activation constraints on'}; "
    f"XLA {jax.default_backend()}, {measure.cpu_count()} host cores"
  )
  report = {"model": args.model, "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "meshes": []}
  for fsdp, tp in args.mesh:
    devices = jax.devices()[: fsdp * tp]
    mesh = jax.make_mesh((fsdp, tp), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)
    compiled_rows, timing, entry = [], [], {"fsdp": fsdp, "tp": tp, "steps": []}
    predicted = {}
    for method in args.method:
      costs = {}
      for depth in sorted(set(args.layers)):
        step = scale_step.compile_step(
          args.model,
          method,
          mesh,
          layers=depth,
          batch=args.batch,
          seq=args.seq,
          dtype=args.dtype,
          rank=args.rank,
          activation_constraints=not args.cpu_program,
        )
        cost = aot.step_cost(step.compiled, mesh)
        costs[depth] = cost
        compiled_rows.append((f"{method} L={depth}", cost))
        timing.append(
          f"{method} L={depth}: attach {step.attach_s:.1f} s, lower {step.lower_s:.1f} s, compile "
          f"{step.compile_s:.1f} s, host peak RSS {measure.peak_rss_mib():,.0f} MiB"
        )
        entry["steps"].append(
          {
            "method": method,
            "layers": depth,
            **cost.as_dict(),
            "attach_s": step.attach_s,
            "lower_s": step.lower_s,
            "compile_s": step.compile_s,
            "argument_shard_bytes": aot.sharded_bytes(step.arguments),
            "outputs_match_inputs": step.outputs_match_inputs,
            "trainable_specs": {k: str(v) for k, v in step.trainable_specs.items()},
            "opt_specs": {k: str(v) for k, v in step.opt_specs.items()},
          }
        )
        del step
      if args.predict:
        predicted[method] = predict(costs, args.predict)
      else:
        predicted[method] = costs[max(costs)]
    depth = args.predict or max(args.layers)
    print(f"\nmesh fsdp {fsdp} x tp {tp} ({fsdp * tp} devices), per device:\n")
    print(aot.format_cost(compiled_rows, args.memory))
    if args.predict and args.predict not in args.layers:
      print(f"\nfitted linearly over layers {sorted(set(args.layers))}, predicted at {depth} layers:\n")
      print(aot.format_cost([(f"{m} L={depth}", c) for m, c in predicted.items()], args.memory))
    for method, cost in predicted.items():
      print(f"\n{method} L={depth} collectives by mesh axes:\n{aot.format_axes(cost)}")
    text = ratios(predicted)
    if text:
      print(f"\nat {depth} layers:\n\n{text}")
    print("\n" + "\n".join(timing))
    entry["predicted"] = {m: c.as_dict() for m, c in predicted.items()}
    entry["predicted_layers"] = depth
    report["meshes"].append(entry)
  return report


def main(argv: Sequence[str] | None = None) -> int:
  sys.stdout.reconfigure(line_buffering=True)  # tables as they are ready: a big mesh takes minutes
  args = parse_args(argv)
  start = time.perf_counter()
  report = time_attach(args) if args.attach_only else run(args)
  from bench import measure

  print(f"\nwall time {time.perf_counter() - start:.0f} s, host peak RSS {measure.peak_rss_mib():,.0f} MiB")
  if args.json:
    print(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
