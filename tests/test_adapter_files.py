"""Exports are whole or absent (a failure between the two files of an adapter leaves the old one), and broken or
hostile adapter files are one clear error naming the file and the key."""

import json
import os

import numpy as np
import pytest

from sora_jax.adapter_files import atomic_folder


def _files(directory):
  """The folder's files, without the export's manifest of the names it wrote."""
  names = sorted(n for n in os.listdir(directory) if n != ".sora_jax_export.json")
  return {name: open(os.path.join(directory, name), "rb").read() for name in names}


def test_atomic_folder_keeps_the_old_folder_on_failure_and_other_files_on_success(tmp_path):
  target = tmp_path / "adapter"
  target.mkdir()
  for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
    (target / name).write_text("old " + name)
  with pytest.raises(OSError, match="No space left"):
    with atomic_folder(target, owned=("adapter_*",)) as staging:
      open(os.path.join(staging, "adapter_model.safetensors"), "w").write("new")
      raise OSError(28, "No space left on device")  # between the tensor file and adapter_config.json
  assert _files(target) == {
    n: f"old {n}".encode() for n in ("README.md", "adapter_config.json", "adapter_model.safetensors")
  }
  assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging folder left

  (target / "adapter_model.bin").write_text("stale pickled weights")
  with atomic_folder(target, owned=("adapter_*",)) as staging:
    for name in ("adapter_model.safetensors", "adapter_config.json"):
      open(os.path.join(staging, name), "w").write("new")
  assert _files(target) == {
    "README.md": b"old README.md",
    "adapter_config.json": b"new",
    "adapter_model.safetensors": b"new",
  }  # the old adapter's own files are gone
  assert sorted(os.listdir(tmp_path)) == ["adapter"]

  with pytest.raises(RuntimeError):
    with atomic_folder(tmp_path / "fresh", owned=("adapter_*",)):
      raise RuntimeError("killed")
  assert not (tmp_path / "fresh").exists()


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
  """A PEFT adapter saved by save_peft from the tiny BERT (with its classifier as modules_to_save), its params and
  naming."""
  import jax
  from sora_jax import SoraConfig, init, save_peft
  from sora_jax.models import EncoderNaming
  from sora_jax.models.loading import family_module, from_pretrained

  model_dir, _ = tiny
  pretrained = from_pretrained(model_dir, num_labels=2)
  config = SoraConfig(rank=4, alpha=8.0, targets=family_module("bert").TARGETS)
  params = init(jax.random.key(0), pretrained.params, config)
  params = jax.tree.map(lambda x: np.asarray(x) + 0.1, params)  # B nonzero, so the adapter is not a no-op
  naming = EncoderNaming(pretrained.config)
  directory = tmp_path_factory.mktemp("adapter") / "peft"
  save_peft(directory, params, config, naming=naming)
  return str(directory), pretrained.params, params, config, naming


def test_save_peft_failure_between_the_two_files_keeps_the_old_adapter(adapter, tmp_path, monkeypatch):
  import shutil
  from sora_jax import load_peft, save_peft
  from sora_jax import peft as peft_module

  source, base, params, config, naming = adapter
  directory = tmp_path / "peft"
  shutil.copytree(source, directory)
  before = _files(directory)

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(peft_module.json, "dump", full_disk)  # the tensor file is written, the config is not
  with pytest.raises(OSError, match="No space left"):
    save_peft(directory, params, config, naming=naming)
  assert _files(directory) == before and sorted(os.listdir(tmp_path)) == ["peft"]
  with pytest.raises(OSError):
    save_peft(tmp_path / "fresh", params, config, naming=naming)
  assert not (tmp_path / "fresh").exists()
  monkeypatch.undo()
  loaded = load_peft(directory, base, naming)
  assert loaded.ranks and all(r == 4 for r in loaded.ranks.values())


def _edit_tensors(directory, change):
  from safetensors.numpy import load_file, save_file

  path = os.path.join(directory, "adapter_model.safetensors")
  tensors = load_file(path)
  save_file(change(dict(tensors)), path, metadata={"format": "pt"})


def _set(tensors, key_part, fn):
  key = sorted(k for k in tensors if key_part in k)[0]
  tensors[key] = fn(tensors[key])
  return tensors


def _without_head(tensors):
  return {k: v for k, v in tensors.items() if "classifier" not in k}


