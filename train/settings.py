"""Whether two runs have the same settings: the one rule behind a resumed checkpoint (`train.loop`), a finished stage
that `train.sparsify` reuses and a finished run that `train.pareto` reuses.

Two configs are compared key by key on their flat `section.key` names (`to_dict`); the keys in `free` may differ.
A key the saved config lacks counts as unchanged when the new config holds its default (a setting added after the
saved run), so records written before a setting existed stay usable.
"""

from __future__ import annotations

from typing import Any, Sequence

from train.config import RESUMABLE_KEYS, RunConfig, to_dict

# The keys a resumed checkpoint may change (`train.config.RESUMABLE_KEYS`): where, how often to log, evaluate and
# save, the step count and the mesh.
RESUME_FREE = RESUMABLE_KEYS
# The keys in which a finished run may differ from the one asked for and still be reused as its result: where it
# was written, how it was watched and stopped, the mesh it ran on.
FINISHED_RUN_FREE = (
  "output_dir",
  "resume",
  "overwrite",
  "export_peft",
  "train.progress",
  "train.abort_at_step",
  "mesh.data",
  "mesh.fsdp",
  "mesh.tensor",
  "mesh.fsdp_min_size",
)


def flat_settings(values: dict, prefix: str = "") -> dict[str, Any]:
  """{"section.key": value} of a nested config dict; tuples become lists (as JSON gives them back)."""
  out = {}
  for key, value in values.items():
    if isinstance(value, dict):
      out.update(flat_settings(value, prefix + key + "."))
    else:
      out[prefix + key] = list(value) if isinstance(value, tuple) else value
  return out


def setting_changes(saved: dict, config: RunConfig | dict, *, free: Sequence[str] = RESUME_FREE) -> list[str]:
  """`key: saved -> now` for each key outside `free` whose value differs between `saved` (`to_dict` of a config,
  e.g. read from a checkpoint or results.json) and `config`, sorted by key; [] when the settings are the same.

  A key one side lacks counts as changed, unless `saved` lacks it and `config` has its default.
  """
  old = flat_settings(saved)
  new = flat_settings(config if isinstance(config, dict) else to_dict(config))
  defaults = flat_settings(to_dict(RunConfig()))
  old.update({key: value for key, value in new.items() if key not in old and defaults.get(key) == value})
  show = lambda values, key: repr(values[key]) if key in values else "(absent)"  # noqa: E731
  return [
    f"{key}: {show(old, key)} -> {show(new, key)}"
    for key in sorted(set(old) | set(new))
    if key not in free and (key not in old or key not in new or old[key] != new[key])
  ]
