"""Resume that always resumes, exports that respect the user's folders, hostile files and values refused in one line.

Each test is a case a hostile but realistic user ran into: a run killed between its first kept-best checkpoint and its
first periodic one, a finished run whose checkpoints were deleted, exports through symlinked folders, a budget below
one rank, values that pass a range check and crash later, hostile PEFT configs, stale stage records and lock files.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_run_args  # noqa: E402


def _config(tiny, output_dir, *overrides):
  from train.config import load_config

  return load_config(None, [*tiny_run_args(tiny, output_dir), "train.progress=false", *overrides])


# ---------------------------------------------------------------------------------------------------------------
# resume


@pytest.mark.slow
def test_a_run_killed_after_its_first_best_checkpoint_resumes_from_it(tiny, tmp_path, capsys):
  """eval_every < save_every: the kill after step 3 leaves only the kept-best checkpoint of step 2; resume=true
  continues from it and ends as the uninterrupted run."""
  from train import loop

  run = ("train.max_steps=6", "train.eval_every=2", "train.save_every=100", "train.final_params=last")
  expected = loop.run(_config(tiny, tmp_path / "a", *run))
  assert loop.run(_config(tiny, tmp_path / "b", *run, "train.abort_at_step=3")) is None
  assert not os.listdir(tmp_path / "b" / "checkpoints" / "latest")  # no periodic checkpoint yet
  capsys.readouterr()
  resumed = loop.run(_config(tiny, tmp_path / "b", *run, "resume=true"))
  assert "at step 2" in capsys.readouterr().out
  assert resumed["metrics"] == expected["metrics"] and resumed["best"] == expected["best"]
  assert resumed["ranks"] == expected["ranks"]


def test_resume_into_a_finished_run_without_checkpoints_is_refused(tmp_path):
  from train.rundir import RunDirectoryError, claim

  (tmp_path / "results.json").write_text("{}")
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
  (tmp_path / "checkpoints" / "latest").mkdir(parents=True)
  with pytest.raises(RunDirectoryError) as e:
    claim(str(tmp_path), resume=True, overwrite=False)
  message = str(e.value)
  assert "\n" not in message and "no checkpoint" in message and "overwrite=true" in message
  assert (tmp_path / "results.json").exists() and not (tmp_path / ".lock").exists()


def test_resume_into_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path, capsys):
  from train.rundir import claim, release

  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
  (tmp_path / "checkpoints" / "latest").mkdir(parents=True)
  lock = claim(str(tmp_path), resume=True, overwrite=False)
  release(lock)
  assert "no checkpoint" in capsys.readouterr().out


def test_resume_and_overwrite_together_are_refused_in_one_line():
  from train.config import ConfigError, load_config

  with pytest.raises(ConfigError) as e:
    load_config(None, ["resume=true", "overwrite=true"])
  assert "\n" not in str(e.value) and "resume" in str(e.value) and "overwrite" in str(e.value)


def test_best_checkpoint_is_a_starting_point_when_no_latest_one_restores(tmp_path):
  import jax.numpy as jnp
  from train.checkpoint import Checkpoints

  state = {"params": {"w": jnp.full((4, 4), 2.0)}, "opt": jnp.arange(3.0), "step": jnp.asarray(2)}
  parts = lambda s: (s["params"], {"opt": s["opt"], "step": s["step"]})  # noqa: E731
  join = lambda params, rest: {"params": params, **rest}  # noqa: E731
  writer = Checkpoints(str(tmp_path / "checkpoints"), parts=(parts, join))
  writer.save_best(2, state, {"step": 2, "best": {}, "data_position": {}, "metrics": {}}, 0.5)
  writer.wait()
  writer.close()
  like = {"params": {"w": jnp.zeros((4, 4))}, "opt": jnp.zeros(3), "step": jnp.asarray(0)}
  reader = Checkpoints(str(tmp_path / "checkpoints"), parts=(parts, join))
  assert reader.has_checkpoint()
  restored, meta = reader.restore_latest(like)
  reader.close()
  assert meta["step"] == 2 and float(restored["params"]["w"][0, 0]) == 2.0 and float(restored["opt"][2]) == 2.0
