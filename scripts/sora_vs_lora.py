"""SoRA against LoRA at the same rank on the built-in WordNet task: one `python -m train.glue` run per method and seed,
then one table of test accuracy and retained adapter parameters read from each run's results.json.

Usage: python scripts/sora_vs_lora.py [seed ...]     (default seeds 0 21 42; runs go to runs/sora_vs_lora/)
"""
import json
import pathlib
import statistics
import subprocess
import sys

METHODS = {"sora": "configs/glue/wordnet.yaml", "lora": "configs/glue/wordnet_lora.yaml"}


def main(seeds: list[int]) -> None:
  root = pathlib.Path("runs/sora_vs_lora")
  rows = []
  for seed in seeds:
    for method, config in METHODS.items():
      out = root / f"{method}_{seed}"
      if not (out / "results.json").exists():
        subprocess.run([sys.executable, "-m", "train.glue", config, f"seed={seed}", f"output_dir={out}",
                        "train.progress=false"], check=True)
      results = json.loads((out / "results.json").read_text())
      rows.append((method, seed, results["metrics"]["validation/accuracy"], results["metrics"]["test/accuracy"],
                   results["retained_fraction"] if "retained_fraction" in results else 1.0,
                   min(results.get("ranks", {"-": 8}).values())))
  print("| method | seed | validation acc | test acc | retained adapter params | lowest module rank |")
  print("|---|---|---|---|---|---|")
  for method, seed, val, test, fraction, low in rows:
    print(f"| {method} | {seed} | {val:.3f} | {test:.3f} | {fraction:.3f} | {low} |")
  for method in METHODS:
    tests = [r[3] for r in rows if r[0] == method]
    spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
    print(f"| {method} | mean | | {statistics.mean(tests):.3f} +- {spread:.3f} | | |")


if __name__ == "__main__":
  main([int(s) for s in sys.argv[1:]] or [0, 21, 42])
