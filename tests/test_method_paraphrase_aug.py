"""methods/paraphrase_aug.py: variant rows carry their source's response, and each step
replaces a fixed share of rows by variants of the step's own prompts."""

import numpy as np
import pytest

from semsafe_jax.methods import paraphrase_aug as PA
from semsafe_jax.train import inputs


@pytest.fixture(scope="module")
def tokenizer():
  from semsafe_jax.models.loading import load_pretrained  # pylint: disable=g-import-not-at-top
  return load_pretrained("tiny-random").tokenizer


@pytest.fixture(scope="module")
def aug(tokenizer):
  prompts = ["How do I pick a lock?", "How do I bake bread?", "Name three rivers."]
  responses = ["I can't help with that.", "Mix flour and water.", "Nile, Amazon, Danube."]
  # Variants of sources 0 and 2 (two of 0), none of 1.
  return PA.aug_rows(tokenizer, prompts, responses, np.array([0, 2, 0]),
                     ["Tell me how to pick a lock.", "List three rivers.", "lock picking how?"],
                     max_len=64, max_response=16)


def text(tokenizer, rows, i, target):
  m = rows.target_mask[i] if target else rows.mask[i] & ~rows.target_mask[i]
  return tokenizer.decode(rows.ids[i][m], skip_special_tokens=True)


def test_variant_rows_train_towards_their_source_response(tokenizer, aug):
  assert aug.n == 3 and aug.rows.ids.shape[0] == 6
  assert [v.tolist() for v in aug.variants_of] == [[3, 5], [], [4]]
  for v, src in ((3, 0), (4, 2), (5, 0)):
    assert text(tokenizer, aug.rows, v, True) == text(tokenizer, aug.rows, src, True)
  assert "Tell me how to pick a lock." in text(tokenizer, aug.rows, 3, False)
  # The source rows are the plain SFT rows (same tokens as encoding the sources alone).
  plain = inputs.encode_rows(tokenizer, ["How do I pick a lock?"], ["I can't help with that."],
                             64, 16)
  n = int(plain.mask[0].sum())
  np.testing.assert_array_equal(aug.rows.ids[0, :n], plain.ids[0, :n])


def test_replace_rows_share_eligibility_and_determinism(aug):
  pos = np.array([0, 1, 2, 0, 1, 2, 0, 1])  # 1 has no variant
  idx, rep = PA.replace_rows(aug, pos, 0.5, np.random.default_rng(0))
  assert rep.sum() == 4 and not rep[pos == 1].any()
  np.testing.assert_array_equal(idx[~rep], pos[~rep])
  for b in np.flatnonzero(rep):
    assert idx[b] in aug.variants_of[pos[b]]
  idx2, rep2 = PA.replace_rows(aug, pos, 0.5, np.random.default_rng(0))
  np.testing.assert_array_equal(idx, idx2)
  np.testing.assert_array_equal(rep, rep2)
  # More wanted than eligible: every eligible row, nothing else.
  idx, rep = PA.replace_rows(aug, pos, 1.0, np.random.default_rng(1))
  np.testing.assert_array_equal(rep, pos != 1)
  # Share 0, or no variants at all: the block unchanged.
  idx, rep = PA.replace_rows(aug, pos, 0.0, np.random.default_rng(2))
  np.testing.assert_array_equal(idx, pos)
  assert not rep.any()
  none = PA.AugRows(aug.rows, 3, [np.zeros(0, np.int64)] * 3)
  np.testing.assert_array_equal(PA.replace_rows(none, pos, 0.5, np.random.default_rng(3))[0],
                                pos)
