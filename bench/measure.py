"""Timing and memory measurement shared by the bench scripts.

Time: warm-up calls first (JAX compiles on the first call), then the median wall time of `repeats` calls; the callable
must block until its result exists (`jax.block_until_ready` for JAX; PyTorch on CPU is synchronous).

Memory: the peak resident set size of the process. Linux lets a process reset its high-water mark
(`echo 5 > /proc/self/clear_refs`), so a case resets it after warm-up and reads `VmHWM` after the timed calls; the
figure reported is that peak minus the resident size measured right after the framework was imported, i.e. the weights,
optimizer state, activations and allocator slack of the case. Cases whose memory is reported run in a fresh subprocess
(`run_case`) so that one case's allocator cache never hides another's peak.

Allocator: `run_case` starts every case, JAX or PyTorch alike, with glibc's malloc asking for transparent huge pages
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`; `hugepages=False` leaves the environment as it is). glibc serves each large
block with a fresh `mmap` and returns it on free, so memory touched by a step is faulted in again by the next one, one
fault per 4 KiB page. XLA's CPU runtime allocates every step's activations anew: a BERT-base SoRA step took about
260,000 minor faults and 0.7-0.9 s of kernel time, against 10,000-25,000 faults for PyTorch's. With huge pages
(where the kernel's transparent_hugepage mode is `madvise`, its default on many distributions) both take under 1,500.
`python -m bench.page_faults` measures the effect on each framework's step, the two settings timed in turn in one
process (`time_huge_pages`).
"""
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, NamedTuple

_MIB = 1024 * 1024


class Timing(NamedTuple):
  median_s: float
  min_s: float
  repeats: int


def cpu_count() -> int:
  """Cores this process may run on (the affinity mask, not the machine's count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _status_kib(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def rss_mib() -> float:
  """Current resident set size in MiB."""
  kib = _status_kib("VmRSS")
  if kib is None:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return kib / 1024


def peak_rss_mib() -> float:
  """Resident high-water mark in MiB since the process started or since the last `reset_peak`."""
  kib = _status_kib("VmHWM")
  if kib is None:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return kib / 1024


def release_free_memory() -> None:
  """Collect garbage and hand freed heap pages back to the OS (glibc), so they stop counting as resident."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def reset_peak() -> bool:
  """Set the resident high-water mark to the current resident size; False where the kernel does not allow it."""
  release_free_memory()
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def time_calls(call: Callable[[], object], *, warmup: int, repeats: int) -> Timing:
  """Median wall time of `repeats` calls of `call` after `warmup` untimed calls."""
  for _ in range(warmup):
    call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return Timing(statistics.median(times), min(times), repeats)


def time_interleaved(calls: dict[str, Callable[[], object]], *, warmup: int, repeats: int,
                     settle: int = 1) -> dict[str, Timing]:
  """Like `time_calls` for several callables, alternating between them each round so that load which comes and goes
  on a shared machine affects all of them alike (used where a ratio near 1 must be resolved, e.g. merged vs base).

  Each timed call follows `settle` untimed calls of the same callable, as each step of a training loop follows
  another of its own. With glibc's malloc on huge pages (`case_env`), the first call of a JAX program after a
  different one ran about 10 % slower: BERT-base steps timed in the order floor, SoRA, LoRA without settling put SoRA
  at 1.08x the floor and LoRA at 0.96x; in the order floor, LoRA, SoRA, LoRA at 1.11x and SoRA at 1.02x.
  """
  for call in calls.values():
    for _ in range(warmup):
      call()
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      for _ in range(settle):
        call()
      start = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - start)
  return {name: Timing(statistics.median(t), min(t), repeats) for name, t in times.items()}


def set_transparent_huge_pages(enabled: bool) -> None:
  """Allow (True) or forbid (False) transparent huge pages for this process from now on (Linux
  `prctl(PR_SET_THP_DISABLE)`); memory already mapped keeps its pages. Raises OSError where the kernel refuses."""
  libc = ctypes.CDLL("libc.so.6", use_errno=True)
  if libc.prctl(41, 0 if enabled else 1, 0, 0, 0) != 0:  # 41: PR_SET_THP_DISABLE
    errno = ctypes.get_errno()
    raise OSError(errno, f"prctl(PR_SET_THP_DISABLE) failed: {os.strerror(errno)}")


