"""What `python -m train.glue` and `python -m train.sparsify` share around their run: quiet library banners and
one-line errors.

A configuration or data problem (`ConfigError`, `DataError`) or an output directory another run holds
(`RunDirectoryError`) is printed as one line `error: ...` on stderr with exit code 2; a run stopped by a non-finite
step (`NonFiniteError`) or a checkpoint that cannot be saved or resumed (`CheckpointError`, also a resume with a
changed config) as one line with exit code 1. A run stopped by SIGTERM/SIGINT after saving its checkpoint
(`train.preemption.Preempted`) prints one line and exits with 75; a second signal exits at once with 128 + the
signal's number; Ctrl-C outside training exits with 130. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Callable


def quiet_libraries() -> None:
    """Silences transformers' advisory banners ("PyTorch was not found ..."): the JAX trainer does not need torch.

    Must run before transformers is first imported; a value the user set in the environment wins.
    """
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def initialize_distributed() -> None:
    """`sora_jax.sharding.maybe_initialize_distributed`, with an incomplete JAX_* environment as a `ConfigError`."""
    from sora_jax.sharding import maybe_initialize_distributed
    from train.config import ConfigError
    try:
        maybe_initialize_distributed()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def fail(error: BaseException, code: int = 2) -> int:
    """Prints `error` as one line on stderr and returns the exit code."""
    message = " ".join(str(error).split("\n"))
    print(f"error: {message}", file=sys.stderr)
    return code


def run_guarded(start: Callable[[], int]) -> int:
    """Runs `start()`, turning the errors a user can fix into one line and an exit code (see the module docstring)."""
    try:
        return start()
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
