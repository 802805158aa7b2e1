"""Documentation that runs: every ```python block of README.md and docs/*.md, and the scripts in examples/; and
documentation that speaks of the product, not of how it was built (no issue numbers, sessions, stopped runs).

A block runs in a fresh Python subprocess (offline, repository root as working directory and on the path) and must
exit 0 within BLOCK_TIMEOUT_S. A block whose first line is exactly `# sketch: see examples/<file>.py` (or
`tests/<file>.py`) is not run; the file it points to must exist. Blocks are found when the tests are collected, so
blocks added later are covered without touching this file. A failure names the file and line of the block.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/*.md")
BLOCK_TIMEOUT_S = 300
SKETCH = re.compile(r"# sketch: see ((?:examples|tests)/[\w./-]+\.py)")


# Product pages state results with their command, machine and date; these words tell the story of how the project
# was built instead. Each is a regex, matched case-insensitively line by line.
PRODUCT_PAGES = ("README.md", "docs/*.md", "bench/README.md")
PROCESS_WORDS = (
  r"\bissues? ?#?\d+",  # "issue 7", "issues 2", "Issue #17"
  r"(?<![\w&/])#\d+\b",  # "#17" (not an HTML entity or a URL path)
  r"\b(?:this|that|an? earlier|earlier|previous|founding|other|next|the same) sessions?\b",
  r"\b(?:was|were) stopped\b|\bstopped (?:because|during|to keep)\b",
  r"\bprevious main\b",
  r"\bgit history\b",
  r"\b(?:the default now|now the default)\b",
  r"\bno longer\b",
  r"\bfirst attempt\b",
  r"\bas told below\b",
)
_PROCESS = re.compile("|".join(f"(?:{w})" for w in PROCESS_WORDS), re.IGNORECASE)


def process_words(text: str) -> list[tuple[int, str]]:
  """(line, 1-based; the word found) for every line of a markdown text that speaks of how the project was built."""
  return [(i, m.group(0)) for i, line in enumerate(text.splitlines(), 1) for m in [_PROCESS.search(line)] if m]


def python_blocks(text: str) -> list[tuple[int, str]]:
  """(line of the opening fence, 1-based; code) for every fenced ```python block of a markdown text."""
  blocks, lines = [], text.splitlines()
  i = 0
  while i < len(lines):
    opening = re.fullmatch(r"( *)(`{3,}|~{3,})\s*python\b.*", lines[i])
    if not opening:
      i += 1
      continue
    indent, fence = len(opening.group(1)), opening.group(2)
    start, body = i + 1, []
    i += 1
    while i < len(lines) and not re.fullmatch(r" *" + re.escape(fence[0]) + "{%d,}\\s*" % len(fence), lines[i]):
      body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i].lstrip())
      i += 1
    if i == len(lines):
      raise ValueError(f"line {start}: ```python block is never closed")
    blocks.append((start, "\n".join(body) + "\n"))
    i += 1
  return blocks


def _doc_files(patterns: tuple[str, ...] = DOCS) -> list[pathlib.Path]:
  return sorted({p for pattern in patterns for p in ROOT.glob(pattern)})


def _cases() -> list:
  cases = []
  for path in _doc_files():
    name = path.relative_to(ROOT).as_posix()
    for line, code in python_blocks(path.read_text()):
      cases.append(pytest.param(name, line, code, id=f"{name}:{line}"))
  return cases


def offline_env() -> dict[str, str]:
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  return env


def run_block(name: str, line: int, code: str, timeout_s: float = BLOCK_TIMEOUT_S) -> str | None:
  """None when the block is a sketch whose target exists or runs cleanly; otherwise why it failed."""
  first = code.split("\n", 1)[0].rstrip()
  if first.startswith("# sketch"):
    match = SKETCH.fullmatch(first)
    if not match:
      return (
        f"{name}:{line}: sketch marker {first!r} must read exactly "
        f"'# sketch: see examples/<file>.py' (or tests/<file>.py)"
      )
    if not (ROOT / match.group(1)).is_file():
      return f"{name}:{line}: the sketch points to {match.group(1)}, which does not exist"
    return None
  try:
    # Blank lines up to the fence, so that a traceback's line numbers are the markdown file's.
    done = subprocess.run(
      [sys.executable, "-c", "\n" * line + code],
      cwd=ROOT,
      env=offline_env(),
      capture_output=True,
      text=True,
      timeout=timeout_s,
    )
  except subprocess.TimeoutExpired:
    return f"{name}:{line}: the python block did not finish within {timeout_s} s"
  if done.returncode != 0:
    return (
      f"{name}:{line}: the python block exits with {done.returncode} (make it run, or mark it with a first "
      f"line '# sketch: see examples/<file>.py'):\n{done.stderr[-3000:]}"
    )
  return None


