"""losses/preference.py: DPO and SafeDPO's transform against hand computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semsafe_jax.losses import preference as P

# Fixed summed log-probabilities of three pairs.
PC = np.array([-10.0, -5.0, -7.0], np.float32)  # policy, chosen
PR = np.array([-12.0, -4.0, -7.0], np.float32)  # policy, rejected
RC = np.array([-11.0, -5.0, -6.0], np.float32)  # reference, chosen
RR = np.array([-11.0, -5.0, -8.0], np.float32)  # reference, rejected
BETA = 0.5
# h = (PC - RC) - (PR - RR) = [1 - (-1), 0 - 1, -1 - 1] = [2, -1, -2]; beta * h = [1, -0.5, -1].


def softplus(x):
  return math.log1p(math.exp(x))


def test_dpo_loss_by_hand():
  loss, m = P.dpo_loss(PC, PR, RC, RR, BETA)
  # -log sigmoid(z) = log(1 + exp(-z)).
  want = (softplus(-1.0) + softplus(0.5) + softplus(1.0)) / 3
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(m["reward_chosen"], BETA * (1 + 0 - 1) / 3, atol=1e-7)
  np.testing.assert_allclose(m["reward_rejected"], BETA * (-1 + 1 + 1) / 3, rtol=1e-6)
  np.testing.assert_allclose(m["reward_margin"], (1.0 - 0.5 - 1.0) / 3, rtol=1e-6)
  np.testing.assert_allclose(m["reward_accuracy"], 1 / 3, rtol=1e-6)


def test_dpo_loss_weight_and_margin_by_hand():
  w = np.array([1.0, 2.0, 0.0], np.float32)
  margin = np.array([0.3, 0.0, 5.0], np.float32)
  loss, m = P.dpo_loss(PC, PR, RC, RR, BETA, weight=w, margin=margin)
  # Pair 2 has weight 0: neither its loss nor its margin counts.
  want = (softplus(-(1.0 - 0.3)) + 2 * softplus(0.5)) / 3
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(m["reward_margin"], (1.0 + 2 * -0.5) / 3, atol=1e-7)
  np.testing.assert_allclose(m["reward_accuracy"], 1 / 3, rtol=1e-6)


def test_dpo_gradient_by_hand():
  """d loss / d log pi(y_c) = -beta * sigmoid(-z) / P, and the opposite for y_r."""
  g_c, g_r = jax.grad(lambda c, r: P.dpo_loss(c, r, RC, RR, BETA)[0], argnums=(0, 1))(
      jnp.asarray(PC), jnp.asarray(PR))
  z = np.array([1.0, -0.5, -1.0])
  want = -BETA / (1 + np.exp(z)) / 3
  np.testing.assert_allclose(g_c, want, rtol=1e-5)
  np.testing.assert_allclose(g_r, -want, rtol=1e-5)


def test_dpo_equal_policy_and_reference_is_log2():
  loss, m = P.dpo_loss(PC, PR, PC, PR, 0.1)
  np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-7)
  assert float(m["reward_accuracy"]) == 0.0  # ties are not wins


def test_dpo_all_weights_zero_is_zero_without_nan():
  w = np.zeros(3, np.float32)
  f = lambda c: P.dpo_loss(c, PR, RC, RR, BETA, weight=w)[0]
  assert float(f(jnp.asarray(PC))) == 0.0
  assert np.all(np.isfinite(jax.grad(f)(jnp.asarray(PC))))


def test_dpo_jit_matches_eager():
  w = np.array([1.0, 0.5, 2.0], np.float32)
  margin = np.array([0.0, 1.0, 0.0], np.float32)
  eager = P.dpo_loss(PC, PR, RC, RR, BETA, weight=w, margin=margin)
  jitted = jax.jit(lambda *a: P.dpo_loss(*a, BETA, weight=w, margin=margin))(PC, PR, RC, RR)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)


# --- SafeDPO's transform: every combination of labels (1 = unsafe).


def test_safedpo_transform_label_table():
  chosen_unsafe = np.array([0, 0, 1, 1], bool)
  rejected_unsafe = np.array([0, 1, 0, 1], bool)
  t = P.safedpo_transform(chosen_unsafe, rejected_unsafe, delta=2.5)
  #                safe/safe  safe/unsafe  unsafe/safe  unsafe/unsafe
  np.testing.assert_array_equal(t.swap, [False, False, True, False])
  np.testing.assert_array_equal(t.weight, [1.0, 1.0, 1.0, 0.0])  # both unsafe: dropped
  np.testing.assert_array_equal(t.margin, [0.0, 2.5, 2.5, 0.0])  # Delta on safe vs unsafe
  # After the transform no kept pair prefers an unsafe response.
  np.testing.assert_array_equal(t.chosen_unsafe, [False, False, False, True])
  np.testing.assert_array_equal(t.rejected_unsafe, [False, True, True, True])


def test_safedpo_loss_on_transformed_pairs():
  """-log sigmoid(beta * h - (h_l - h_w) * Delta) over the kept pairs, by hand."""
  t = P.safedpo_transform([0, 1, 1], [1, 0, 1], delta=1.5)
  # Pair 1 is swapped: its chosen side is the old rejected response.
  pc = np.where(t.swap, PR, PC)
  pr = np.where(t.swap, PC, PR)
  rc = np.where(t.swap, RR, RC)
  rr = np.where(t.swap, RC, RR)
  loss, _ = P.dpo_loss(pc, pr, rc, rr, BETA, weight=t.weight, margin=t.margin)
  # beta * h: pair 0 as before (1.0); pair 1 swapped (-(-0.5) = 0.5); pair 2 dropped.
  want = (softplus(-(1.0 - 1.5)) + softplus(-(0.5 - 1.5))) / 2
  np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_safedpo_zero_delta_is_dpo_on_reordered_pairs():
  t = P.safedpo_transform([0, 0], [1, 0], delta=0.0)
  np.testing.assert_array_equal(t.margin, [0.0, 0.0])
  np.testing.assert_array_equal(t.weight, [1.0, 1.0])


def test_safedpo_transform_errors():
  with pytest.raises(ValueError, match="method.delta=-1"):
    P.safedpo_transform([0], [1], delta=-1.0)
  with pytest.raises(ValueError, match="differ"):
    P.safedpo_transform([0, 1], [1], delta=1.0)
