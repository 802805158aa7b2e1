"""`sora_jax.truncate` against a NumPy reference: each module's delta s A diag(g) B is formed densely and cut with
`np.linalg.svd`; the global threshold is the greedy prefix of the pooled singular values under the budget. Linen
(unrolled and stacked) and NNX / qwix (a Linear under plain qwix LoRA, a LinearGeneral with a batch axis, an einsum
whose B its batch entries share), and the PEFT export of the result."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx
from flax import traverse_util

import sora_jax
from conftest import tiny_encoder_config

R, ALPHA = 4, 8.0
S = ALPHA / R


# --- NumPy reference ------------------------------------------------------------------------------------------------


def _reference(deltas: dict[str, np.ndarray], costs: dict[str, int], budget: int):
  """ranks, truncated deltas and singular values: the longest prefix of all sigmas (descending) within the budget."""
  svds = {name: np.linalg.svd(d, full_matrices=False) for name, d in deltas.items()}
  pool = sorted(
    ((s, name) for name, (_, sig, _) in svds.items() for s in sig if s > 1e-9 * max(sig[0], 1e-30)),
    key=lambda e: -e[0],
  )
  ranks, spent = dict.fromkeys(deltas, 0), 0
  for _, name in pool:
    if spent + costs[name] > budget:
      break
    spent += costs[name]
    ranks[name] += 1
  cut = {name: (u[:, : ranks[name]] * sig[: ranks[name]]) @ vt[: ranks[name]] for name, (u, sig, vt) in svds.items()}
  return ranks, cut, {name: sig for name, (_, sig, _) in svds.items()}


def _check_threshold(report, sigmas, costs, budget):
  """Every kept sigma >= every dropped one; the budget holds; the next sigma would not fit."""
  kept = [s for name, sig in sigmas.items() for s in sig[: report.ranks[name]]]
  dropped = [(s, name) for name, sig in sigmas.items() for s in sig[report.ranks[name] :] if s > 1e-9]
  retained = sum(report.ranks[name] * costs[name] for name in sigmas)
  assert report.retained_params == retained <= budget
  assert min(kept) >= max(s for s, _ in dropped) and report.threshold == pytest.approx(min(kept))
  nxt = max(dropped)[1]
  assert retained + costs[nxt] > budget
  total = sum(float(np.sum(sig**2)) for sig in sigmas.values())
  assert report.kept_energy == pytest.approx(sum(s**2 for s in kept) / total)


# --- linen ----------------------------------------------------------------------------------------------------------

CONFIG = sora_jax.SoraConfig(rank=R, alpha=ALPHA, targets=(r".*kernel",), stacked=r"stack/.*")
SHAPES = {"q": (6, 5), "v": (9, 7), "stack": (3, 6, 4)}


def _linen_tree(seed=0, gates="random"):
  rng = np.random.default_rng(seed)
  base = {name: {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32)} for name, shape in SHAPES.items()}
  flat = traverse_util.flatten_dict(sora_jax.init(jax.random.key(seed), base, CONFIG))
  for path in list(flat):
    if path[-1] == "sora_b":
      flat[path] = jnp.asarray(rng.normal(size=flat[path].shape), jnp.float32)
    if path[-1] == "sora_gate" and gates == "random":
      gate = rng.normal(size=flat[path].shape) * (rng.uniform(size=flat[path].shape) > 0.2)
      flat[path] = jnp.asarray(gate, jnp.float32)
  return traverse_util.unflatten_dict(flat)


def _linen_deltas(tree):
  """module name -> (fan_in, fan_out) delta, from the leaves in NumPy (missing gate: ones)."""
  out = {}
  for name, shape in SHAPES.items():
    m = tree[name]
    layers = [None] if len(shape) == 2 else list(range(shape[0]))
    for layer in layers:
      key = name if layer is None else f"{name}[{layer}]"
      pick = (lambda x: np.asarray(x, np.float64)) if layer is None else (lambda x: np.asarray(x, np.float64)[layer])  # noqa: E731
      a, b = pick(m["sora_a"]), pick(m["sora_b"])
      g = pick(m["sora_gate"]) if "sora_gate" in m else np.ones(a.shape[-1])
      out[key] = S * (a * g) @ b
  return out


LINEN_COSTS = {"q": 11, "v": 16, **{f"stack[{i}]": 10 for i in range(3)}}


@pytest.mark.parametrize("budget", [10, 27, 60, 150])
@pytest.mark.parametrize("gates", ["random", "ones"])
def test_linen_matches_numpy_svd_truncation(budget, gates):
  tree = _linen_tree(gates=gates)
  deltas = _linen_deltas(tree)
  ranks, cut, sigmas = _reference(deltas, LINEN_COSTS, budget)
  out, report = sora_jax.truncate(tree, CONFIG, budget)
  assert report.ranks == ranks and report.budget_params == budget
  got = _linen_deltas(out)
  for name in deltas:
    np.testing.assert_allclose(got[name], cut[name], atol=1e-5)
  if any(ranks.values()):
    _check_threshold(report, sigmas, LINEN_COSTS, budget)
  # prune's format: no gate, variable rank, a rank-0 module keeps zero-size factors; the tree functions read it.
  assert all("sora_gate" not in m for m in out.values())
  assert all(out[n]["sora_a"].shape[-1] == max(v for k, v in ranks.items() if k.startswith(n)) for n in SHAPES)
  rows = {(r.path, r.layer): r.rank for r in sora_jax.rank_report(out, CONFIG).rows}
  assert rows == {(k.split("[")[0], int(k[-2]) if "[" in k else None): v for k, v in ranks.items()}
  assert sora_jax.rank_report(out, CONFIG).retained_params == report.retained_params
  merged = sora_jax.merge(out, CONFIG)
  np.testing.assert_allclose(merged["q"]["kernel"] - tree["q"]["kernel"], cut["q"], atol=1e-5)
  np.testing.assert_allclose(merged["stack"]["kernel"][1] - tree["stack"]["kernel"][1], cut["stack[1]"], atol=1e-5)


def test_eckart_young_no_rank_k_factorisation_is_closer():
  tree = _linen_tree(seed=3)
  deltas = _linen_deltas(tree)
  out, report = sora_jax.truncate(tree, CONFIG, 40)
  got = _linen_deltas(out)
  rng = np.random.default_rng(0)
  for name, delta in deltas.items():
    k = report.ranks[name]
    sigma = np.linalg.svd(delta, compute_uv=False)
    error = np.linalg.norm(delta - got[name])
    assert error == pytest.approx(np.sqrt(np.sum(sigma[k:] ** 2)), abs=1e-5)
    for trial in range(30):
      # random rank-k factorisations, and small perturbations of the truncated factors
      x, y = rng.normal(size=(delta.shape[0], k)), rng.normal(size=(k, delta.shape[1]))
      if trial % 2:
        u, s, vt = np.linalg.svd(got[name])
        x = u[:, :k] * s[:k] + 0.01 * x
        y = vt[:k] + 0.01 * y
      else:  # the least-squares best y for a random column space
        y = np.linalg.lstsq(x, delta, rcond=None)[0] if k else y
      assert np.linalg.norm(delta - x @ y) >= error - 1e-6


def test_pruned_and_lora_inputs_and_idempotence():
  """A pruned tree (no gate, a rank-0 module with zero-size factors) truncates like the gated one; truncating twice at
  the same budget changes nothing."""
  tree = _linen_tree(seed=1)
  flat = traverse_util.flatten_dict(tree)
  flat["v", "sora_gate"] = jnp.zeros(R)
  tree = traverse_util.unflatten_dict(flat)
  a, ra = sora_jax.truncate(tree, CONFIG, 45)
  b, rb = sora_jax.truncate(sora_jax.prune(tree), CONFIG, 45)
  assert ra.ranks["v"] == 0 and rb.ranks == ra.ranks and b["v"]["sora_a"].shape[-1] == 0
  for name in ra.ranks:
    np.testing.assert_allclose(_linen_deltas(a)[name], _linen_deltas(b)[name], atol=1e-5)
  c, rc = sora_jax.truncate(a, CONFIG, 45)
  assert rc.ranks == ra.ranks
  for name in ra.ranks:
    np.testing.assert_allclose(_linen_deltas(c)[name], _linen_deltas(a)[name], atol=1e-5)


def test_budget_below_one_rank_is_refused_in_one_line():
  tree = _linen_tree()
  with pytest.raises(ValueError, match=r"budget_params=9 is below one rank of the cheapest module \(10 params") as e:
    sora_jax.truncate(tree, CONFIG, 9)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="must be an int"):
    sora_jax.truncate(tree, CONFIG, 12.5)


# --- NNX / qwix -----------------------------------------------------------------------------------------------------


class Net(nnx.Module):
  """Linear (8 -> 6), LinearGeneral with batch axis 0 (kernel (2, 6, 5)), einsum 'bnd,ndh->bnh' (weight (2, 5, 4))."""

  def __init__(self, rngs):
    self.lin = nnx.Linear(8, 6, rngs=rngs)
    self.batched = nnx.LinearGeneral(6, 5, axis=-1, batch_axis={0: 2}, rngs=rngs)
    self.ein = nnx.Einsum("bnd,ndh->bnh", (2, 5, 4), rngs=rngs)

  def __call__(self, x):  # x (2, 3, 8)
    return self.ein(jnp.swapaxes(self.batched(self.lin(x)), 0, 1))


RULES = [
  sora_jax.SoraRule(module_path="batched|ein", rank=R, alpha=ALPHA),
  qwix.LoraRule(module_path="lin", rank=3, alpha=6.0),  # plain LoRA: no gate, s = 2
]
NNX_COSTS = {"lin/kernel": 14, "batched/kernel[0]": 11, "batched/kernel[1]": 11, "ein/kernel": 14}


def _nnx_state(seed=0):
  x = jnp.ones((2, 3, 8))
  model = sora_jax.apply_sora(Net(nnx.Rngs(0)), sora_jax.SoraProvider(RULES), x, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(seed)
  state = nnx.state(model)
  for path, var in nnx.to_flat_state(state):
    if str(path[-1]).endswith(("_lora_b", "_lora_gate")):
      var.set_value(jnp.asarray(rng.normal(size=var.get_value().shape), jnp.float32))
  return model, state


def _nnx_deltas(pure):
  """name -> delta as a (fan_in, fan_out) matrix, spelled out per layer from qwix's shapes."""
  f = lambda m, leaf: np.asarray(pure[m].get(f"kernel_lora_{leaf}"), np.float64)  # noqa: E731
  out = {"lin/kernel": 2.0 * f("lin", "a") @ f("lin", "b")}
  a, b, g = f("batched", "a"), f("batched", "b"), f("batched", "gate")  # (2, 6, r), (2, r, 5), (2, r)
  for e in range(2):
    out[f"batched/kernel[{e}]"] = S * (a[e] * g[e]) @ b[e]
  a, b, g = f("ein", "a"), f("ein", "b"), f("ein", "gate")  # (2, 5, r) over (n, d), (r, 4), (2, r)
  out["ein/kernel"] = S * (a * g[:, None, :]).reshape(10, -1) @ b
  return out


