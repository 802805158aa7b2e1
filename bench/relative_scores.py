"""DeBERTa's relative-position scores, by diagonals (`deberta_v2.relative_scores`) against a gather, in one process.

The c2p and p2c terms of one DeBERTa-v3-base attention layer (batch 8, 12 heads of 64, 256 position buckets, shared
position projections): out[b, h, i, j] = content[b, h, i] . pos[h, index[i, j]] for query and key, p2c transposed.
  gather     `deberta_v2.gathered_scores`: the score against every one of the 2 x 256 position rows, then
             `take_along_axis` of each (i, j) entry, as transformers' PyTorch model does (and ours did before)
  diagonals  `sora_jax.models.deberta_v2.relative_scores`: one product per diagonal of (i, j) plus a skew, with a
             hand-written VJP
Rows: forward; gradient w.r.t. query and key (the floor, and LoRA without the position projections); gradient w.r.t.
query, key and the position rows too (SoRA or LoRA on query_proj / key_proj, which also project the positions). The two
formulations are timed in turn, round by round, so that load on a shared machine hits both alike.

  python -m bench.relative_scores                  # seq 128 and 512, median of 5 rounds
  python -m bench.relative_scores --seq 128,256,512 --repeats 9
"""
import argparse

from bench import measure

BATCH, HEADS, HEAD_DIM, SPAN, BUCKETS, MAX_POSITION = 8, 12, 64, 256, 256, 512


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seq", default="128,512", help="comma-separated sequence lengths")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from sora_jax.models.deberta_v2 import gathered_scores, relative_positions, relative_scores

  rows = []
  for seq in [int(s) for s in args.seq.split(",") if s]:
    gen = np.random.default_rng(0)
    query, key = (jnp.asarray(gen.standard_normal((BATCH, HEADS, seq, HEAD_DIM), dtype=np.float32)) for _ in "qk")
    pos = jnp.asarray(gen.standard_normal((HEADS, 2 * SPAN, HEAD_DIM), dtype=np.float32))
    relative = relative_positions(seq, BUCKETS, MAX_POSITION)
    c2p_index = np.clip(relative + SPAN, 0, 2 * SPAN - 1)
    p2c_index = np.clip(-relative + SPAN, 0, 2 * SPAN - 1)
    ways = {"gather": gathered_scores, "diagonals": relative_scores}
    functions = {}
    for name, scores in ways.items():
      def both(q, k, p, scores=scores):
        return scores(q, p, c2p_index) + jnp.swapaxes(scores(k, p, p2c_index), -1, -2)

      def loss(q, k, p, both=both):
        return jnp.sum(jnp.sin(both(q, k, p)))  # a nonlinear read-out, so every entry's cotangent differs

      functions["forward", name] = jax.jit(both)
      functions["grad q, k", name] = jax.jit(jax.grad(loss, argnums=(0, 1)))
      functions["grad q, k, pos", name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    for row in ("forward", "grad q, k", "grad q, k, pos"):
      # One row at a time, so that each call follows a call of its own size (a call right after a much larger one
      # pays for the page faults of re-growing the heap).
      calls = {name: (lambda fn=functions[row, name]: jax.block_until_ready(fn(query, key, pos))) for name in ways}
      timings = measure.time_interleaved(calls, warmup=1, repeats=args.repeats)
      gather, diagonals = (1e3 * timings[name].median_s for name in ways)
      rows.append([seq, row, f"{gather:.1f}", f"{diagonals:.1f}", f"{diagonals / gather:.2f}"])
  text = "\n".join([
      f"c2p + p2c scores of one DeBERTa-v3-base layer (batch {BATCH}, {HEADS} heads x {HEAD_DIM}, {BUCKETS} buckets),"
      f" ms, median of {args.repeats} rounds timed in turn; {measure.cpu_count()} CPU cores, jax {jax.__version__}",
      "", measure.format_table(["seq", "computes", "gather ms", "diagonals ms", "diagonals / gather"], rows)])
  print(text)
  return text


if __name__ == "__main__":
  main()