@pytest.mark.parametrize("name,line,code", _cases())
def test_doc_python_block_runs(name, line, code):
  failure = run_block(name, line, code)
  assert failure is None, failure


def test_docs_have_python_blocks():
  """Guards the discovery itself: README's library block must be found (an empty parametrization passes)."""
  assert any(name == "README.md" for name, *_ in (c.values for c in _cases()))


def test_block_extraction_and_failures_name_file_and_line(tmp_path):
  text = (
    "intro\n```python\nx = 1\n```\n\n  ```python\n  import sys\n  sys.exit(3)\n  ```\n"
    "```bash\necho no\n```\n````python\nprint('```')\n````\n"
  )
  blocks = python_blocks(text)
  assert [line for line, _ in blocks] == [2, 6, 13]
  assert blocks[1][1] == "import sys\nsys.exit(3)\n" and blocks[2][1] == "print('```')\n"
  assert run_block("doc.md", 2, blocks[0][1]) is None
  assert run_block("doc.md", 6, blocks[1][1]).startswith("doc.md:6: the python block exits with 3")
  assert "line 8, in <module>" in run_block("doc.md", 6, "x = 1\nundefined_name\n")  # the markdown's line
  assert "did not finish within 0.5 s" in run_block("doc.md", 9, "import time\ntime.sleep(30)\n", timeout_s=0.5)
  assert run_block("doc.md", 1, "# sketch: see examples/linen_sora.py\nundefined_name\n") is None
  assert "does not exist" in run_block("doc.md", 1, "# sketch: see examples/nothing_here.py\n")
  assert "must read exactly" in run_block("doc.md", 1, "# sketch: see the example\n")


def test_product_pages_have_no_process_words():
  pages = _doc_files(PRODUCT_PAGES)
  assert {"README.md", "bench/README.md"} <= {p.relative_to(ROOT).as_posix() for p in pages}
  found = [
    f"{p.relative_to(ROOT).as_posix()}:{line}: {word!r}" for p in pages for line, word in process_words(p.read_text())
  ]
  assert not found, (
    "product pages speak of how the project was built; state the result, its command, machine and "
    "date instead:\n" + "\n".join(found)
  )


@pytest.mark.parametrize(
  "line,flagged",
  [
    ("As issue 7 asked, the step is 0.75x.", True),
    ("see #17 for the fix", True),
    ("Issue #3", True),
    ("measured in this session", True),
    ("an earlier session gave 0.88", True),
    ("the run was stopped at 3e-4", True),
    ("on previous main", True),
    ("tables are in the git history", True),
    ("2e-4 (the default now)", True),
    ("the floor is no longer in the table", True),
    ("`python -m train.glue` on 2 CPU cores, 2026-12-01: 0.900", False),
    ("&#8212; a dash", False),
    ("[docs](docs/results.md#the-default-run)", False),
    ("a session of Tunix's PeftTrainer", False),
    ("ranks 2-8, 36 modules; issued a warning", False),
    ("(run stopped during its final test evaluation)", True),
    ("a run stopped by a non-finite step exits with 1", False),
  ],
)
def test_process_words_are_found_on_their_line(line, flagged):
  assert bool(process_words("intro\n" + line)) is flagged
  if flagged:
    assert process_words("intro\n" + line)[0][0] == 2


@pytest.mark.slow
def test_linen_example_runs_and_checks_what_it_prints(tmp_path):
  out = tmp_path / "peft"
  done = subprocess.run(
    [sys.executable, str(ROOT / "examples" / "linen_sora.py"), "--out", str(out)],
    cwd=ROOT,
    env=offline_env(),
    capture_output=True,
    text=True,
    timeout=900,
  )
  printed = done.stdout
  assert done.returncode == 0, printed[-3000:] + done.stderr[-3000:]
  zero, total = map(int, re.search(r"gates exactly zero: (\d+) of (\d+)", printed).groups())
  assert 0 < zero < total, printed  # some ranks switched off, not all
  for what in ("pruned", "merged"):
    diff = float(re.search(rf"max \|logit difference\| {what} vs trained: (\S+)", printed).group(1))
    assert diff < 1e-4, (what, diff)
  assert float(re.search(r"validation accuracy \(merged\): (\S+)", printed).group(1)) > 0.8
  assert "FAIL" not in printed and printed.count("\nok ") == 5, printed
  assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
