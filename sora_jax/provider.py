"""SoRA as a qwix provider: learned-rank LoRA on every intercepted `dot_general` and `einsum` of NNX and linen models.

`SoraProvider` is `qwix.LoraProvider` with a gate between the factors. On a matched op with weight W (the rhs):

  y = base(x, W) + s * ((x @ A) * gate) @ B,   s = rule.alpha / rule.rank   (rule.rank = r_max, kept after pruning)

where base is qwix's PTQ op (a plain op, or a quantized one when the rule sets `weight_qtype`: QLoRA). Leaves sit
beside W under qwix's names, in qwix's shapes, so a qwix LoRA tree and a SoRA tree share A and B:

  dot_general, W with batch axes Bt, contracting C, remaining R (dimension_numbers order):
    <w>_lora_a (*Bt, prod(C), r),  <w>_lora_b (*Bt, r, prod(R)),  <w>_lora_gate (*Bt, r)
  einsum 'lhs,rhs->out' (e.g. 'bnd,ndh->bnh'):
    <w>_lora_a (rhs axes also in lhs, in rhs order, r)   e.g. (n, d, r)
    <w>_lora_b (r, rhs axes not in lhs, in rhs order)    e.g. (r, h)
    <w>_lora_gate (rhs axes in lhs and out = batch, r)   e.g. (n, r)

Shardings follow W's as qwix derives them (A: batch axes and the first contracting axis; B: batch axes and the first
remaining axis; gate: batch axes; the rank axis replicated). On NNX, A and B are `nnx.LoRAParam` and the gate is
`sora_jax.SoraGate` (an `nnx.LoRAParam`); on linen all three are params.

The rank used is read off the leaves (A.shape[-1]), so a pruned tree runs as it is. Leaves are only created while the
model is being initialised (linen `init`; NNX inside `apply_sora`); later a missing A or B, or a rank-0 A, means "no
adapter" for that op, so a module pruned to rank 0 stays off instead of getting a fresh adapter. A missing gate reads
as ones (a plain qwix LoRA tree).

The provider is configuration: nothing a later reader needs is kept on it. Where the convention of `sora_jax.layout`
would misread a weight's axes from the shapes (a square weight contracted on its last axis), the adapter is created
with the record `<w>_lora_axes` (`sora_jax.SoraAxes`) beside it, for SoRA rules and for plain `qwix.LoraRule`s alike.
"""

from __future__ import annotations

import dataclasses
import re
import string
import traceback
from typing import Any, Callable, Collection, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from sora_jax import _qwix
from sora_jax import layout
from sora_jax import leaves
from sora_jax.layout import WeightRoles
from sora_jax.leaves import MERGED, QWIX_A, QWIX_B, QWIX_AXES, QWIX_GATE, SoraAxes, SoraGate

