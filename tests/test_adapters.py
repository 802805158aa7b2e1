"""Adapter tree transforms against NumPy references: init, masks, split/combine, merge/unmerge, prune, report."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sora_jax

RS = np.random.RandomState(0)


def _params(stacked_layers=None):
  """A BERT-like tree: attention q (16 -> 8), a DenseGeneral (16 -> 2 x 4), a classifier; optionally stacked."""
  lead = () if stacked_layers is None else (stacked_layers,)
  f = lambda *shape: jnp.asarray(RS.randn(*lead, *shape), jnp.float32)
  return {
    "encoder": {
      "layer": {"query": {"kernel": f(16, 8), "bias": f(8)}, "heads": {"kernel": f(16, 2, 4), "bias": f(2, 4)}}
    },
    "classifier": {"kernel": jnp.asarray(RS.randn(8, 3), jnp.float32), "bias": jnp.zeros(3)},
  }


TARGETS = (r"encoder/.*/kernel",)


def _randomize(params, rs=None):
  """Nonzero B and gates with some exact zeros (what training leaves behind)."""
  rs = rs or np.random.RandomState(1)

  def f(path, v):
    if path[-1].key == "sora_b":
      return jnp.asarray(rs.randn(*v.shape), v.dtype)
    if path[-1].key == "sora_gate":
      g = rs.randn(*v.shape) * (rs.rand(*v.shape) > 0.4)
      return jnp.asarray(g, v.dtype)
    return v

  return jax.tree_util.tree_map_with_path(f, params)


def _np_delta(a, b, gate, scale, in_axes):
  """NumPy reference, one layer: s * A diag(g) B with A (*in, r), B (r, *out)."""
  r = a.shape[-1]
  a2, b2 = a.reshape(-1, r), b.reshape(r, -1)
  g = np.ones(r) if gate is None else gate
  return (scale * (a2 * g) @ b2).reshape(a.shape[:in_axes] + b.shape[1:])


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(rank=0), "rank"),
    (dict(alpha=0.0), "alpha"),
    (dict(gate_init="zeros"), "gate_init"),
    (dict(dropout=1.0), "dropout"),
    (dict(targets=("(",)), "regular expression"),
    (dict(targets=()), "targets"),
    (dict(in_axes=0), "in_axes"),
  ],
)
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sora_jax.SoraConfig(**kwargs)


def test_config_scale_and_str_targets():
  config = sora_jax.SoraConfig(rank=4, alpha=16.0, targets=".*kernel")
  assert config.scale == 4.0 and config.targets == (".*kernel",)


@pytest.mark.parametrize("stacked", [None, 3])
@pytest.mark.parametrize("gate_init", ["ones", "normal"])
def test_init_shapes_and_distributions(stacked, gate_init):
  params = _params(stacked)
  config = sora_jax.SoraConfig(
    rank=4, targets=TARGETS, gate_init=gate_init, stacked=None if stacked is None else r"encoder/layer/.*"
  )
  out = sora_jax.init(jax.random.key(0), params, config)
  lead = () if stacked is None else (stacked,)
  q, h = out["encoder"]["layer"]["query"], out["encoder"]["layer"]["heads"]
  assert q["sora_a"].shape == lead + (16, 4) and q["sora_b"].shape == lead + (4, 8)
  assert h["sora_a"].shape == lead + (16, 4) and h["sora_b"].shape == lead + (4, 2, 4)
  assert q["sora_gate"].shape == lead + (4,)
  assert "sora_a" not in out["classifier"]
  np.testing.assert_array_equal(q["sora_b"], 0.0)
  # kaiming_uniform_(a=sqrt(5)): bound = sqrt(1/3) * sqrt(3 / fan_in) = 1 / sqrt(fan_in).
  assert float(jnp.abs(q["sora_a"]).max()) <= 1 / math.sqrt(16)
  assert float(jnp.abs(q["sora_a"]).max()) > 0.8 / math.sqrt(16)
  if gate_init == "ones":
    np.testing.assert_array_equal(q["sora_gate"], 1.0)
  else:
    assert float(jnp.std(q["sora_gate"])) > 0.2 and not np.any(np.asarray(q["sora_gate"]) == 1.0)
  # The original leaves are untouched and the input tree is not mutated.
  np.testing.assert_array_equal(q["kernel"], params["encoder"]["layer"]["query"]["kernel"])
  assert "sora_a" not in params["encoder"]["layer"]["query"]


def test_init_keeps_dtype():
  params = {"dense": {"kernel": jnp.ones((8, 8), jnp.bfloat16)}}
  out = sora_jax.init(jax.random.key(0), params, sora_jax.SoraConfig(rank=2, targets=(".*kernel",)))
  assert {v.dtype for v in jax.tree.leaves(out)} == {jnp.dtype(jnp.bfloat16)}


def test_init_errors_name_path_and_fix():
  params = _params()
  with pytest.raises(ValueError, match=r"match no parameter path.*'\.\*'"):
    sora_jax.init(jax.random.key(0), params, sora_jax.SoraConfig(targets=("attention/query/kernel",)))
  with pytest.raises(ValueError, match=r"encoder/layer/query/bias.*not a dense kernel.*'/kernel'"):
    sora_jax.init(jax.random.key(0), params, sora_jax.SoraConfig(targets=("encoder/layer/query/.*",)))
  with pytest.raises(ValueError, match=r"rank 9 exceeds min\(in, out\) = min\(16, 8\) of 'encoder/layer/query/kernel'"):
    sora_jax.init(jax.random.key(0), params, sora_jax.SoraConfig(rank=9, targets=TARGETS))
  adapted = sora_jax.init(jax.random.key(0), params, sora_jax.SoraConfig(rank=2, targets=TARGETS))
  with pytest.raises(ValueError, match="already has SoRA adapters"):
    sora_jax.init(jax.random.key(0), adapted, sora_jax.SoraConfig(rank=2, targets=TARGETS))


def test_masks_labels_split_combine():
  config = sora_jax.SoraConfig(rank=2, targets=TARGETS)
  params = sora_jax.init(jax.random.key(0), _params(), config)
  q_mask = sora_jax.adapter_mask(params)["encoder"]["layer"]["query"]
  assert q_mask == {"kernel": False, "bias": False, "sora_a": True, "sora_b": True, "sora_gate": True}
  assert sora_jax.gate_mask(params)["encoder"]["layer"]["heads"]["sora_gate"] is True
  assert sora_jax.gate_mask(params)["encoder"]["layer"]["heads"]["sora_a"] is False
  labels = sora_jax.param_labels(params, trainable=("classifier/.*",))
  assert labels["classifier"] == {"kernel": "trainable", "bias": "trainable"}
  assert labels["encoder"]["layer"]["query"]["sora_gate"] == "gate"
  assert labels["encoder"]["layer"]["query"]["sora_b"] == "adapter"
  assert labels["encoder"]["layer"]["query"]["kernel"] == "frozen"

  trainable, frozen = sora_jax.split(params, trainable=("classifier/.*",))
  assert set(trainable) == {"encoder", "classifier"} and "kernel" not in trainable["encoder"]["layer"]["query"]
  assert "classifier" not in frozen and "sora_a" not in frozen["encoder"]["layer"]["query"]
  jax.tree.map(np.testing.assert_array_equal, sora_jax.combine(trainable, frozen), params)
  with pytest.raises(ValueError, match="more than one tree"):
    sora_jax.combine(trainable, params)


@pytest.mark.parametrize("stacked", [None, 3])
def test_merge_unmerge_match_numpy(stacked):
  config = sora_jax.SoraConfig(rank=4, alpha=8.0, targets=TARGETS, stacked=None if stacked is None else r"encoder/.*")
  params = _randomize(sora_jax.init(jax.random.key(0), _params(stacked), config))
  merged = sora_jax.merge(params, config)
  assert "sora_a" not in merged["encoder"]["layer"]["query"]
  np.testing.assert_array_equal(merged["classifier"]["kernel"], params["classifier"]["kernel"])
  for name in ("query", "heads"):
    m = jax.tree.map(np.asarray, params["encoder"]["layer"][name])
    layers = [m] if stacked is None else [jax.tree.map(lambda v: v[i], m) for i in range(stacked)]
    want = np.stack([l["kernel"] + _np_delta(l["sora_a"], l["sora_b"], l["sora_gate"], 2.0, 1) for l in layers])
    np.testing.assert_allclose(merged["encoder"]["layer"][name]["kernel"], want.reshape(m["kernel"].shape), atol=1e-5)
  restored = sora_jax.unmerge(merged, sora_jax.split(params)[0], config)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), restored, params)


def test_prune_matches_numpy_reference():
  config = sora_jax.SoraConfig(rank=4, alpha=8.0, targets=TARGETS)
  params = sora_jax.init(jax.random.key(0), _params(), config)
  q = params["encoder"]["layer"]["query"]
  q["sora_b"] = jnp.asarray(RS.randn(4, 8), jnp.float32)
  q["sora_gate"] = jnp.asarray([0.5, 0.0, -2.0, 0.0])
  params["encoder"]["layer"]["heads"]["sora_gate"] = jnp.zeros(4)
  pruned = sora_jax.prune(params)
  pq = pruned["encoder"]["layer"]["query"]
  a, b = np.asarray(q["sora_a"]), np.asarray(q["sora_b"])
  np.testing.assert_allclose(pq["sora_a"], a[:, [0, 2]])
  np.testing.assert_allclose(pq["sora_b"], np.array([0.5, -2.0])[:, None] * b[[0, 2]], rtol=1e-6)
  assert "sora_gate" not in pq
  heads = pruned["encoder"]["layer"]["heads"]  # rank 0: zero-size A (in, 0) and B (0, *out), as in the qwix layout
  assert set(heads) == {"kernel", "bias", "sora_a", "sora_b"}
  assert heads["sora_a"].shape == (16, 0) and heads["sora_b"].shape == (0, 2, 4)
  merged, merged_pruned = sora_jax.merge(params, config), sora_jax.merge(pruned, config)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), merged, merged_pruned)
  # Pruning twice changes nothing.
  jax.tree.map(np.testing.assert_array_equal, sora_jax.prune(pruned), pruned)


def test_prune_stacked_keeps_max_rank_per_module():
  config = sora_jax.SoraConfig(rank=4, alpha=8.0, targets=TARGETS, stacked=r"encoder/.*")
  params = _randomize(sora_jax.init(jax.random.key(0), _params(3), config))
  gate = np.array([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 4.0, 5.0]], np.float32)
  params["encoder"]["layer"]["query"]["sora_gate"] = jnp.asarray(gate)
  pruned = sora_jax.prune(params)
  pq = pruned["encoder"]["layer"]["query"]
  assert pq["sora_a"].shape == (3, 16, 3) and pq["sora_b"].shape == (3, 3, 8)
  np.testing.assert_array_equal(pq["sora_b"][0, 2], 0.0)  # layer 0 has rank 2: one zero row of padding
  np.testing.assert_array_equal(pq["sora_b"][1], 0.0)
  merged, merged_pruned = sora_jax.merge(params, config), sora_jax.merge(pruned, config)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), merged, merged_pruned)
  report = sora_jax.rank_report(pruned, config)
  ranks = {(r.path, r.layer): r.rank for r in report.rows}
  assert [ranks[("encoder/layer/query", i)] for i in range(3)] == [2, 0, 3]


def test_rank_report_counts():
  config = sora_jax.SoraConfig(rank=4, alpha=8.0, targets=TARGETS)
  params = sora_jax.init(jax.random.key(0), _params(), config)
  params["encoder"]["layer"]["query"]["sora_b"] = jnp.ones((4, 8))
  params["encoder"]["layer"]["query"]["sora_gate"] = jnp.asarray([1.0, 0.0, 1.0, 0.0])
  params["encoder"]["layer"]["heads"]["sora_gate"] = jnp.zeros(4)
  for tree in (params, sora_jax.prune(params)):
    report = sora_jax.rank_report(tree, config)
    rows = {r.path: r for r in report.rows}
    assert rows["encoder/layer/query"] == sora_jax.RankRow("encoder/layer/query", None, 4, 2, 16, 8, 2 * 24)
    assert rows["encoder/layer/heads"].rank == 0 and rows["encoder/layer/heads"].fan_out == 8
    assert report.retained_params == 48 and report.max_params == 4 * 24 + 4 * 24
    assert report.fraction == pytest.approx(0.25)
    assert report.base_params == 16 * 8 + 8 + 16 * 8 + 8 + 8 * 3 + 3
    text = str(report)
    assert "encoder/layer/query" in text and "2/4" in text and "25.00%" in text


@pytest.mark.parametrize("fn", ["rank_report", "merge", "truncate"])
def test_targeted_kernel_without_adapter_leaves_is_refused(fn):
  """A rank-0 module keeps zero-size leaves; a tree whose targeted kernel lacks them (a hand-pruned tree) would have
  that module silently left out of the counts, so the tree functions refuse it with one line."""
  config = sora_jax.SoraConfig(rank=4, alpha=8.0, targets=TARGETS)
  params = sora_jax.prune(sora_jax.init(jax.random.key(0), _params(), config))
  del params["encoder"]["layer"]["heads"]["sora_a"], params["encoder"]["layer"]["heads"]["sora_b"]
  calls = {
    "rank_report": lambda: sora_jax.rank_report(params, config),
    "merge": lambda: sora_jax.merge(params, config),
    "truncate": lambda: sora_jax.truncate(params, config, 100),
  }
  with pytest.raises(ValueError, match=f"{fn}: encoder/layer/heads/kernel is matched by SoraConfig.targets but has no"):
    calls[fn]()
