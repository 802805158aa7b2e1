"""Host memory allocator settings for training processes: keep freed memory instead of handing it back to the OS.

XLA's CPU runtime allocates the temporaries of each compiled step as one block and frees it at the end (1.4 GB for a
BERT-base SoRA step at batch 8, seq 128). glibc serves a block that large with a fresh `mmap` and returns it with
`munmap`, so every step faults the whole block in again, page by page, each page zeroed by the kernel; on a virtual
machine that reports free memory to its host (virtio-balloon free page reporting) the host may have to fault it in a
second time. `retain_freed_memory` makes glibc keep what a process freed, so a step reuses the pages of the step before:

  * `M_ARENA_MAX = 1`: one arena for every thread (a non-main arena can only grow by `mmap`);
  * `M_MMAP_MAX = 0`: large blocks come from the heap, not from their own mappings;
  * `M_TRIM_THRESHOLD = -1`: the heap is never trimmed, so freed pages stay resident.

It acts through `mallopt(3)`, so it must run before the runtime's threads start allocating (before JAX's first
computation). The cost is memory: the process keeps its peak resident size until it exits. It is the in-process
form of `GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...` that the
benches set (`bench.measure.MALLOC_MODES["retain"]`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
RETAIN = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))


def _libc() -> ctypes.CDLL | None:
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
  except OSError:
    return None


def retain_freed_memory() -> bool:
  """Set glibc's malloc to keep freed memory in this process (`RETAIN`, see the module docstring).

  Returns True when glibc accepted every setting; False where the C library is not glibc (macOS, musl), which
  leaves the allocator as it was.
  """
  libc = _libc()
  if libc is None:
    return False
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return all(libc.mallopt(param, value) == 1 for param, value in RETAIN)


def configure(malloc: str) -> bool:
  """Apply the `train.malloc` setting: "retain" calls `retain_freed_memory` (and returns its answer), "default"
  leaves glibc as it is (False). Call it before JAX's first computation."""
  return retain_freed_memory() if malloc == "retain" else False
