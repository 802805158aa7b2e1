"""Resume that always resumes, exports that respect the user's folders, hostile files and values refused in one line.

Each test is a case a hostile but realistic user ran into: a run killed between its first kept-best checkpoint and its
first periodic one, a finished run whose checkpoints were deleted, exports through symlinked folders, a budget below
one rank, values that pass a range check and crash later, hostile PEFT configs, stale stage records and lock files.
"""

import json
import os
import sys

import numpy as np
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


# ---------------------------------------------------------------------------------------------------------------
# exports


def _write_adapter_files(staging, *names):
  from safetensors.numpy import save_file

  for name in names:
    if name.endswith(".safetensors"):
      save_file({"w": np.zeros(2, np.float32)}, os.path.join(staging, name))
    else:
      with open(os.path.join(staging, name), "w") as f:
        f.write("{}")


def test_export_through_a_symlinked_folder_keeps_the_link_and_the_user_s_files(tmp_path):
  from sora_jax.adapter_files import atomic_folder

  (tmp_path / "v1").mkdir()
  (tmp_path / "v1" / "README.md").write_text("serving notes")
  (tmp_path / "v1" / "adapter_notes.txt").write_text("the user's own adapter_* file")
  (tmp_path / "current").symlink_to("v1")
  owned = ("adapter_model.safetensors", "adapter_config.json")
  with atomic_folder(tmp_path / "current", owned) as staging:
    _write_adapter_files(staging, "adapter_model.safetensors", "adapter_config.json", "adapter_extra.json")
  assert os.path.islink(tmp_path / "current") and os.readlink(tmp_path / "current") == "v1"
  listed = lambda: sorted(n for n in os.listdir(tmp_path / "v1") if not n.startswith("."))  # noqa: E731
  assert listed() == ["README.md", "adapter_config.json", "adapter_extra.json", "adapter_model.safetensors"] + [
    "adapter_notes.txt"
  ]
  # A later export removes what the earlier one wrote and this one does not; the user's files stay.
  with atomic_folder(tmp_path / "current", owned) as staging:
    _write_adapter_files(staging, "adapter_model.safetensors", "adapter_config.json")
  assert listed() == ["README.md", "adapter_config.json", "adapter_model.safetensors", "adapter_notes.txt"]
  assert (tmp_path / "v1" / "README.md").read_text() == "serving notes"
  assert sorted(os.listdir(tmp_path)) == ["current", "v1"]  # no staging or old folder left


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_export_respects_the_umask(tmp_path, umask):
  from sora_jax.adapter_files import atomic_folder

  previous = os.umask(umask)
  try:
    with atomic_folder(tmp_path / "peft", ("adapter_*",)) as staging:
      _write_adapter_files(staging, "adapter_model.safetensors", "adapter_config.json")
  finally:
    os.umask(previous)
  mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
  assert mode(tmp_path / "peft") == 0o777 & ~umask
  for name in ("adapter_model.safetensors", "adapter_config.json"):
    assert mode(tmp_path / "peft" / name) == 0o666 & ~umask, name


def test_save_peft_writes_readable_files_under_the_default_umask(tiny, tmp_path):
  import jax
  from sora_jax import SoraConfig, init, save_peft
  from sora_jax.models import EncoderNaming
  from sora_jax.models.loading import family_module, from_pretrained

  pretrained = from_pretrained(tiny[0], num_labels=2)
  config = SoraConfig(rank=2, alpha=2.0, targets=family_module("bert").TARGETS)
  params = jax.tree.map(lambda x: np.asarray(x) + 0.1, init(jax.random.key(0), pretrained.params, config))
  previous = os.umask(0o022)
  try:
    save_peft(tmp_path / "peft", params, config, naming=EncoderNaming(pretrained.config))
  finally:
    os.umask(previous)
  assert os.stat(tmp_path / "peft").st_mode & 0o777 == 0o755
  assert all(os.stat(tmp_path / "peft" / n).st_mode & 0o777 == 0o644 for n in os.listdir(tmp_path / "peft"))


