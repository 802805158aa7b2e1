"""The run log: metrics.jsonl and TensorBoard events in the output directory, cut back to the step a run resumes
from."""

from __future__ import annotations

import json
import os

import jax

from train.jsonio import write_text


def _truncate_log(path: str, start_step: int) -> None:
  """Keeps the records of `path` up to `start_step`; a line cut short by a kill (not JSON) is dropped with a note.
  The file is rewritten beside itself and renamed, so a kill now loses nothing."""
  kept, broken = [], 0
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        broken += 1
        continue
      if isinstance(record, dict) and record.get("step", 0) <= start_step:
        kept.append(line if line.endswith("\n") else line + "\n")
  if broken:
    print(f"note: {path}: dropped {broken} unreadable line(s) (cut short when the run was stopped)")
  write_text(path, kept)


class RunLog:
  """metrics.jsonl and TensorBoard events in the output directory (process 0 only)."""

  def __init__(self, output_dir: str, start_step: int):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(output_dir, "metrics.jsonl")
    self.writer = None
    if not self.enabled:
      return
    os.makedirs(output_dir, exist_ok=True)
    if os.path.exists(self.path):  # drop records past the step we resume from
      _truncate_log(self.path, start_step)
    from tensorboardX import SummaryWriter

    self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step or None)

  def write(self, step: int, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **record}) + "\n")
    for key, value in record.items():
      if isinstance(value, (int, float)):
        self.writer.add_scalar(key, value, step)
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
