"""Stopping a run on SIGTERM or SIGINT without losing its steps.

Schedulers send SIGTERM before they take a machine back; a user presses Ctrl-C (SIGINT). While `fit` trains, the
first of either signal only sets a flag: the current step finishes, the loop saves a checkpoint at that step and
raises `Preempted`, which `python -m train.glue` reports in one line with exit code `EXIT_PREEMPTED` (75, "try
again": `resume=true` continues exactly where it stopped). A second signal ends the process at once with
128 + the signal's number (143 for SIGTERM, 130 for SIGINT); the previous checkpoint stays intact because orbax
writes each checkpoint to a temporary folder first.

Outside the training loop (loading data, the final evaluation and export, a stage's save in `train.sparsify`),
`stop_outside_training` turns the first SIGTERM into `Terminated`: the code stops where it is, its `finally` blocks
run (the output directory's lock is released), and the program exits with `EXIT_PREEMPTED` too, since what it was
doing is redone by the same command with `resume=true` (every file is written whole or not at all). A second SIGTERM
ends the process at once (143).

On several processes every process must save at the same step (orbax's save is collective). `StopSignal.agreed`
takes the maximum of the processes' flags at each step (one small all-gather), so a signal that reaches one
process, or reaches them at different steps, stops all of them after the same step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal after saving a checkpoint; rerun with resume=true
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run stopped on a signal after `step`, with a checkpoint of that step in `directory`."""

  def __init__(self, signal_name: str, step: int, directory: str):
    self.signal_name, self.step, self.directory = signal_name, step, directory
    super().__init__(
      f"stopped by {signal_name} after step {step}; checkpoint of step {step} saved in "
      f"{directory}; rerun the same command with resume=true to continue"
    )


class Terminated(Exception):
  """SIGTERM reached the program outside its training loop; nothing finished is lost."""

  def __init__(self):
    super().__init__(
      "stopped by SIGTERM outside training (loading data, evaluating, exporting or saving a stage); what was "
      "finished is kept: rerun the same command with resume=true to continue"
    )


class stop_outside_training:
  """While active (a context manager, main thread only), the first SIGTERM raises `Terminated` where the program
  is; the second one ends it at once. `StopSignal` takes over during the training loop and gives it back after."""

  def __enter__(self) -> "stop_outside_training":
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while cleaning up ends the process
    raise Terminated()


class StopSignal:
  """While installed (or as a context manager), the first SIGTERM/SIGINT is recorded, the second exits at once.

  Handlers are installed only in the main thread (Python delivers signals there) and the previous ones are put
  back on exit.
  """

  def __init__(self):
    self.received: Optional[int] = None
    self._previous: dict = {}

  def install(self) -> "StopSignal":
    if threading.current_thread() is threading.main_thread():
      for sig in _SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def __enter__(self) -> "StopSignal":
    return self.install()

  def __exit__(self, *exc) -> None:
    self.restore()

  def _handle(self, signum, frame) -> None:
    if self.received is not None:
      print(
        f"{signal.Signals(signum).name} again: exiting now without a checkpoint (the previous one is intact)",
        file=sys.stderr,
        flush=True,
      )
      os._exit(128 + signum)
    self.received = signum
    print(
      f"{signal.Signals(signum).name} received: finishing this step and saving a checkpoint (send it again "
      "to exit at once)",
      file=sys.stderr,
      flush=True,
    )

  @property
  def name(self) -> str:
    return signal.Signals(self.received).name if self.received is not None else "a signal on another process"

  def agreed(self) -> bool:
    """Whether any process has received a stop signal; the same answer on every process (collective when there
    are several, so every process must call it at the same step)."""
    import jax

    if jax.process_count() == 1:
      return self.received is not None
    import numpy as np
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    return bool(np.max(flags))