def test_staging_folders_of_an_interrupted_export_are_removed(tmp_path):
  import socket
  import subprocess
  from sora_jax.adapter_files import atomic_folder

  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  pid, host = int(gone.stdout), socket.gethostname()
  stale = tmp_path / f".peft.writing-{pid}-{host}~abc123"
  stale.mkdir()
  (stale / "adapter_model.safetensors").write_text("half written")
  with atomic_folder(tmp_path / "peft", ("adapter_*",)) as staging:
    _write_adapter_files(staging, "adapter_config.json")
  assert sorted(os.listdir(tmp_path)) == ["peft"]
  # Killed between moving the old folder aside and renaming the new one into place: the old one comes back.
  old = tmp_path / f".peft.old-{pid}-{host}~def456"
  os.rename(tmp_path / "peft", old)
  with pytest.raises(RuntimeError):
    with atomic_folder(tmp_path / "peft", ("adapter_*",)):
      raise RuntimeError("killed")
  assert sorted(os.listdir(tmp_path)) == ["peft"] and (tmp_path / "peft" / "adapter_config.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# budget


@pytest.mark.parametrize(
  "budget, key",
  [("adapter.target_params=1", "adapter.target_params"), ("adapter.target_fraction=1e-6", "adapter.target_fraction")],
)
def test_a_budget_below_one_rank_is_refused_naming_the_key_and_the_minimum(tiny, tmp_path, budget, key):
  from train import loop, optimizer
  from train.config import ConfigError

  experiment = loop.build(_config(tiny, tmp_path, "adapter.rank=2", budget))
  with pytest.raises(ConfigError) as e:
    optimizer.budget_params(experiment)
  message = str(e.value)
  # the tiny BERT's smallest module is an attention projection: one rank is 32 + 32 parameters
  assert "\n" not in message and key in message and "64" in message, message


# ---------------------------------------------------------------------------------------------------------------
# values from files and the command line


@pytest.mark.parametrize(
  "override, words",
  [
    ("train.epochs=1e999", ["train.epochs", "finite"]),
    ("adapter.sparse_lambda=inf", ["adapter.sparse_lambda", "finite"]),
    ("optim.learning_rate=.nan", ["optim.learning_rate", "finite"]),
    ("mesh.data=0", ["mesh.data", "-1"]),
    ("mesh.data=-3", ["mesh.data", "-1"]),
    (f"seed={2**70}", ["seed", "4294967295"]),
    ("seed=-1", ["seed", "4294967295"]),
    (f"train.max_steps={2**40}", ["train.max_steps", "2147483647"]),
    ("adapter.alpha=0", ["adapter.alpha", "positive"]),
  ],
)
def test_values_that_pass_a_range_check_but_crash_later_are_refused(override, words):
  from train.config import ConfigError, load_config

  with pytest.raises(ConfigError) as e:
    load_config(None, [override])
  message = str(e.value)
  assert "\n" not in message and len(message) < 400, message
  for word in words:
    assert word in message, message


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path):
  from train.config import ConfigError, load_config

  lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
  lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 10)]
  lines.append("adapter: {targets: *a9}")
  path = tmp_path / "bomb.yaml"
  path.write_text("\n".join(lines) + "\n")
  assert path.stat().st_size < 600
  with pytest.raises(ConfigError) as e:
    load_config(str(path))
  message = str(e.value)
  assert "\n" not in message and len(message) < 400 and str(path) in message, message[:400]


def test_a_huge_wrong_value_is_shown_shortened():
  from train.config import ConfigError, load_config

  for override in ["seed=" + "9" * 5000, "train.on_nonfinite=" + "x" * 5000, "train.epochs=" + "x" * 5000]:
    with pytest.raises(ConfigError) as e:
      load_config(None, [override])
    assert "\n" not in str(e.value) and override[-100:] not in str(e.value)


@pytest.mark.parametrize("content", ['["a", "b"', '{"a": 0}', "[1, 2]", '"ab"', ""])
def test_a_malformed_labels_json_names_the_file(tmp_path, content):
  from train.config import DataConfig
  from train.data import DataError, task_spec

  (tmp_path / "labels.json").write_text(content)
  with pytest.raises(DataError) as e:
    task_spec(DataConfig(task="local", data_dir=str(tmp_path)))
  assert "\n" not in str(e.value) and str(tmp_path / "labels.json") in str(e.value), str(e.value)


