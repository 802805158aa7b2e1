"""train.allocator: with `retain_freed_memory`, a block freed on a worker thread is reused, not faulted in again."""

import json
import platform
import subprocess
import sys

import pytest

# A 64 MiB block allocated, written and freed on a thread other than the main one, as XLA's CPU runtime does with a
# step's temporaries. glibc's default maps such a block afresh each time (above its largest mmap threshold, 32 MiB).
_STEPS_ON_A_THREAD = """
import json, resource, sys, threading
if sys.argv[1] == "retain":
  from train.allocator import retain_freed_memory
  assert retain_freed_memory()
import numpy as np

def steps(n):
  for _ in range(n):
    np.ones(8 * 2**20).sum()

def on_thread(n):
  thread = threading.Thread(target=steps, args=(n,))
  thread.start()
  thread.join()

on_thread(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
on_thread(4)
print(json.dumps({"faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4}))
"""


def _faults_per_step(mode: str) -> float:
  out = subprocess.run(
    [sys.executable, "-c", _STEPS_ON_A_THREAD, mode],
    capture_output=True,
    text=True,
    check=True,
    env={"PATH": "", "PYTHONPATH": ":".join(sys.path)},
  ).stdout
  return json.loads(out.splitlines()[-1])["faults_per_step"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings of glibc")
def test_retain_freed_memory_stops_the_per_step_faults_of_a_large_block_on_a_thread():
  faults = {mode: _faults_per_step(mode) for mode in ("default", "retain")}
  # Mapped anew each step: at least 32 faults (2 MiB pages), 16,384 with 4 KiB pages; kept in the heap: next to none.
  assert faults["default"] >= 32 and faults["retain"] < 16, faults
