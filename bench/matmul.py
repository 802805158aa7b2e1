"""One dense product at a time, JAX (jitted) against PyTorch (eager), on the CPU this runs on.

The shapes are those of a BERT-base layer at batch 8 x seq 128 = 1024 rows (--rows to change): the four 768 x 768
attention kernels, the 768 x 3072 intermediate and the 3072 x 768 output. These products are most of a train step, so their rates bound how
far either framework can pull ahead of the other on the whole step (issue 7's floor rows).

  python -m bench.matmul                 # median of 20 calls per shape and framework
  python -m bench.matmul --repeats 5     # quicker
  python -m bench.matmul --rows 4096     # batch 32 x seq 128
"""
import argparse

from bench import measure

SHAPES = ((768, 768), (768, 3072), (3072, 768))  # (fan_in, fan_out) of the six kernels of a BERT-base layer


def _median_ms(call, repeats: int) -> float:
  return 1e3 * measure.time_calls(call, warmup=2, repeats=repeats).median_s


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--rows", type=int, default=1024, help="rows of the activation (batch x seq)")
  parser.add_argument("--threads", type=int, default=0, help="torch threads (default: the cores of this process)")
  args = parser.parse_args(argv)

  import jax
  import numpy as np
  import torch
  torch.set_num_threads(args.threads or measure.cpu_count())
  product = jax.jit(lambda x, w: x @ w)
  rows = []
  gen = np.random.default_rng(0)
  rows_ = args.rows
  for fan_in, fan_out in SHAPES:
    x = gen.standard_normal((rows_, fan_in), dtype=np.float32)
    w = gen.standard_normal((fan_in, fan_out), dtype=np.float32)
    x_jax, w_jax = jax.numpy.asarray(x), jax.numpy.asarray(w)
    x_torch, w_torch = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(w.T))  # nn.Linear's layout
    ours = _median_ms(lambda: product(x_jax, w_jax).block_until_ready(), args.repeats)
    theirs = _median_ms(lambda: torch.nn.functional.linear(x_torch, w_torch), args.repeats)
    gflop = 2 * rows_ * fan_in * fan_out / 1e9
    rows.append([f"({rows_}, {fan_in}) x ({fan_in}, {fan_out})", f"{ours:.2f}", f"{gflop / ours * 1e3:.0f}",
                 f"{theirs:.2f}", f"{gflop / theirs * 1e3:.0f}", f"{ours / theirs:.2f}"])
  text = "\n".join([
      f"float32 dense products, median of {args.repeats} calls; {measure.cpu_count()} CPU cores, jax "
      f"{jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)", "",
      measure.format_table(["product", "JAX ms", "JAX GFLOP/s", "torch ms", "torch GFLOP/s", "JAX / torch"], rows)])
  print(text)
  return text


if __name__ == "__main__":
  main()