@pytest.mark.parametrize("task", ["wordnet", "local"])
def test_the_official_split_protocol_on_non_glue_data_is_refused(tiny, task):
  """The official protocol is the SoRA code's split of the GLUE tasks: on WordNet it used to replace the test split
  with the validation one, on small local data it failed with an IndexError."""
  from train.config import DataConfig
  from train.data import DataError, load_raw, task_spec

  data_dir = tiny[1] if task == "local" else None
  config = DataConfig(task=task, data_dir=data_dir, num_labels=2 if task == "local" else None)
  config = DataConfig(**{**config.__dict__, "split_protocol": "official"})
  with pytest.raises(DataError) as e:
    load_raw(task_spec(config), config)
  assert "\n" not in str(e.value) and "split_protocol" in str(e.value) and "validation" in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# signals and locks


def test_sigterm_outside_training_exits_75_and_releases_the_lock(tmp_path):
  """SIGTERM while the run is not in its training loop (loading data, the final export, a stage's save)."""
  import subprocess
  import textwrap

  script = textwrap.dedent(f"""
    import os, signal, sys
    from train import cli, rundir

    def start():
      lock = rundir.claim({str(tmp_path)!r}, resume=False, overwrite=False)
      try:
        os.kill(os.getpid(), signal.SIGTERM)  # as during the final export or data loading
        for _ in range(10**6):
          pass
        return 0
      finally:
        rundir.release(lock)

    previous = signal.getsignal(signal.SIGTERM)
    code = cli.run_guarded(start)
    assert signal.getsignal(signal.SIGTERM) is previous
    sys.exit(code)
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 75, proc.stderr[-2000:]
  err = proc.stderr.strip().splitlines()
  assert len(err) == 1 and "SIGTERM" in err[0] and "resume=true" in err[0], err
  assert not (tmp_path / ".lock").exists()


def test_an_empty_or_dangling_lock_file_is_taken_over(tmp_path, capsys):
  import time

  from train.rundir import RunDirectoryError, claim, release

  lock = tmp_path / ".lock"
  lock.write_text("")  # a run killed between creating its lock and writing its pid
  with pytest.raises(RunDirectoryError):  # just created: a run may be writing it now
    claim(str(tmp_path), resume=False, overwrite=False)
  old = time.time() - 600
  os.utime(lock, (old, old))
  release(claim(str(tmp_path), resume=False, overwrite=False))
  assert "taking the run directory over" in capsys.readouterr().out and not lock.exists()
  lock.symlink_to(tmp_path / "gone")
  release(claim(str(tmp_path), resume=False, overwrite=False))
  assert not os.path.lexists(lock)


# ---------------------------------------------------------------------------------------------------------------
# records beside a run


@pytest.mark.parametrize("content", ["", "{", "[1, 2]", "\xff"])
def test_a_damaged_study_run_record_reads_as_absent(tmp_path, content):
  """An empty study_run.json (a study killed while writing it) must not break every later train.pareto run; a
  damaged results.json is one line naming it."""
  from train import pareto
  from train.config import ConfigError

  path = tmp_path / "study_run.json"
  path.write_bytes(content.encode("latin-1"))
  assert pareto._read(str(path), required=False) is None
  with pytest.raises(ConfigError) as e:
    pareto._read(str(path))
  assert str(path) in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# checksums of what a later run trusts


def test_a_checkpoint_whose_meta_was_changed_is_moved_aside(tmp_path, capfd):
  """The best score and the data position a resume trusts are under the checkpoint's checksum."""
  import jax.numpy as jnp
  from train.checkpoint import Checkpoints

  like = {"w": jnp.zeros((4, 4)), "step": jnp.zeros((), jnp.int32)}
  writer = Checkpoints(str(tmp_path), keep=3)
  for step in (1, 2):
    meta = {"step": step, "best": {"step": step, "score": 0.5}, "data_position": {"epoch": 0, "index": 8 * step}}
    writer.save(step, {"w": jnp.full((4, 4), float(step)), "step": jnp.int32(step)}, meta)
  writer.wait()
  writer.close()
  path = tmp_path / "latest" / "2" / "meta" / "metadata"
  meta = json.loads(path.read_text())
  meta["best"]["score"] = 0.99  # a damaged (or edited) best score
  path.write_text(json.dumps(meta))
  reader = Checkpoints(str(tmp_path), keep=3)
  state, meta = reader.restore_latest(like)
  reader.close()
  assert meta["step"] == 1 and meta["best"]["score"] == 0.5
  said = [line for line in capfd.readouterr().out.splitlines() if "cannot be restored" in line]
  assert len(said) == 1 and "checksum" in said[0] and "2.corrupt" in said[0]
