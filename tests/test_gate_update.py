"""The default gate update (the recipe, `sora_optimizer` / `sora_proximal(optimizer=...)`) against a NumPy reference.

Reference, written from the formula (sora_jax/gate_step.py's module docstring), not from the code: at step t
(t = 0, 1, ...), with G the gate gradients of every gate leaf,

  nu_t   = 0.999 nu_{t-1} + 0.001 mean(G^2)          (one number over every gate entry; nu_{-1} = 0)
  rms_t  = sqrt(nu_t / (1 - 0.999^(t+1)))            (bias-corrected)
  g     <- S_{eta_t lam_t}(g - eta_t dL/dg / rms_t),  S_tau(z) = sign(z) max(|z| - tau, 0)

and every other leaf takes the optimizer's own step on its gradient (the optimizer never sees the gates).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sora_jax

STEPS = 5


def _params(seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  return {
    "q": {"kernel": f32(6, 5), "sora_a": f32(6, 4), "sora_b": f32(4, 5), "sora_gate": f32(4)},
    "v": {"kernel": f32(6, 5), "sora_a": f32(6, 3), "sora_b": f32(3, 5), "sora_gate": 0.1 * f32(3)},
    "head": {"kernel": f32(5, 2), "bias": f32(2)},
  }


def _grads(params, t):
  rng = np.random.default_rng(100 + t)
  # Gate gradients of different sizes per leaf, so the one RMS over all entries differs from a per-leaf one.
  return jax.tree_util.tree_map_with_path(
    lambda path, x: jnp.asarray(
      rng.normal(size=x.shape) * (5.0 if getattr(path[0], "key", None) == "q" else 0.5), x.dtype
    ),
    params,
  )


def _soft_threshold(z, tau):
  return np.sign(z) * np.maximum(np.abs(z) - tau, 0.0)


def _reference_gates(params, grads_per_step, eta, lam):
  """The gates after each step, by the formula (float64)."""
  gates = {m: np.asarray(params[m]["sora_gate"], np.float64) for m in ("q", "v")}
  nu, out = 0.0, []
  for t, grads in enumerate(grads_per_step):
    g = {m: np.asarray(grads[m]["sora_gate"], np.float64) for m in gates}
    all_g = np.concatenate([g[m] for m in sorted(g)])
    nu = 0.999 * nu + 0.001 * np.mean(all_g**2)
    rms = np.sqrt(nu / (1 - 0.999 ** (t + 1)))
    e, lt = eta(t), lam(t)
    gates = {m: _soft_threshold(gates[m] - e * g[m] / rms, e * lt) for m in gates}
    out.append(dict(gates))
  return out


def _run(tx, params, grads_per_step, jit):
  update = jax.jit(tx.update) if jit else tx.update
  state, history = tx.init(params), []
  for grads in grads_per_step:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history, state


@pytest.mark.parametrize("jit", [False, True])
def test_the_gates_follow_the_formula_and_the_rest_take_the_optimizers_step(jit):
  params = _params()
  grads = [_grads(params, t) for t in range(STEPS)]
  eta = optax.linear_schedule(0.3, 0.05, STEPS)  # a schedule: eta_t read at the step's count
  lam = 0.4
  history, _ = _run(sora_jax.sora_optimizer(eta, lam, optax.adamw(1e-2)), params, grads, jit)
  want = _reference_gates(params, grads, lambda t: float(eta(t)), lambda t: lam)
  for got, ref in zip(history, want):
    for m in ("q", "v"):
      np.testing.assert_allclose(got[m]["sora_gate"], ref[m], rtol=2e-5, atol=1e-6)
  # The threshold acts: some gates end at exactly zero, some are kept.
  final = np.concatenate([np.asarray(history[-1][m]["sora_gate"]) for m in ("q", "v")])
  assert (final == 0).any() and (final != 0).any()
  # Every other leaf: AdamW alone on the tree without gates (its moments never hold a gate).
  strip = lambda tree: {m: {k: v for k, v in tree[m].items() if k != "sora_gate"} for m in tree}  # noqa: E731
  alone, _ = _run(optax.adamw(1e-2), strip(params), [strip(g) for g in grads], jit=False)
  for got, ref in zip(history, alone):
    for got_leaf, ref_leaf in zip(jax.tree.leaves(strip(got)), jax.tree.leaves(ref)):
      np.testing.assert_allclose(got_leaf, ref_leaf, rtol=1e-6, atol=1e-7)


def test_the_recipe_is_sora_proximal_with_an_optimizer():
  params = _params()
  grads = [_grads(params, t) for t in range(3)]
  a, _ = _run(sora_jax.sora_optimizer(0.2, 0.3, optax.adamw(1e-2)), params, grads, jit=False)
  b, _ = _run(sora_jax.sora_proximal(0.3, learning_rate=0.2, optimizer=optax.adamw(1e-2)), params, grads, jit=False)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("jit", [True])
def test_inject_hyperparams_changes_lambda_and_the_rate_between_steps(jit):
  """optax.inject_hyperparams: lam and the gates' rate live in the state; a change between steps takes effect."""
  params = _params()
  grads = [_grads(params, t) for t in range(STEPS)]
  tx = optax.inject_hyperparams(sora_jax.sora_optimizer, static_args=("optimizer",))(
    learning_rate=0.2, lam=0.3, optimizer=optax.adamw(1e-2)
  )
  update = jax.jit(tx.update) if jit else tx.update
  state, p = tx.init(params), params
  etas, lams = [0.2, 0.2, 0.1, 0.05, 0.3], [0.3, 0.6, 0.0, 0.2, 0.2]
  history = []
  for t, g in enumerate(grads):
    state.hyperparams["learning_rate"] = jnp.asarray(etas[t])
    state.hyperparams["lam"] = jnp.asarray(lams[t])
    updates, state = update(g, state, p)
    p = optax.apply_updates(p, updates)
    history.append(p)
  want = _reference_gates(params, grads, lambda t: etas[t], lambda t: lams[t])
  for got, ref in zip(history, want):
    for m in ("q", "v"):
      np.testing.assert_allclose(got[m]["sora_gate"], ref[m], rtol=2e-5, atol=1e-6)


