"""What glibc's malloc on transparent huge pages does to a train step: page faults, kernel time and wall time.

glibc serves each large block with a fresh `mmap` and unmaps it on free, so a process that allocates its activations
anew every step (XLA's CPU runtime does) faults all of them in again, one fault per 4 KiB page. Started with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, malloc asks for transparent huge pages (2 MiB) instead. Each case here runs in
its own process started that way (`bench.measure.case_env`) and times its step with huge pages allowed and forbidden
(`prctl(PR_SET_THP_DISABLE)`, which gives back the 4 KiB default), the two settings alternating in blocks within the
process (`bench.measure.time_huge_pages`), so load on a shared machine hits both alike. Cases: our floor and SoRA step
(JAX) and the torch floor and PEFT LoRA step (PyTorch eager), random weights, seq 128.

Needs Linux with transparent_hugepage in `madvise` mode (the default of many distributions) and glibc 2.35 or newer;
elsewhere both settings behave alike and the table shows ratios near one.

  python -m bench.page_faults                       # BERT-base shape, batch 8 (about 6 minutes on 2 cores)
  python -m bench.page_faults --tiny --rounds 1     # a 2-layer toy shape: checks that it all runs
"""
import argparse
import time

from bench import measure
from bench.model_configs import TINY_SHAPE

CASES = (("jax", "floor"), ("jax", "sora"), ("torch", "floor"), ("torch", "lora"))
_MODULES = {"jax": "bench.jax_cases", "torch": "bench.torch_cases"}
_LABELS = {("jax", "floor"): "ours floor", ("jax", "sora"): "ours SoRA", ("torch", "floor"): "torch floor",
           ("torch", "lora"): "PEFT LoRA"}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="bert", choices=("bert", "deberta"))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=4,
                      help="blocks per setting in each process (each block: 1 untimed step and 2 timed ones)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--tiny", action="store_true", help="2-layer 64-wide model, seq 16 (smoke test)")
  return parser.parse_args(argv)


def main(argv=None) -> str:
  args = parse_args(argv)
  shape, seq = (TINY_SHAPE, 16) if args.tiny else ({}, args.seq)
  start = time.perf_counter()
  results, errors = {}, []
  for framework, method in CASES:
    spec = {"kind": "huge_pages", "model": args.model, "method": method, "batch": args.batch, "seq": seq,
            "shape": shape, "warmup": args.warmup, "rounds": args.rounds}
    result = measure.run_case(_MODULES[framework], spec, timeout=900, malloc="hugepages")
    if "error" in result:
      errors.append(f"{framework} {method}: {result['error']}")
    else:
      results[(framework, method)] = result

  rows = []
  for case, r in results.items():
    t, f, k = r["time_s"], r["minor_faults"], r["system_s"]
    rows.append([_LABELS[case], f"{1e3 * t['off']:.0f}", f"{1e3 * t['on']:.0f}", f"{t['on'] / t['off']:.2f}",
                 f"{f['off']:,.0f}", f"{f['on']:,.0f}", f"{k['off']:.2f}", f"{k['on']:.2f}"])
  notes = []
  sora, lora = results.get(("jax", "sora")), results.get(("torch", "lora"))
  if sora and lora:
    for setting, name in (("off", "4 KiB pages"), ("on", "huge pages")):
      notes.append(f"ours SoRA / PEFT LoRA, both on {name}: {sora['time_s'][setting] / lora['time_s'][setting]:.2f}")
  model = f"{args.model}, 2 layers x 64 (--tiny)" if args.tiny else f"{args.model}-base shape"
  title = (f"Train step, {model}, seq {seq}, batch {args.batch}; one process per case, started with "
           f"{measure.malloc_setting(measure.case_env(malloc='hugepages'))}, huge pages forbidden and allowed in "
           f"{args.rounds} alternating blocks each (median of {2 * args.rounds} timed steps per setting); "
           f"{measure.cpu_count()} CPU cores")
  table = measure.format_table(["case", "ms/step 4 KiB", "ms/step huge", "huge / 4 KiB", "faults/step 4 KiB",
                                "faults/step huge", "kernel CPU s 4 KiB", "kernel CPU s huge"], rows)
  lines = [title, "", table, "", *notes]
  if errors:
    lines += ["", "errors:", *errors]
  lines.append(f"wall time of the bench: {time.perf_counter() - start:.0f} s")
  text = "\n".join(lines)
  print(text)
  return text


if __name__ == "__main__":
  main()