def time_huge_pages(step: Callable[[], object], *, warmup: int, rounds: int, steps_per_block: int = 2) -> dict:
  """Time `step` with transparent huge pages allowed and forbidden, in one process, the two alternating in blocks.

  For an effect to show, the process must have started with glibc's malloc asking for huge pages (`case_env()`);
  forbidding them then gives back glibc's default behaviour of 4 KiB pages. Each round runs one block per setting, the
  order alternating between rounds; a block is one untimed step (the first step after a switch still holds memory
  mapped under the other setting) and `steps_per_block` timed ones. Returns, per setting ("on", "off"), the median
  wall time per step and the mean minor page faults and kernel CPU seconds per timed step.
  """
  for _ in range(warmup):
    step()
  times = {"on": [], "off": []}
  faults = {"on": 0, "off": 0}
  system = {"on": 0.0, "off": 0.0}
  try:
    for round_index in range(rounds):
      for setting in (("off", "on") if round_index % 2 == 0 else ("on", "off")):
        set_transparent_huge_pages(setting == "on")
        step()
        for _ in range(steps_per_block):
          before = resource.getrusage(resource.RUSAGE_SELF)
          start = time.perf_counter()
          step()
          times[setting].append(time.perf_counter() - start)
          after = resource.getrusage(resource.RUSAGE_SELF)
          faults[setting] += after.ru_minflt - before.ru_minflt
          system[setting] += after.ru_stime - before.ru_stime
  finally:
    set_transparent_huge_pages(True)
  count = rounds * steps_per_block
  return {
      "time_s": {k: statistics.median(v) for k, v in times.items()},
      "minor_faults": {k: v / count for k, v in faults.items()},
      "system_s": {k: v / count for k, v in system.items()},
      "steps": count,
  }


def measure_step(step: Callable[[], object], *, baseline_mib: float, warmup: int, repeats: int) -> dict:
  """Time `step` and report the peak resident memory of its timed calls above `baseline_mib`."""
  for _ in range(warmup):
    step()
  resettable = reset_peak()
  before = resource.getrusage(resource.RUSAGE_SELF)
  timing = time_calls(step, warmup=0, repeats=repeats)
  after = resource.getrusage(resource.RUSAGE_SELF)
  return {
      "time_s": timing.median_s,
      "min_s": timing.min_s,
      "repeats": timing.repeats,
      "peak_mib": peak_rss_mib() - baseline_mib,
      "peak_after_warmup": resettable,
      # Per timed step, averaged: page faults served without I/O, and CPU seconds in the kernel and in user space.
      "minor_faults": (after.ru_minflt - before.ru_minflt) / repeats,
      "system_s": (after.ru_stime - before.ru_stime) / repeats,
      "user_s": (after.ru_utime - before.ru_utime) / repeats,
  }


HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def case_env(*, hugepages: bool = True) -> dict[str, str]:
  """The environment of a case's process: this one's, quiet logs, and with `hugepages` glibc's malloc on transparent
  huge pages (`HUGEPAGE_TUNABLE` added to `GLIBC_TUNABLES`, unless that already sets `glibc.malloc.hugetlb`)."""
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  env.setdefault("TOKENIZERS_PARALLELISM", "false")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  tunables = env.get("GLIBC_TUNABLES", "")
  if hugepages and "glibc.malloc.hugetlb" not in tunables:
    env["GLIBC_TUNABLES"] = f"{tunables}:{HUGEPAGE_TUNABLE}" if tunables else HUGEPAGE_TUNABLE
  return env


def malloc_setting(env: dict[str, str] | None = None) -> str:
  """One line for a table's header: what glibc's malloc was told (`GLIBC_TUNABLES`) in the cases' processes."""
  tunables = (os.environ if env is None else env).get("GLIBC_TUNABLES")
  return f"GLIBC_TUNABLES={tunables}" if tunables else "glibc malloc defaults"


def run_case(module: str, spec: dict, *, timeout: float | None = None, progress: bool = True,
             hugepages: bool = True) -> dict:
  """Run `python -m <module> '<json spec>'` in a fresh process and return the JSON object it prints last.

  The process gets `case_env(hugepages=hugepages)`.

  A failure returns `{"error": <last lines of stderr>}` instead of raising, so one broken case leaves the table intact.
  With `progress`, a line per case (its wall time including start-up, and its result) goes to stderr.
  """
  env = case_env(hugepages=hugepages)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  start = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=root, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    result = {"error": " | ".join(tail) or f"exit status {proc.returncode}"}
  else:
    result = json.loads(lines[-1])
  if progress:
    print(f"[{time.perf_counter() - start:5.0f} s] {module} {json.dumps(spec)} -> "
          f"{result.get('time_s', result.get('error'))}", file=sys.stderr, flush=True)
  return result


def format_table(header: list[str], rows: list[list[object]]) -> str:
  """A GitHub-markdown table; floats are printed by the caller."""
  cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  def line(row):
    return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
  rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])
