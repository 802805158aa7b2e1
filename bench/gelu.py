"""The exact GELU written with erf (ours, PyTorch's formula) against `jax.nn.gelu(approximate=False)`, which uses erfc.

Both compute x * Phi(x). XLA's CPU backend expands erfc into a piecewise approximation with an exponential, several
loop fusions; erf is one polynomial. Timed in turn in one process, started with the benches' malloc settings
(`bench.measure.case_env`): the activation alone on a BERT-base intermediate activation (batch 8 x seq 128 x 3072),
forward and forward plus backward, and a whole SoRA train step (`bench.jax_cases`) traced once with each form, the
two steps alternating in order round by round.

  python -m bench.gelu                  # 12 rounds of the BERT-base step (about 2 minutes on 2 cores)
  python -m bench.gelu --no-step        # the activation alone (seconds)
"""
import argparse
import statistics
import subprocess
import sys
import time

from bench import measure


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=12, help="rounds of the train steps")
  parser.add_argument("--model", default="bert", choices=("bert", "deberta"))
  parser.add_argument("--no-step", action="store_true", help="only the activation, not the train step")
  parser.add_argument("--in-process", action="store_true", help="run here, with this process's malloc settings")
  args = parser.parse_args(argv)
  if not args.in_process:
    argv = list(sys.argv[1:] if argv is None else argv) + ["--in-process"]
    out = subprocess.run([sys.executable, "-m", "bench.gelu", *argv], env=measure.case_env(), check=True,
                         capture_output=True, text=True).stdout
    print(out, end="")
    return out

  import functools

  import jax
  import numpy as np

  from bench import jax_cases
  from bench.model_configs import hf_config
  from sora_jax.models import activations

  forms = {"erf (ours)": activations.gelu, "erfc (jax.nn.gelu)": functools.partial(jax.nn.gelu, approximate=False)}
  x = jax.numpy.asarray(np.random.default_rng(0).standard_normal((8, 128, 3072), dtype=np.float32))
  calls = {}
  for name, fn in forms.items():
    forward = jax.jit(fn)
    grad = jax.jit(jax.grad(lambda v, fn=fn: fn(v).sum()))
    calls[f"{name}, forward"] = lambda forward=forward: forward(x).block_until_ready()
    calls[f"{name}, forward + backward"] = lambda grad=grad: grad(x).block_until_ready()
  rows = [[name, f"{1e3 * t.median_s:.2f}"] for name, t in
          measure.time_interleaved(calls, warmup=2, repeats=10).items()]
  text = [f"GELU on (8, 128, 3072) float32, ms, median of 10 calls in turn; {measure.malloc_setting()}", "",
          measure.format_table(["form", "ms"], rows)]

  if not args.no_step:
    config = hf_config(args.model)
    module, params, inputs, labels = jax_cases.build(args.model, config, batch=8, seq=128)
    steps = {}
    for name, fn in forms.items():
      saved = activations.ACTIVATIONS["gelu"]
      activations.ACTIVATIONS["gelu"] = fn  # read while the step is traced (train_step compiles it)
      try:
        steps[name] = jax_cases.train_step(args.model, "sora", module, params, inputs, labels)[0]
      finally:
        activations.ACTIVATIONS["gelu"] = saved
    times = {name: [] for name in steps}
    for step in steps.values():
      step()
    for round_index in range(args.rounds):
      for name in (list(steps) if round_index % 2 == 0 else list(reversed(steps))):
        start = time.perf_counter()
        steps[name]()
        times[name].append(time.perf_counter() - start)
    ours, theirs = (times[name] for name in forms)
    ratios = [a / b for a, b in zip(ours, theirs)]
    text += ["", f"{args.model} SoRA train step (seq 128, batch 8), {args.rounds} rounds, order alternating: erf "
             f"{1e3 * statistics.median(ours):.0f} ms, erfc {1e3 * statistics.median(theirs):.0f} ms (medians); "
             f"erf / erfc per round: median {statistics.median(ratios):.3f}, range {min(ratios):.2f}-"
             f"{max(ratios):.2f}; ratio of the total times {sum(ours) / sum(theirs):.3f}"]
  out = "\n".join(text)
  print(out)
  return out


if __name__ == "__main__":
  main()
