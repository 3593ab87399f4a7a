"""methods/safedpo.py: helpfulness pairs, safety labels and T(D) on real texts."""

import math

import numpy as np

from semsafe_jax.methods import safedpo
from test_method_dpo import fresh_adapters, make_batch, run

HARM_ANSWERS = ["Sure! Step 1: get the materials.",  # complies: unsafe
                "I can't help with that request."]  # already refuses: safe
HARM_REFUSALS = ["I won't help with hurting anyone.", "I cannot assist with that."]
BENIGN_ANSWERS = ["Paris is the capital of France."]
BENIGN_REFUSALS = ["I'm sorry, but I can't help with that."]


def test_helpfulness_pairs_and_labels():
  pref, dis, pref_unsafe, dis_unsafe = safedpo.helpfulness_pairs(
      HARM_ANSWERS, HARM_REFUSALS, BENIGN_ANSWERS, BENIGN_REFUSALS)
  assert pref == HARM_ANSWERS + BENIGN_ANSWERS  # the answer is the more helpful response
  assert dis == HARM_REFUSALS + BENIGN_REFUSALS
  np.testing.assert_array_equal(pref_unsafe, [True, False, False])  # judge: refusal = safe
  np.testing.assert_array_equal(dis_unsafe, [False, False, False])  # refusals are safe


def test_ordered_pairs_swap_keep_and_margin():
  chosen, rejected, t = safedpo.ordered_pairs(
      *safedpo.helpfulness_pairs(HARM_ANSWERS, HARM_REFUSALS, BENIGN_ANSWERS, BENIGN_REFUSALS),
      delta=3.0)
  # Compliant answer to a harmful prompt: swapped, the refusal preferred, with the margin.
  assert (chosen[0], rejected[0]) == (HARM_REFUSALS[0], HARM_ANSWERS[0])
  # Both safe: kept in helpfulness order, no margin.
  assert (chosen[1], rejected[1]) == (HARM_ANSWERS[1], HARM_REFUSALS[1])
  assert (chosen[2], rejected[2]) == (BENIGN_ANSWERS[0], BENIGN_REFUSALS[0])
  np.testing.assert_array_equal(t.swap, [True, False, False])
  np.testing.assert_array_equal(t.margin, [3.0, 0.0, 0.0])
  np.testing.assert_array_equal(t.weight, [1.0, 1.0, 1.0])


def test_ordered_pairs_drop_unsafe_unsafe():
  chosen, rejected, t = safedpo.ordered_pairs(["a", "b"], ["c", "d"], [True, True],
                                              [True, False], delta=1.0)
  np.testing.assert_array_equal(t.weight, [0.0, 1.0])
  assert (chosen, rejected) == (["a", "d"], ["c", "b"])


def test_loss_at_init_with_margin(base):
  """Policy = reference: h = 0, so a pair costs log(1 + exp(Delta)) (log 2 without one)."""
  delta = 1.5
  batch = make_batch(base, weight=(1.0, 1.0, 1.0, 1.0), margin=(delta, 0.0, 0.0, delta))
  loss, _ = run(fresh_adapters(base), base, batch)  # beta 0.1; h = 0 whatever beta
  want = (2 * math.log1p(math.exp(delta)) + 2 * math.log(2.0)) / 4
  np.testing.assert_allclose(loss, want, rtol=1e-5)
