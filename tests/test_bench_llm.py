"""Smoke test of bench/llm.py: it runs at a toy size and prints its tables (no timing is asserted)."""

import pytest

pytest.importorskip("tunix")

from bench import llm  # noqa: E402


def test_llm_bench_prints_cases_ratios_and_memory():
  text = llm.main(
    [
      "--layers",
      "1",
      "--hidden",
      "128",
      "--seq",
      "8",
      "--batch",
      "1",
      "--vocab",
      "256",
      "--rounds",
      "1",
      "--in-process",
    ]
  )
  for case in llm.CASES:
    assert f"| {case} " in text
  for ratio in ("SoRA step / LoRA step", "merged / base inference", "proximal / SoRA step"):
    assert f"| {ratio} " in text
  rows = {
    tuple(cell.strip() for cell in line.strip("|").split("|")[:3]): line
    for line in text.splitlines()
    if line.startswith("| qwen3") or line.startswith("| llama3")
  }
  assert set(rows) == {
    ("qwen3", "-", "float32"),
    ("qwen3", "MLP", "int8"),
    ("qwen3", "MLP", "nf4"),
    ("llama3", "-", "float32"),
    ("llama3", "all 7", "int8"),
    ("llama3", "all 7", "nf4"),
  }


def test_llm_bench_rejects_a_hidden_size_that_heads_of_128_do_not_divide():
  with pytest.raises(SystemExit):
    llm.parse_args(["--hidden", "100"])