_GATE_INITS = ("ones", "normal")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SoraRule(qwix.LoraRule):
  """Which modules get SoRA and how: qwix's `LoraRule` (so `module_path`, `op_names`, `weight_qtype` for a quantized
  base, ... all apply; first matching rule wins) plus the gate.

  Attributes:
    rank: r_max, the rank every adapter starts with; the scale is s = alpha / rank, also after pruning.
    alpha: see rank.
    gate_init: "ones", or "normal" for N(0, 1) as the official SoRA code.
    dropout: dropout rate on the adapter input, applied on every call as qwix's LoRA dropout (the base op sees
      none): linen draws from the 'dropout' rng stream (`apply(..., rngs={"dropout": key})`); NNX from the module's
      `qwix_rngs`, which `apply_sora` unsets after its first call, so set
      `model.set_attributes(qwix_rngs=nnx.Rngs(dropout=...))` before training.
    lora_a_initializer, lora_b_initializer: as qwix (he_uniform, zeros).
  """

  gate_init: str = "ones"

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"SoraRule.rank must be a positive int, got {self.rank!r}.")
    if not self.alpha > 0:
      raise ValueError(f"SoraRule.alpha must be > 0, got {self.alpha!r}.")
    if self.gate_init not in _GATE_INITS:
      raise ValueError(f"SoraRule.gate_init must be one of {_GATE_INITS}, got {self.gate_init!r}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"SoraRule.dropout must be in [0, 1), got {self.dropout!r}.")

  @property
  def scale(self) -> float:
    """s = alpha / rank (rank = r_max)."""
    return self.alpha / self.rank


class SoraProvider(qwix.LoraProvider):
  """qwix provider for SoRA; see the module docstring for the math, names and shapes.

  Usage:
    provider = sora_jax.SoraProvider(module_path=".*(q_proj|v_proj).*", rank=8, alpha=16.0)
    model = sora_jax.apply_sora(model, provider, sample_input, rngs=nnx.Rngs(0))        # NNX
  or
    provider = sora_jax.SoraProvider([sora_jax.SoraRule(module_path=".*attn.*", rank=8, alpha=16.0),
                                      qwix.LoraRule(module_path=".*mlp.*", rank=4, alpha=4.0)])

  Rules that are plain `qwix.LoraRule`s get qwix's LoRA (no gate); `SoraRule`s get SoRA.
  """

  def __init__(
    self, rules: Sequence[qwix.QuantizationRule] | None = None, *, disable_jit: bool = False, **rule_kwargs: Any
  ):
    if rules is None:
      rules = [SoraRule(**rule_kwargs)]
    elif rule_kwargs:
      raise ValueError(
        "SoraProvider: give either rules=[SoraRule(...), ...] or the keyword arguments of one "
        f"SoraRule, not both (got rules and {sorted(rule_kwargs)})."
      )
    super().__init__(list(rules), disable_jit=disable_jit)
    self._creating = False

  @property
  def rules(self) -> tuple[qwix.QuantizationRule, ...]:
    """The rules, in order of precedence."""
    return tuple(self._rules)

  # --- intercepted ops ---------------------------------------------------------------------------------------------

  def dot_general(
    self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None
  ) -> jax.Array:
    """SoRA `lax.dot_general`: qwix's PTQ base op plus the gated low-rank delta."""
    rule = _qwix.current_rule(self, "dot_general")
    if not isinstance(rule, SoraRule):
      res = super().dot_general(
        lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding=out_sharding
      )
      _record_lora(self, rule, rhs, lambda: layout.dot_roles(dimension_numbers, rhs.ndim))
      return res
    res = _qwix.ptq_dot_general(
      self, lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding=out_sharding
    )
    weight = _qwix.find_param(rhs)
    if weight is None:  # rhs is an activation
      return res
    roles = layout.dot_roles(dimension_numbers, rhs.ndim)
    (lhs_ca, _), (lhs_ba, _) = dimension_numbers
    lhs_ca, lhs_ba = tuple(lhs_ca), tuple(lhs_ba)
    batch = tuple(rhs.shape[i] for i in roles.batch)
    contract = tuple(rhs.shape[i] for i in roles.contract)
    remain = tuple(rhs.shape[i] for i in roles.remain)
    factors = self._leaves(weight, rhs.shape, rule, roles)
    if factors is None:
      return res
    a, b, gate = factors
    rank, nb = a.shape[-1], len(batch)
    lhs = self._dropout(lhs, rule)
    # s * gate scales A's columns: O(|A|) work, then the two products are qwix's.
    a = a * (rule.scale * gate).reshape(*batch, 1, rank).astype(a.dtype)
    a = a.reshape(*batch, *contract, rank)
    h = jax.lax.dot_general(
      lhs, a, ((lhs_ca, tuple(range(nb, nb + len(contract)))), (lhs_ba, tuple(range(nb)))), precision=precision
    )
    b = b.reshape(*batch, rank, *remain)
    delta = jax.lax.dot_general(
      h, b, (((h.ndim - 1,), (nb,)), (tuple(range(nb)), tuple(range(nb)))), precision=precision
    )
    return res + delta

  def einsum(self, einsum_str: str, *operands, **kwargs) -> jax.Array:
    """SoRA `jnp.einsum` (binary, weight as the second operand): qwix's PTQ base op plus the gated delta."""
    rule = _qwix.current_rule(self, "einsum")
    if not isinstance(rule, SoraRule):
      res = super().einsum(einsum_str, *operands, **kwargs)
      if len(operands) == 2:
        _record_lora(
          self,
          rule,
          operands[1],
          lambda: layout.einsum_roles(*_qwix.einsum_operands(einsum_str, operands[0].ndim, operands[1].ndim)),
        )
      return res
    res = _qwix.ptq_einsum(self, einsum_str, *operands, **kwargs)
    if len(operands) != 2:
      raise ValueError(
        f"SoraProvider adapts binary einsums only, got {einsum_str!r} with {len(operands)} operands; "
        "exclude this module with the rule's module_path or op_names=('dot_general',)."
      )
    lhs, rhs = operands
    weight = _qwix.find_param(rhs)
    if weight is None:
      return res
    lhs_sub, rhs_sub, out_sub = _qwix.einsum_operands(einsum_str, lhs.ndim, rhs.ndim)
    r = next(c for c in ("r",) + tuple(string.ascii_letters) if c not in lhs_sub + rhs_sub + out_sub)
    roles = layout.einsum_roles(lhs_sub, rhs_sub, out_sub)
    a_idx, b_idx, g_idx = roles.a_axes(), roles.remain, roles.batch
    factors = self._leaves(weight, rhs.shape, rule, roles)
    if factors is None:
      return res
    a, b, gate = factors
    rank = a.shape[-1]
    lhs = self._dropout(lhs, rule)
    # The gate's axes are a subsequence of A's (both in rhs order), so a reshape broadcasts it over A.
    g_shape = [rhs.shape[i] if i in g_idx else 1 for i in a_idx] + [rank]
    a = a * (rule.scale * gate).reshape(g_shape).astype(a.dtype)
    a_sub = "".join(rhs_sub[i] for i in a_idx) + r
    b_sub = r + "".join(rhs_sub[i] for i in b_idx)
    return res + jnp.einsum(f"{lhs_sub},{a_sub},{b_sub}->{out_sub}", lhs, a, b, **kwargs)

  def conv_general_dilated(self, lhs, rhs, *args, **kwargs) -> jax.Array:
    """Convolutions are not adapted by SoRA rules (plain `qwix.LoraRule`s still get qwix's LoRA)."""
    rule = _qwix.current_rule(self, "conv_general_dilated")
    if isinstance(rule, SoraRule):
      raise NotImplementedError(
        f"SoraProvider does not adapt convolutions (rule {rule.module_path!r} matched a conv_general_dilated); "
        "restrict the rule with op_names=('dot_general', 'einsum') or a module_path that leaves convolutions out."
      )
    res = super().conv_general_dilated(lhs, rhs, *args, **kwargs)
    _record_lora(self, rule, rhs, lambda: layout.conv_roles(rhs.ndim))
    return res

  # --- leaves ------------------------------------------------------------------------------------------------------

  def _leaves(
    self, weight: str, weight_shape: tuple[int, ...], rule: SoraRule, roles: WeightRoles
  ) -> tuple[jax.Array, jax.Array, jax.Array] | None:
    """(A, B, gate) of `weight` in the current module: read, created (initialising only), or None (no adapter)."""
    a_shape, b_shape, gate_shape = roles.shapes(weight_shape, rule.rank)
    a_axes, b_axes, gate_axes = roles.leaf_axes()
    rank_axis = roles.b_rank_axis
    names = (weight + QWIX_A, weight + QWIX_B, weight + QWIX_GATE)
    _, get, creating, where = _context(self)
    where = f"{where}/{weight}"
    a, b, gate = (get(n) for n in names)
    if a is None or b is None:
      if not creating:
        return None
      base = get(weight)
      a = _create(names[0], base, rule.lora_a_initializer, a_shape, a_axes, nnx.LoRAParam)
      b = _create(names[1], base, rule.lora_b_initializer, b_shape, b_axes, nnx.LoRAParam)
      _record_axes(weight, weight_shape, rule.rank, roles, gated=True)
      gate = None
    if gate is None and creating:
      # A ones gate draws no key, so on NNX the same rngs give the same A and B as qwix's LoRA.
      gate = _create(
        names[2],
        get(weight),
        _gate_initializer(rule.gate_init),
        gate_shape,
        gate_axes,
        SoraGate,
        need_rng=rule.gate_init != "ones",
      )
    a, b = _qwix.unbox(a), _qwix.unbox(b)
    rank = a.shape[-1]
    gate = jnp.ones(gate_shape[:-1] + (rank,), a.dtype) if gate is None else _qwix.unbox(gate)
    without_rank = lambda shape: shape[:rank_axis] + shape[rank_axis + 1 :]
    if (
      a.shape[:-1] != a_shape[:-1]
      or without_rank(b.shape) != without_rank(b_shape)
      or b.shape[rank_axis] != rank
      or gate.shape != gate_shape[:-1] + (rank,)
    ):
      raise ValueError(
        f"SoRA leaves of {where} have shapes A {a.shape}, B {b.shape}, gate {gate.shape}, but this op "
        f"needs A {a_shape[:-1] + ('r',)}, B {_with_r(b_shape, rank_axis)}, gate {gate_shape[:-1] + ('r',)} with "
        "one rank r; the tree does not belong to this model (or was edited)."
      )
    if rank == 0:
      return None
    if not creating:
      _check_not_merged(get(weight), where)
    return a, b, gate

  @staticmethod
  def _dropout(lhs: jax.Array, rule: SoraRule) -> jax.Array:
    if rule.dropout <= 0:
      return lhs
    return nnx.Dropout(rule.dropout, deterministic=False)(lhs, rngs=_qwix.make_rng("dropout"))


def _with_r(shape: tuple[int, ...], axis: int) -> tuple:
  return shape[:axis] + ("r",) + shape[axis + 1 :]


def _context(provider: "SoraProvider") -> tuple[Any, Callable[[str], Any], bool, str]:
  """(current module, name -> its param or None, whether leaves may be created now, '/'-joined module path)."""
  module = _qwix.current_module()
  if isinstance(module, nn.Module):
    get = lambda n: module.get_variable("params", n) if module.has_variable("params", n) else None
    return module, get, module.is_initializing(), "/".join(map(str, module.path))
  get = lambda n: getattr(module, n, None)
  creating = provider._creating or not _qwix.initial_run_complete(provider)  # pylint: disable=protected-access
  return module, get, creating, "/".join(map(str, getattr(module, "qwix_path", ())))


def _check_not_merged(weight: Any, where: str) -> None:
  """A weight that `sora_jax.merge` already holds the delta of must not get it again from the adapter."""
  if isinstance(weight, nnx.Variable) and weight.get_metadata().get(MERGED, False):
    raise ValueError(
      f"{where} holds weights merged by sora_jax.merge, and this model still runs its adapter, so the "
      "delta would count twice; load merged weights into the model before apply_sora "
      "(nnx.update(base_model, merged))."
    )


def _record_axes(weight: str, weight_shape: tuple[int, ...], rank: int, roles: WeightRoles, gated: bool) -> None:
  """Creates `<w>_lora_axes` when the convention of `sora_jax.layout` would misread this weight's adapter."""
  if layout.needs_record(roles, weight_shape, rank, gated):
    record = layout.encode(roles)
    _qwix.get_or_create_param(weight + QWIX_AXES, lambda: jnp.asarray(record), SoraAxes, need_rng=False)


def _record_lora(provider: "SoraProvider", rule: Any, rhs: Any, roles: Callable[[], WeightRoles]) -> None:
  """After qwix's own LoRA op: record the weight's axes when qwix just created an adapter the convention misreads."""
  if not isinstance(rule, qwix.LoraRule):
    return
  weight = _qwix.find_param(rhs)
  if weight is None:
    return
  _, get, creating, where = _context(provider)
  if not creating:
    a = get(weight + QWIX_A)
    if a is not None and _qwix.unbox(a).shape[-1] > 0:
      _check_not_merged(get(weight), f"{where}/{weight}")
    return
  _record_axes(weight, tuple(rhs.shape), rule.rank, roles(), gated=False)


def _gate_initializer(gate_init: str) -> Callable[..., jax.Array]:
  if gate_init == "ones":
    return lambda key, shape, dtype: jnp.ones(shape, dtype)
  return lambda key, shape, dtype: jax.random.normal(key, shape, dtype)


def _canonical_sharding(x: Any) -> jax.sharding.NamedSharding | None:
  """x's NamedSharding with the spec padded to x.ndim, or None when x has no NamedSharding (or is a tracer)."""
  x = _qwix.unbox(x)
  if isinstance(x, jax.core.Tracer):
    # A tracer's `.sharding` raises with a message built from the whole trace so far, which made an abstract attach
    # (`nnx.eval_shape`) quadratic in depth; leaves created under a trace get their axes from the weight's metadata.
    return None
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  return sharding.update(spec=tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec)))