def _rank_zero(tensors):
  module = sorted(k for k in tensors if ".lora_A." in k)[0].split(".lora_A.")[0]
  a, b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
  tensors[a], tensors[b] = tensors[a][:0], tensors[b][:, :0]
  return tensors


def _nan(x):
  x = x.copy()
  x.flat[0] = np.nan
  return x


@pytest.mark.parametrize(
  "case, config_change, tensor_change, words",
  [
    ("nan in lora_A", None, lambda t: _set(t, ".lora_A.", _nan), ["adapter_model.safetensors", "lora_A", "NaN"]),
    (
      "inf in lora_B",
      None,
      lambda t: _set(t, ".lora_B.", lambda x: x * np.inf),
      ["adapter_model.safetensors", "lora_B", "infinite"],
    ),
    ("nan in the head", None, lambda t: _set(t, "classifier", _nan), ["classifier", "NaN"]),
    ("empty tensor file", None, lambda t: {}, ["adapter_model.safetensors", "no LoRA factors"]),
    ("missing head", None, _without_head, ["modules_to_save", "'classifier'", "no weights"]),
    ("rank 0", None, _rank_zero, ["adapter_model.safetensors", ".lora_", "rank 0"]),
    (
      "another width",
      None,
      lambda t: _set(t, ".lora_A.", lambda x: np.concatenate([x, x], axis=1)),
      ["lora_A", "do not fit the weight", "another model size"],
    ),
    ("alpha nan", lambda c: {**c, "lora_alpha": float("nan")}, None, ["adapter_config.json", "lora_alpha", "nan"]),
    ("alpha string", lambda c: {**c, "lora_alpha": "8"}, None, ["adapter_config.json", "lora_alpha", "'8'"]),
    ("alpha zero", lambda c: {**c, "lora_alpha": 0}, None, ["lora_alpha", "positive"]),
    ("alpha pattern negative", lambda c: {**c, "alpha_pattern": {"query": -2}}, None, ["alpha_pattern['query']"]),
    ("r boolean", lambda c: {**c, "r": True}, None, ["adapter_config.json", "r must be", "True"]),
    ("json list", lambda c: [c], None, ["adapter_config.json", "JSON object", "list"]),
    ("alpha huge", lambda c: {**c, "lora_alpha": 1e300}, None, ["adapter_config.json", "lora_alpha", "overflow"]),
    ("alpha absurd int", lambda c: {**c, "lora_alpha": 10**400}, None, ["adapter_config.json", "lora_alpha"]),
    ("r absurd int", lambda c: {**c, "r": 10**30}, None, ["adapter_config.json", "r must be"]),
    ("r fraction", lambda c: {**c, "r": 2.5}, None, ["adapter_config.json", "r must be", "2.5"]),
    ("bad regex", lambda c: {**c, "alpha_pattern": {"query(": 4}}, None, ["alpha_pattern['query(']", "regex"]),
    (
      "backtracking regex",
      lambda c: {**c, "rank_pattern": {"(.*)*x": 4}},
      None,
      ["rank_pattern['(.*)*x']", "nested repetition"],
    ),
    ("0-D lora_A", None, lambda t: _set(t, ".lora_A.", lambda x: np.float32(1.0)), ["lora_A", "2-D", "()"]),
  ],
)
def test_load_peft_refuses_broken_adapters(adapter, tmp_path, case, config_change, tensor_change, words):
  import shutil
  from sora_jax import load_peft

  source, base, _, _, naming = adapter
  directory = tmp_path / "peft"
  shutil.copytree(source, directory)
  if config_change is not None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps(config_change(json.loads(path.read_text()))))
  if tensor_change is not None:
    _edit_tensors(directory, tensor_change)
  with pytest.raises(ValueError) as e:
    load_peft(directory, base, naming)
  message = str(e.value)
  assert "\n" not in message
  for word in words:
    assert word in message, message


def test_load_peft_refuses_malformed_json(adapter, tmp_path):
  import shutil
  from sora_jax import load_peft

  source, base, _, _, naming = adapter
  shutil.copytree(source, tmp_path / "peft")
  (tmp_path / "peft" / "adapter_config.json").write_text('{"r": 4, "lora_alpha":')
  with pytest.raises(ValueError, match=r"adapter_config.json: not valid JSON"):
    load_peft(tmp_path / "peft", base, naming)