@pytest.mark.parametrize("budget", [11, 40, 75])
def test_nnx_qwix_matches_numpy_svd_truncation(budget):
  model, state = _nnx_state()
  pure = nnx.to_pure_dict(state)
  deltas = _nnx_deltas(pure)
  ranks, cut, sigmas = _reference(deltas, NNX_COSTS, budget)
  provider = sora_jax.SoraProvider(RULES)
  out, report = sora_jax.truncate(state, provider, budget)
  out_pure, report_pure = sora_jax.truncate(pure, provider, budget)
  assert isinstance(out, nnx.State) and report.ranks == ranks == report_pure.ranks
  _check_threshold(report, sigmas, NNX_COSTS, budget)
  got = _nnx_deltas(nnx.to_pure_dict(out))
  for name in deltas:
    np.testing.assert_allclose(got[name], cut[name], atol=1e-5)
    np.testing.assert_allclose(_nnx_deltas(out_pure)[name], cut[name], atol=1e-5)
  assert "kernel_lora_gate" not in nnx.to_pure_dict(out)["lin"]  # a gate absent before stays absent
  merged = nnx.to_pure_dict(sora_jax.merge(out, provider))
  np.testing.assert_allclose(
    merged["ein"]["kernel"] - pure["ein"]["kernel"], cut["ein/kernel"].reshape(2, 5, 4), atol=1e-5
  )
  # the truncated state runs in the adapted model and computes what the plain model with merged weights computes
  x = jax.random.normal(jax.random.key(2), (2, 3, 8))
  nnx.update(model, out)
  plain = Net(nnx.Rngs(0))
  plain_state = nnx.state(plain)
  nnx.replace_by_pure_dict(plain_state, merged)
  nnx.update(plain, plain_state)
  np.testing.assert_allclose(model(x), plain(x), atol=1e-4)


