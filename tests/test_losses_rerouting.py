"""losses/rerouting.py: the rerouting and retain terms and the schedule, by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semsafe_jax.losses import rerouting as R


def states():
  """2 layers x 1 row x 3 tokens x 2 dims, with cosines chosen by hand."""
  a = np.array([[[[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]]],
                [[[0.0, 3.0], [1.0, 0.0], [5.0, 5.0]]]], np.float32)
  f = np.array([[[[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]],
                [[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]]]], np.float32)
  return a, f


def test_rerouting_is_mean_relu_cosine_over_layers_and_masked_tokens():
  a, f = states()
  # cosines: layer 0: 1, 1/sqrt2, -1 (ReLU -> 0); layer 1: 0, 3/5, 1 (token 2 masked)
  mask = np.array([[True, True, False]])
  want = (1.0 + 2 ** -0.5 + 0.0 + 0.6) / 4
  np.testing.assert_allclose(R.rerouting_loss(a, f, mask), want, rtol=1e-6)
  # Every token: the two -1 / 1 at token 2 add ReLU(-1) = 0 and 1.
  np.testing.assert_allclose(R.rerouting_loss(a, f, np.ones((1, 3), bool)),
                             (1.0 + 2 ** -0.5 + 0.0 + 0.0 + 0.6 + 1.0) / 6, rtol=1e-6)


def test_rerouting_weights_rows_and_ignores_scale():
  a, f = states()
  w = np.array([[0.5, 1.0, 0.0]], np.float32)
  want = (0.5 * 1.0 + 1.0 * 2 ** -0.5 + 0.5 * 0.0 + 1.0 * 0.6) / 3.0
  np.testing.assert_allclose(R.rerouting_loss(a, f, w), want, rtol=1e-6)
  np.testing.assert_allclose(R.rerouting_loss(7.0 * a, 0.1 * f, w), want, rtol=1e-5)


def test_rerouting_is_zero_for_orthogonal_or_opposite_states():
  a = np.array([[[1.0, 0.0], [0.0, 2.0]]], np.float32)
  f = np.array([[[0.0, 1.0], [0.0, -1.0]]], np.float32)
  assert float(R.rerouting_loss(a, f, np.ones((1, 2), bool))) == 0.0


def test_retain_is_mean_l2_distance_over_layers_and_masked_tokens():
  a, f = states()
  # distances: layer 0: 0, 1, 3; layer 1: sqrt(10), 2*sqrt(5), 4*sqrt(2) (token 2 masked)
  mask = np.array([[True, True, False]])
  want = (0.0 + 1.0 + 10 ** 0.5 + 2 * 5 ** 0.5) / 4
  np.testing.assert_allclose(R.retain_loss(a, f, mask), want, rtol=1e-6)
  # Without a layer axis: [B, L, D].
  np.testing.assert_allclose(R.retain_loss(a[0], f[0], mask), (0.0 + 1.0) / 2, rtol=1e-6)


def test_retain_gradient_is_finite_where_states_are_equal():
  # At the first step LoRA's B is zero and the states are identical: sqrt'(0) must not
  # turn into NaN.
  a, _ = states()
  g = jax.grad(lambda x: R.retain_loss(x, jnp.asarray(a), np.ones((1, 3), bool)))(
      jnp.asarray(a))
  assert np.isfinite(np.asarray(g)).all() and float(np.abs(g).max()) == 0.0
  g = jax.grad(lambda x: R.rerouting_loss(x, jnp.asarray(a), np.ones((1, 3), bool)))(
      jnp.asarray(a))
  assert np.isfinite(np.asarray(g)).all()


def test_empty_mask_gives_zero():
  a, f = states()
  none = np.zeros((1, 3), bool)
  assert float(R.rerouting_loss(a, f, none)) == 0.0 and float(R.retain_loss(a, f, none)) == 0.0


@pytest.mark.parametrize("step,want", [(0, (8.0, 0.0)), (50, (6.0, 2.0)), (100, (4.0, 4.0))])
def test_schedule(step, want):
  # alpha (1 - t/2T), alpha t/2T with alpha = 8, T = 100.
  c_s, c_r = R.schedule(step, 100, 8.0)
  np.testing.assert_allclose([float(c_s), float(c_r)], want, rtol=1e-6)


def test_schedule_traces_under_jit():
  c_s, c_r = jax.jit(lambda s: R.schedule(s, 150, 10.0))(jnp.int32(30))
  np.testing.assert_allclose([float(c_s), float(c_r)], [9.0, 1.0], rtol=1e-6)