def test_a_zero_gradient_is_a_zero_step_and_a_nonfinite_one_stays_visible():
  params = _params()
  zero = jax.tree.map(jnp.zeros_like, params)
  tx = sora_jax.sora_optimizer(0.5, 0.0, optax.adamw(1e-2))
  (after,), _ = _run(tx, params, [zero], jit=True)
  for m in ("q", "v"):  # rms = 0: (u / rms) with u = 0 is 0, not NaN
    np.testing.assert_array_equal(after[m]["sora_gate"], params[m]["sora_gate"])
  bad = _grads(params, 0)
  bad["q"]["sora_gate"] = bad["q"]["sora_gate"].at[0].set(jnp.nan)
  (after,), _ = _run(tx, params, [bad], jit=True)
  assert np.isnan(np.asarray(after["q"]["sora_gate"])).any()  # a diverged gate never looks pruned


def test_the_chain_form_is_the_official_behaviour():
  """gate_update="adam" is optax.chain(adamw(mask=not_gate), sora_proximal(lam, learning_rate=lr)), step for step."""
  params = _params()
  grads = [_grads(params, t) for t in range(3)]
  a, _ = _run(sora_jax.sora_optimizer(0.05, 0.3, gate_update="adam"), params, grads, jit=False)
  chain = optax.chain(optax.adamw(0.05, mask=sora_jax.not_gate_mask), sora_jax.sora_proximal(0.3, learning_rate=0.05))
  b, _ = _run(chain, params, grads, jit=False)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_bad_arguments_are_refused_in_one_line():
  with pytest.raises(ValueError, match="gate_update must be one of"):
    sora_jax.sora_optimizer(0.1, 0.1, gate_update="sgd")
  with pytest.raises(ValueError, match="need gate_update='adam'"):
    sora_jax.sora_optimizer(0.1, 0.1, gate_scale=2.0)
  with pytest.raises(ValueError, match="target_fraction needs total_steps"):
    sora_jax.sora_optimizer(0.1, 0.1, target_fraction=0.5)
  with pytest.raises(ValueError, match="lam must be a finite number"):
    sora_jax.sora_optimizer(0.1, -1.0)
