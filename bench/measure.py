"""Timing and memory measurement shared by the bench scripts.

Time: warm-up calls first (JAX compiles on the first call), then the median wall time of `repeats` calls; the callable
must block until its result exists (`jax.block_until_ready` for JAX; PyTorch on CPU is synchronous).

Memory: the peak resident set size of the process. Linux lets a process reset its high-water mark
(`echo 5 > /proc/self/clear_refs`), so a case resets it after warm-up and reads `VmHWM` after the timed calls; the
figure reported is that peak minus the resident size measured right after the framework was imported, i.e. the weights,
optimizer state, activations and allocator slack of the case. Cases whose memory is reported run in a fresh subprocess
(`run_case`) so that one case's allocator cache never hides another's peak.

Allocator: every case's process, JAX or PyTorch alike, starts with the glibc malloc settings `MALLOC_MODES[malloc]`
(`case_env`; default `retain`). XLA's CPU runtime allocates each execution's temporaries as one block (1.4 GB for a
BERT-base SoRA step at batch 8), which glibc maps fresh and unmaps on free, so every step faults all of it in again:
about 370,000 faults of 4 KiB, or 700 of 2 MiB with huge pages (`hugepages`), each page zeroed by the kernel.
PyTorch allocates and frees smaller blocks that glibc keeps in its heap. On a virtual machine that reports freed
memory to its host (virtio-balloon free page reporting, as on these machines) a block that stays unmapped for more
than a couple of seconds also has to be faulted in again on the host: a JAX step that waited while other cases ran
spent 3.5 s of kernel time. `retain` keeps freed memory in the process (one arena, large blocks from the heap, no
trimming), so a step reuses the pages of the one before.
"""

import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, NamedTuple

_MIB = 1024 * 1024
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: cwd and PYTHONPATH of cases


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


def reset_peak(trim: bool = True) -> bool:
  """Set the resident high-water mark to the current resident size, after handing freed heap back to the OS (`trim`);
  False where the kernel does not allow it."""
  if trim:
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


def time_interleaved(
  calls: dict[str, Callable[[], object]], *, warmup: int, repeats: int, settle: int = 1
) -> dict[str, Timing]:
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


def measure_step(step: Callable[[], object], *, baseline_mib: float, warmup: int, repeats: int) -> dict:
  """Time `step` and report the peak resident memory of its timed calls above `baseline_mib`."""
  for _ in range(warmup):
    step()
  resettable = reset_peak()
  step()  # the reset trims the heap; this maps back what a step needs, so the first timed step does not pay for it
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


# glibc malloc settings for a case's process (`GLIBC_TUNABLES`), by name:
#   retain     huge pages, and freed memory stays with the process: one arena, no mmap for large blocks (they come
#              from the heap) and no trimming of the heap, so each step reuses the pages of the one before
#   hugepages  huge pages only: large blocks are still mapped fresh and unmapped on free
#   default    glibc as configured by the environment
MALLOC_MODES = {
  "retain": (
    "glibc.malloc.hugetlb=1",
    "glibc.malloc.arena_max=1",
    "glibc.malloc.mmap_max=0",
    f"glibc.malloc.trim_threshold={2**40}",
  ),
  "hugepages": ("glibc.malloc.hugetlb=1",),
  "default": (),
}


def case_env(*, malloc: str = "retain") -> dict[str, str]:
  """The environment of a case's process: this one's, quiet logs, and the tunables of `MALLOC_MODES[malloc]` added
  to `GLIBC_TUNABLES` (a tunable that the environment already sets keeps its value)."""
  if malloc not in MALLOC_MODES:
    raise ValueError(f"unknown malloc mode {malloc!r}; choose from {sorted(MALLOC_MODES)}")
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  env.setdefault("TOKENIZERS_PARALLELISM", "false")
  env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  present = {t.split("=")[0] for t in tunables}
  tunables += [t for t in MALLOC_MODES[malloc] if t.split("=")[0] not in present]
  if tunables:
    env["GLIBC_TUNABLES"] = ":".join(tunables)
  return env


def malloc_setting(env: dict[str, str] | None = None) -> str:
  """One line for a table's header: what glibc's malloc was told (`GLIBC_TUNABLES`) in the cases' processes."""
  tunables = (os.environ if env is None else env).get("GLIBC_TUNABLES")
  return f"GLIBC_TUNABLES={tunables}" if tunables else "glibc malloc defaults"