# --- PEFT export ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [False, True])
def test_save_peft_round_trip_keeps_the_truncated_deltas(tmp_path, scan_layers):
  pytest.importorskip("transformers")
  from sora_jax.models import EncoderNaming, bert

  hf = tiny_encoder_config("bert", hidden_size=16)  # narrower: the budget below counts 16 x 16 modules
  ids = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: bert.build(hf, scan_layers=scan_layers).init(jax.random.key(0), ids)["params"])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape), s.dtype), shapes)
  naming = EncoderNaming(hf)
  config = sora_jax.SoraConfig(
    rank=R, alpha=ALPHA, targets=naming.targets, stacked=naming.stacked if scan_layers else None
  )
  flat = traverse_util.flatten_dict(sora_jax.init(jax.random.key(1), params, config))
  for path in flat:
    if path[-1] in ("sora_b", "sora_gate"):
      flat[path] = jnp.asarray(rng.normal(size=flat[path].shape), jnp.float32)
  tree = traverse_util.unflatten_dict(flat)
  budget = 6 * 32  # six ranks of a 16 x 16 module
  out, report = sora_jax.truncate(tree, config, budget)
  assert report.retained_params <= budget and 0 < sum(report.ranks.values())
  written = sora_jax.save_peft(tmp_path, out, config, naming=naming, modules_to_save=())
  assert sorted(written.values()) == sorted(k for k in report.ranks.values() if k)
  peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
  listed = {name: peft_config["rank_pattern"].get(name, peft_config["r"]) for name in written}
  assert listed == written
  loaded = sora_jax.load_peft(tmp_path, params, naming)
  want = traverse_util.flatten_dict(sora_jax.merge(out, config))
  got = traverse_util.flatten_dict(sora_jax.merge(loaded.params, loaded.config))
  for path, value in want.items():
    np.testing.assert_allclose(got[path], value, atol=1e-5, err_msg="/".join(path))