def _create(
  name: str,
  base: Any,
  initializer: Callable[..., jax.Array],
  shape: tuple[int, ...],
  axes: tuple[int | None, ...],
  param_type: type,
  need_rng: bool = True,
) -> Any:
  """Creates leaf `name` beside the (boxed) base weight: its dtype (a quantized base: the scale's), its sharding and
  axis metadata picked by `axes` from the weight's, as qwix does for its LoRA leaves."""
  if isinstance(base, _qwix.WithAux):
    dtype = _qwix.unbox(base.array.scale).dtype
    boxed = base.array.qvalue
  else:
    dtype = _qwix.unbox(base).dtype
    boxed = base
  sharding = _canonical_sharding(boxed)

  def init(key=None):
    value = initializer(key, shape, dtype)
    if sharding is not None:
      value = jax.device_put(value, sharding.update(spec=_qwix.update_sharding(sharding.spec, axes)))
    value = _qwix.update_boxed(boxed, value, axes)
    if isinstance(value, nnx.Variable):
      return nnx.VariableMetadata(value.get_raw_value(), metadata=value.get_metadata())
    return value

  return _qwix.get_or_create_param(name, init, param_type, need_rng)


def apply_sora(
  model: Any,
  provider: SoraProvider,
  *sample_inputs: Any,
  rngs: nnx.Rngs | None = None,
  methods: Collection[str] = ("__call__",),
  **sample_kwargs: Any,
) -> Any:
  """Attaches SoRA to `model`: qwix's `apply_lora_to_model` with a `SoraProvider`.

  NNX: returns an adapted copy; the model runs once on `sample_inputs` / `sample_kwargs` (values do not matter, shapes
  do) and the adapter leaves are created from `rngs`. linen: returns the intercepted module (no inputs); `model.init`
  creates the leaves and `model.apply` runs them.

  Example:
    model = sora_jax.apply_sora(model, sora_jax.SoraProvider(module_path=".*proj", rank=8, alpha=16.0),
                                tokens, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)      # trains A, B and gates

  Raises:
    TypeError: `provider` is not a `SoraProvider`.
    ValueError: an NNX model without `rngs`, or a linen model with inputs or rngs.
    ValueError: an NNX model that already has adapters, or a LoRA/SoRA rule that created no adapter (the error lists
      the module paths seen).
    IndexError: the NNX model runs its layers under `nnx.scan`, inside which no leaf can be created.
  """
  if not isinstance(provider, SoraProvider):
    raise TypeError(
      f"apply_sora needs a sora_jax.SoraProvider, got {type(provider).__name__}; for plain LoRA call "
      "qwix.apply_lora_to_model."
    )
  if isinstance(model, nnx.Module):
    if rngs is None:
      raise ValueError(
        "apply_sora: an NNX model needs rngs=nnx.Rngs(...) to draw the adapters' initial values; "
        "pass e.g. rngs=nnx.Rngs(0)."
      )
    sample_kwargs["rngs"] = rngs
  elif rngs is not None or sample_inputs or sample_kwargs:
    raise ValueError(
      "apply_sora: a linen model takes no sample inputs or rngs here; its adapters are created by "
      "model.init(rng, ...), which you call next."
    )
  if isinstance(model, nnx.Module):
    adapted = [path for path, _ in nnx.to_flat_state(nnx.state(model)) if leaves.is_adapter_leaf(path)]
    if adapted:
      raise ValueError(
        f"apply_sora: the model already has adapters ({leaves.path_str(adapted[0])}, ...); apply SoRA "
        "to the model before adaptation (keep it, or nnx.clone it before apply_sora)."
      )
  provider._creating = True  # pylint: disable=protected-access
  try:
    out = _qwix.quantize_model(model, provider, *sample_inputs, methods=tuple(methods), **sample_kwargs)
    if isinstance(out, nnx.Module):
      if not sample_kwargs.get("skip_nnx_init", False):  # without a sample run no adapter exists yet
        _check_rules_matched(out, provider)
      _clear_merged(out)
    return out
  except IndexError as e:
    if not any(
      "nnx/transforms/iteration" in frame.filename.replace("\\", "/") for frame in traceback.extract_tb(e.__traceback__)
    ):
      raise
    raise IndexError(
      f"apply_sora: adapter leaves cannot be created inside nnx.scan (qwix's LoRA fails the same way; nnx.scan "
      f"said: {e}); create them beforehand with a leading layer axis after apply_sora(..., skip_nnx_init=True), "
      "as docs/design.md shows."
    ) from e
  finally:
    provider._creating = False  # pylint: disable=protected-access


def _check_rules_matched(model: nnx.Module, provider: SoraProvider) -> None:
  """Every LoRA/SoRA rule must have created an adapter on the sample run; a silent no-op rule is a typo."""
  flat = nnx.to_flat_state(nnx.state(model))
  adapted = [leaves.path_str(rec.module) for rec in leaves.find_adapters(path for path, _ in flat)]
  for rule in provider.rules:
    if isinstance(rule, qwix.LoraRule) and not any(re.fullmatch(rule.module_path, m) for m in adapted):
      seen = sorted({leaves.path_str(path) for path, _ in nnx.iter_modules(model) if path})
      raise ValueError(
        f"apply_sora: the rule module_path={rule.module_path!r} adapted no weight (its op_names "
        f"{tuple(rule.op_names)}); module paths seen: {', '.join(seen[:12])}"
        f"{' ...' if len(seen) > 12 else ''}. Fix the regex (it must fully match a path)."
      )


def _clear_merged(model: nnx.Module) -> None:
  """A weight merged earlier (`sora_jax.merge`) and now given a fresh adapter is a base weight again."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable) and node.get_metadata().get(MERGED, False):
      node.set_metadata(**{MERGED: False})