def run_case(
  module: str, spec: dict, *, timeout: float | None = None, progress: bool = True, malloc: str = "retain"
) -> dict:
  """Run `python -m <module> '<json spec>'` in a fresh process and return the JSON object it prints last.

  The process gets `case_env(malloc=malloc)`.

  A failure returns `{"error": <last lines of stderr>}` instead of raising, so one broken case leaves the table intact.
  With `progress`, a line per case (its wall time including start-up, and its result) goes to stderr.
  """
  env = case_env(malloc=malloc)
  start = time.perf_counter()
  try:
    proc = subprocess.run(
      [sys.executable, "-m", module, json.dumps(spec)],
      capture_output=True,
      text=True,
      env=env,
      cwd=_ROOT,
      timeout=timeout,
    )
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    result = {"error": " | ".join(tail) or f"exit status {proc.returncode}"}
  else:
    result = json.loads(lines[-1])
  if progress:
    print(
      f"[{time.perf_counter() - start:5.0f} s] {module} {json.dumps(spec)} -> "
      f"{result.get('time_s', result.get('error'))}",
      file=sys.stderr,
      flush=True,
    )
  return result


def format_table(header: list[str], rows: list[list[object]]) -> str:
  """A GitHub-markdown table; floats are printed by the caller."""
  cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

  def line(row):
    return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

  rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


# Round robin across processes ---------------------------------------------------------------------------------------
#
# The step times of separate processes drift by 10-30 % between runs on shared machines, which is more than the
# ratios between frameworks that the benches must resolve. Timing both frameworks in one process is no cure: their
# thread pools slowed each other's steps by 15-35 % in two of three scratch runs (bench/README.md). So each case runs
# in a process of its own that waits for requests (`serve`), and the bench asks the cases for one step each in turn,
# round after round (`time_round_robin`): whatever load comes and goes hits every case of a round alike, and each case
# still has its own memory high-water mark.


class Worker:
  """A bench case in its own process: `python -m <module> --serve '<json spec>'` (see `serve`), started at once.

  `built()` waits until the case is built (models, parameters, compiled programs); `warm_up()` runs its warm-up steps;
  `step()` runs each of its callables once and returns their wall times; `stats()` returns its memory and fault
  counts; `close()` ends it. A failure anywhere turns into an `error` entry (`self.error`), so one broken case leaves
  the others' rows intact.
  """

  def __init__(self, module: str, spec: dict, *, malloc: str = "retain", label: str = ""):
    self.label = label or f"{module} {spec.get('kind')} {spec.get('method', '')}".strip()
    self.error: str | None = None
    self.info: dict = {}
    self._start = time.perf_counter()
    self._stderr = tempfile.TemporaryFile(mode="w+")
    self._proc = subprocess.Popen(
      [sys.executable, "-m", module, "--serve", json.dumps(spec)],
      cwd=_ROOT,
      env=case_env(malloc=malloc),
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=self._stderr,
      text=True,
      bufsize=1,
    )

  def _fail(self, what: str) -> dict:
    self._stderr.seek(0)
    tail = [line.strip() for line in self._stderr.read().strip().splitlines() if line.strip()][-3:]
    self.error = f"{what}: " + (" | ".join(tail) or f"exit status {self._proc.poll()}")
    self._proc.kill()
    return {"error": self.error}

  def _reply(self) -> dict:
    line = self._proc.stdout.readline()
    if not line:
      return self._fail("the case's process ended")
    return json.loads(line)

  def request(self, command: str) -> dict:
    if self.error:
      return {"error": self.error}
    try:
      self._proc.stdin.write(command + "\n")
      self._proc.stdin.flush()
    except OSError:
      return self._fail("the case's process ended")
    return self._reply()

  def built(self) -> dict:
    self.info = self._reply() if not self.error else {"error": self.error}
    return self.info

  def warm_up(self, progress: bool = True) -> dict:
    reply = self.request("warmup")
    if "error" in reply:
      self.info = reply
    if progress:
      print(
        f"[{time.perf_counter() - self._start:5.0f} s] {self.label}: "
        f"{'ready' if 'error' not in reply else reply['error']}",
        file=sys.stderr,
        flush=True,
      )
    return reply

  def step(self) -> dict:
    return self.request("step")

  def stats(self) -> dict:
    return self.request("stats")

  def close(self) -> None:
    if self._proc.poll() is None:
      try:
        self._proc.stdin.write("quit\n")
        self._proc.stdin.flush()
        self._proc.wait(timeout=60)
      except (OSError, subprocess.TimeoutExpired):
        self._proc.kill()
    self._stderr.close()


