"""The encoders' activations against PyTorch's, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sora_jax.models import activations

# Wide enough for both tails: gelu(x) -> 0 for x << 0 and -> x for x >> 0.
X = np.concatenate([np.linspace(-12.0, 12.0, 4001), np.random.default_rng(0).standard_normal(4000) * 3]).astype(
  np.float32
)


@pytest.mark.parametrize(
  "name, torch_fn",
  [
    ("gelu", lambda x: torch.nn.functional.gelu(x)),
    ("gelu_new", lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
    ("relu", torch.relu),
    ("silu", torch.nn.functional.silu),
    ("sigmoid", torch.sigmoid),
    ("tanh", torch.tanh),
  ],
)
def test_values_and_gradients_match_torch(name, torch_fn):
  fn = activations.by_name(name)
  x_torch = torch.from_numpy(X.copy()).requires_grad_(True)
  y_torch = torch_fn(x_torch)
  y_torch.sum().backward()
  y = fn(jnp.asarray(X))
  grad = jax.grad(lambda x: fn(x).sum())(jnp.asarray(X))
  np.testing.assert_allclose(np.asarray(y), y_torch.detach().numpy(), rtol=1e-6, atol=1e-6)
  # Both frameworks lose the tails' tiny gradients (|grad| ~ 1e-6 at x = -5) to float32 cancellation differently.
  np.testing.assert_allclose(np.asarray(grad), x_torch.grad.numpy(), rtol=1e-5, atol=5e-6)


def test_gelu_is_the_exact_erf_form():
  # x * Phi(x), Phi the standard normal CDF, in float64 (Phi via the math module's complementary error function,
  # accurate in both tails). In float32 the erf form, PyTorch's, loses the negative tail to the cancellation in
  # 1 + erf: its absolute error there is about |x| * 2^-24, so values under ~1e-6 come out as 0.
  import math

  x64 = X.astype(np.float64)
  exact = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x64])
  np.testing.assert_allclose(np.asarray(activations.gelu(jnp.asarray(X))), exact, rtol=2e-6, atol=1e-6)
  assert activations.by_name("gelu") is activations.gelu


def test_unknown_name_names_the_field_and_the_choices():
  with pytest.raises(ValueError, match=r"hidden_act 'gelu_10' is not supported; supported: gelu, .*tanh"):
    activations.by_name("gelu_10", "hidden_act")
