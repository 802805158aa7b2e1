"""The code base's shape: small files, short functions, imports that run one way (read with `ast`, nothing imported).

- no .py file of sora_jax/ or train/ over 600 lines;
- no function outside tests/ over 80 lines of code (its docstring not counted);
- sora_jax/ imports nothing from train/ or bench/.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
# Files over the limit, each with the reason it is not split yet; an entry for a file that fits fails the test.
OVER_LIMIT: dict[str, str] = {}


def _python_files(*folders):
  for folder in folders:
    for directory, _, names in os.walk(os.path.join(ROOT, folder)):
      yield from (os.path.join(directory, name) for name in sorted(names) if name.endswith(".py"))


def _code_lines(node: ast.AST) -> int:
  """Lines of a function from its first statement after the docstring to its end."""
  body = node.body
  if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
    body = body[1:]
  return node.end_lineno - body[0].lineno + 1


def _long_functions(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  return [
    f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} ({_code_lines(node)} lines)"
    for node in ast.walk(tree)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > MAX_FUNCTION_LINES
  ]


def test_no_file_of_the_library_or_the_trainer_is_over_600_lines():
  long = []
  for path in _python_files("sora_jax", "train"):
    with open(path, encoding="utf-8") as f:
      n = sum(1 for _ in f)
    if n > MAX_FILE_LINES:
      long.append(os.path.relpath(path, ROOT))
  assert sorted(long) == sorted(OVER_LIMIT), f"files over {MAX_FILE_LINES} lines: {long}; split them by job"


def test_no_function_outside_the_tests_is_over_80_lines():
  long = [line for path in _python_files("sora_jax", "train", "bench", "examples") for line in _long_functions(path)]
  assert long == [], f"functions over {MAX_FUNCTION_LINES} lines of code: {long}"


def _imported_modules(path: str) -> set[str]:
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module)
  return names


def test_the_library_imports_nothing_from_the_programs():
  wrong = sorted(
    f"{os.path.relpath(path, ROOT)} imports {name}"
    for path in _python_files("sora_jax")
    for name in _imported_modules(path)
    if name.split(".")[0] in ("train", "bench")
  )
  assert wrong == []


@pytest.mark.parametrize(
  "source, found",
  [
    ("def f():\n" + "  x = 1\n" * 81, True),
    ('def f():\n  """doc\n' + "  more\n" * 30 + '  """\n' + "  x = 1\n" * 80, False),
  ],
)
def test_the_function_check_counts_code_lines(tmp_path, source, found):
  path = tmp_path / "m.py"
  path.write_text(source)
  assert bool(_long_functions(str(path))) == found