def start_workers(
  cases: dict[str, tuple[str, dict]], *, malloc: str = "retain", progress: bool = True
) -> dict[str, Worker]:
  """Start every case at once, so that their imports, model building and compiles (mostly one thread each) use the
  cores together; then warm them up one at a time (their steps use every core, and overlapping them only adds
  contention)."""
  workers = {name: Worker(module, spec, malloc=malloc, label=name) for name, (module, spec) in cases.items()}
  for worker in workers.values():
    worker.built()
  for worker in workers.values():
    if "error" not in worker.info:
      worker.warm_up(progress)
  return workers


def time_round_robin(workers: dict[str, Worker], *, rounds: int, pause_s: float = 0.1) -> dict[str, dict]:
  """Ask each worker for one step in turn, `rounds` times; the order rotates by one place each round.

  Before each request the bench sleeps `pause_s`, so that the thread pools of the case that ran last have gone idle.
  Returns, per worker, `{"times": {callable: [seconds per round]}, **stats}` or `{"error": ...}`.
  """
  names = list(workers)
  times = {name: {} for name in names}
  for round_index in range(rounds):
    order = names[round_index % len(names) :] + names[: round_index % len(names)]
    for name in order:
      time.sleep(pause_s)
      reply = workers[name].step()
      for call, seconds in reply.get("time_s", {}).items():
        times[name].setdefault(call, []).append(seconds)
  results = {}
  for name in names:
    stats = workers[name].stats()
    results[name] = stats if "error" in stats else {"times": times[name], **stats}
  return results


def serve(
  calls: dict[str, Callable[[], object]],
  *,
  baseline_mib: float,
  warmup: int,
  palindrome: bool = False,
  info: dict | None = None,
) -> None:
  """The worker side of `Worker`: run `calls` on request, answering one JSON line per request.

  It first announces that it is built (`info`). Then, per line read from stdin: `warmup` hands freed heap back to the
  OS (what building and compiling left), runs `warmup` untimed rounds of every callable, and resets the resident
  high-water mark (now the memory a step holds); `step` runs every callable once, in order, and answers
  `{"time_s": {name: seconds}}` (with `palindrome`, in order and then in reverse order, each timed, and answers the
  mean of each callable's two times: a drift in machine speed within the request then shifts all of them alike, which
  resolves ratios near one between callables of one process); `stats` answers the peak resident memory above
  `baseline_mib` since the warm-up, and per timed call the minor page faults and CPU seconds; `quit` ends. Anything the libraries print goes to stderr: stdout carries the answers only.
  """
  answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

  def answer(obj: dict) -> None:
    answers.write(json.dumps(obj) + "\n")

  answer({"built": True, **(info or {})})
  timed, resettable = 0, False
  before = resource.getrusage(resource.RUSAGE_SELF)
  for line in sys.stdin:
    command = line.strip()
    if command == "warmup":
      release_free_memory()
      for _ in range(max(warmup, 1)):
        for call in calls.values():
          call()
      resettable = reset_peak(trim=False)
      before = resource.getrusage(resource.RUSAGE_SELF)
      answer({"ready": True})
    elif command == "step":
      order = list(calls) + (list(reversed(calls)) if palindrome else [])
      result = {name: 0.0 for name in calls}
      for name in order:
        start = time.perf_counter()
        calls[name]()
        result[name] += time.perf_counter() - start
      timed += 1
      answer({"time_s": {name: t / (2 if palindrome else 1) for name, t in result.items()}})
    elif command == "stats":
      after = resource.getrusage(resource.RUSAGE_SELF)
      per_call = max(timed * (2 if palindrome else 1) * len(calls), 1)
      answer(
        {
          "peak_mib": peak_rss_mib() - baseline_mib,
          "peak_after_warmup": resettable,
          "steps": timed,
          "minor_faults": (after.ru_minflt - before.ru_minflt) / per_call,
          "system_s": (after.ru_stime - before.ru_stime) / per_call,
          "user_s": (after.ru_utime - before.ru_utime) / per_call,
        }
      )
    elif command == "quit":
      break
    else:
      answer({"error": f"unknown command {command!r}; send warmup, step, stats or quit"})
