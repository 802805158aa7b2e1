"""The one `main()` of the three programs `python -m train.glue`, `train.sparsify` and `train.pareto`.

Each program hands `main` its docstring, its `--help` table, a loader and a runner; `main` does the rest in one order:
`--help`, flags, the config (file and `key=value` overrides), warnings, malloc, `jax.distributed` (several hosts), the
run, and the exit code.

A configuration or data problem (`ConfigError`, `DataError`) or an output directory another run holds
(`RunDirectoryError`) is printed as one line `error: ...` on stderr with exit code 2; a run stopped by a non-finite
step (`NonFiniteError`) or a checkpoint that cannot be saved or resumed (`CheckpointError`, also a resume with a
changed config) as one line with exit code 1. A run stopped by SIGTERM/SIGINT after saving its checkpoint
(`train.preemption.Preempted`) prints one line and exits with 75, and so does SIGTERM outside the training loop
(`train.preemption.Terminated`: loading data, exporting; the lock is released); a second signal exits at once with
128 + the signal's number; Ctrl-C outside training exits with 130. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional, Sequence


def quiet_libraries() -> None:
  """Silences transformers' advisory banners ("PyTorch was not found ..."): the JAX trainer does not need torch.

  Must run before transformers is first imported; a value the user set in the environment wins.
  """
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


INIT_TIMEOUT_S = 300  # default wait for every process of a multi-host run; env SORA_JAX_INIT_TIMEOUT_S overrides
INIT_NOTICE_S = 5  # after this long without all processes, say what the start is waiting for


def initialize_distributed() -> None:
  """`sora_jax.sharding.maybe_initialize_distributed`, with an incomplete JAX_* environment as a `ConfigError`.

  A start that waits for missing processes says so on stderr after `INIT_NOTICE_S` seconds, and after the timeout
  (`SORA_JAX_INIT_TIMEOUT_S`, default `INIT_TIMEOUT_S`) ends the process with one line and exit code 2; JAX's own
  limit is set later, so its abort with a C++ stack trace is never reached.
  """
  import threading
  from sora_jax.sharding import maybe_initialize_distributed
  from train.config import ConfigError

  raw = os.environ.get("SORA_JAX_INIT_TIMEOUT_S", str(INIT_TIMEOUT_S))
  try:
    timeout = int(raw)
  except ValueError:
    raise ConfigError(f"SORA_JAX_INIT_TIMEOUT_S={raw!r} must be a whole number of seconds") from None
  where = (
    f"{os.environ.get('JAX_NUM_PROCESSES', 'all')} processes at {os.environ['JAX_COORDINATOR_ADDRESS']} "
    f"(this is process {os.environ.get('JAX_PROCESS_ID', '?')})"
    if os.environ.get("JAX_COORDINATOR_ADDRESS")
    else "the cluster's other processes"
  )

  def notice():
    print(
      f"waiting for {where}; giving up after {timeout} s (SORA_JAX_INIT_TIMEOUT_S): start every process",
      file=sys.stderr,
      flush=True,
    )

  def give_up():
    print(
      f"error: not every one of {where} started within {timeout} s; start all of them with the same "
      "JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES, or raise SORA_JAX_INIT_TIMEOUT_S",
      file=sys.stderr,
      flush=True,
    )
    os._exit(2)

  timers = [threading.Timer(min(INIT_NOTICE_S, timeout / 2), notice), threading.Timer(timeout, give_up)]
  for timer in timers:
    timer.daemon = True
    timer.start()
  try:
    maybe_initialize_distributed(initialization_timeout=timeout + 60)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  finally:
    for timer in timers:
      timer.cancel()


def fail(error: BaseException, code: int = 2) -> int:
  """Prints `error` as one line on stderr and returns the exit code."""
  message = " ".join(str(error).split("\n"))
  print(f"error: {message}", file=sys.stderr)
  return code


def run_guarded(start: Callable[[], int]) -> int:
  """Runs `start()`, turning the errors a user can fix into one line and an exit code (see the module docstring)."""
  from train.preemption import EXIT_PREEMPTED, Terminated, stop_outside_training

  try:
    with stop_outside_training():
      return start()
  except Terminated as e:
    print(str(e), file=sys.stderr)
    return EXIT_PREEMPTED
  except KeyboardInterrupt:  # Ctrl-C before or after training (during it, train.preemption saves and stops)
    print("error: interrupted (SIGINT) outside training; nothing to save", file=sys.stderr)
    return 130
  except Exception as e:
    # Imported here, not above: train.loop and train.checkpoint import JAX, which `start` must import first
    # (after train.allocator has set up malloc); when one of these errors is raised its module is loaded.
    from train.preemption import EXIT_PREEMPTED, Preempted

    if isinstance(e, Preempted):
      print(str(e), file=sys.stderr)
      return EXIT_PREEMPTED
    from train.config import ConfigError
    from train.data import DataError
    from train.rundir import RunDirectoryError

    if isinstance(e, (ConfigError, DataError, RunDirectoryError)):
      return fail(e, 2)
    from train.checkpoint import CheckpointError
    from train.loop import NonFiniteError

    if isinstance(e, (NonFiniteError, CheckpointError)):
      return fail(e, 1)
    raise


def main(
  argv: Optional[Sequence[str]],
  *,
  doc: str,
  help_text: Callable[[], str],
  load: Callable[[Optional[str], list[str], frozenset[str]], tuple[Any, Any]],
  run: Callable[[Any, Any], Any],
  flags: Sequence[str] = (),
) -> int:
  """Runs one program: `python -m train.<program> [config.yaml] [key=value ...] [--flag ...]`.

  Args:
    argv: the arguments (default `sys.argv[1:]`).
    doc: printed by `-h` / `--help`, followed by `help_text()` (the config keys).
    help_text: the keys table, computed only when asked for.
    load: `(yaml path or None, key=value overrides, flags given) -> (RunConfig, program settings)`; a
      `ValueError` (`ConfigError` included) is one line `error: ...` and exit code 2.
    run: `(RunConfig, program settings) -> result`, called after malloc is set up and, where the environment
      describes several hosts, `jax.distributed` is started; a `None` result is exit code 1 (unless the run was
      asked to abort, `train.abort_at_step`).
    flags: the `--name` arguments the program accepts besides `--help`; any other `--name` is an error.

  Returns:
    The exit code: 0 done, 1 the run stopped (non-finite step, unreadable checkpoint), 2 bad config or data.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in ("-h", "--help"):
    try:
      print(doc)
      print(help_text(), flush=True)
    except BrokenPipeError:  # `--help | head`: the reader has gone; point stdout at devnull so the exit flush is quiet
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
  unknown = [a for a in argv if a.startswith("--") and a not in flags]
  if unknown:
    accepted = ", ".join(("--help",) + tuple(flags))
    return fail(
      ValueError(f"unknown option {unknown[0]}; this program takes {accepted}, a config file and key=value overrides")
    )
  given = frozenset(a for a in argv if a in flags)
  argv = [a for a in argv if a not in flags]
  quiet_libraries()
  path = argv.pop(0) if argv and "=" not in argv[0] else None
  try:
    config, settings = load(path, argv, given)
  except ValueError as e:  # ConfigError, and the programs' own checks
    return fail(e)
  from train.config import config_warnings

  for warning in config_warnings(config):
    print(f"warning: {warning}", file=sys.stderr)

  def start() -> int:
    from train.allocator import configure

    configure(config.train.malloc)  # before JAX's threads first allocate (train/allocator.py)
    initialize_distributed()  # before any other JAX call, when several hosts are described
    result = run(config, settings)
    return 0 if result is not None or config.train.abort_at_step is not None else 1

  return run_guarded(start)
