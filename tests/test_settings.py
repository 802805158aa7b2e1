"""train.settings (the one "same settings?" rule) and train.jsonio (atomic writes)."""

import json
import os

import pytest

from train.config import RESUMABLE_KEYS, load_config, to_dict, valid_keys
from train.jsonio import read_json, write_json, write_text
from train.settings import FINISHED_RUN_FREE, setting_changes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_setting_changes_name_each_key_and_both_values():
  saved = json.loads(json.dumps(to_dict(load_config(None, ["seed=1", "max_length=32"]))))  # as in a checkpoint
  same = load_config(
    None,
    ["seed=1", "max_length=32", "max_steps=500", "log_every=5", "resume=true", "output_dir=/elsewhere", "mesh.data=2"],
  )
  assert setting_changes(saved, same) == []
  changed = load_config(None, ["seed=2", "max_length=64", "targets=[query]", "batch_size=32"])
  assert setting_changes(saved, changed) == [
    "adapter.targets: None -> ['query']",
    "data.max_length: 32 -> 64",
    "seed: 1 -> 2",
    "train.batch_size: 16 -> 32",
  ]
  # A record written before a setting existed: absent and at its default is no change, anything else is.
  older = json.loads(json.dumps(saved))
  del older["adapter"]["refit_from"]
  assert setting_changes(older, same) == []
  assert setting_changes(older, load_config(None, ["seed=1", "max_length=32", "adapter.refit_from=0.7"])) == [
    "adapter.refit_from: (absent) -> 0.7"
  ]
  assert set(RESUMABLE_KEYS) <= set(valid_keys())
  with open(os.path.join(ROOT, "docs", "reliability.md")) as f:
    documented = f.read()
  assert [key for key in RESUMABLE_KEYS if f"`{key}`" not in documented] == []


def test_a_finished_run_is_the_same_only_with_the_same_steps_and_schedule():
  """A resumed checkpoint may train longer; a finished run's result is another one's only for the same length."""
  saved = to_dict(load_config(None, ["max_steps=100"]))
  longer = load_config(None, ["max_steps=200", "output_dir=/elsewhere", "train.progress=false"])
  assert setting_changes(saved, longer) == []
  assert setting_changes(saved, longer, free=FINISHED_RUN_FREE) == ["train.max_steps: 100 -> 200"]
  assert (
    setting_changes(saved, to_dict(load_config(None, ["max_steps=100", "mesh.data=2"])), free=FINISHED_RUN_FREE) == []
  )
  assert set(FINISHED_RUN_FREE) <= set(valid_keys())


def test_writes_are_atomic_and_read_back(tmp_path, monkeypatch):
  path = str(tmp_path / "sub" / "results.json")
  write_json(path, {"a": 1, "path": tmp_path})
  assert read_json(path) == {"a": 1, "path": str(tmp_path)}
  assert read_json(str(tmp_path / "missing.json")) is None
  # A write that fails half-way leaves the old file whole and no partial file in its place.
  import train.jsonio

  def broken_replace(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(train.jsonio.os, "replace", broken_replace)
  with pytest.raises(OSError):
    write_text(path, ["{not json"])
  monkeypatch.undo()
  assert read_json(path) == {"a": 1, "path": str(tmp_path)}
