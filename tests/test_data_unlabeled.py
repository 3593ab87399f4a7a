"""data/unlabeled.py: mining partners against the labelled training prompts, and sampling."""

import numpy as np

from semsafe_jax.data import unlabeled as U


def unit(*rows):
  x = np.asarray(rows, np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_mine_pool_pairs_same_side_and_drops_ambiguous():
  # rows 0,1 harmful train; 2 benign train; 3..6 unlabelled pool.
  emb = unit([1, 0, 0], [1, 0.1, 0], [0, 1, 0],
             [1, 0.05, 0],  # 3: near both harmful prompts
             [0.05, 1, 0],  # 4: near the benign one
             [1, 1, 0],  # 5: between harmful and benign at cos 0.71: ambiguous
             [0, 0, 1])  # 6: near nothing
  splits = {"train": np.array([0, 1]), "train_benign": np.array([2]),
            "train_unlabeled": np.array([3, 4, 5, 6])}
  texts = [f"t{i}" for i in range(7)]
  p, stats = U.mine_pool(texts, emb, splits, tau=0.7, k=3)
  got = sorted(zip(p.texts, p.anchor_rows.tolist(), p.anchor_harmful.tolist()))
  assert got == [("t3", 0, True), ("t3", 1, True), ("t4", 2, False)]
  assert stats == {"pool": 4, "tau": 0.7, "k": 3, "with_labelled_neighbour": 3,
                   "coverage": 0.75, "harmful_anchored": 1, "safe_anchored": 1,
                   "ambiguous_dropped": 1, "pairs": 3}
  i = p.texts.index("t4")
  np.testing.assert_allclose(p.weight[i], emb[4] @ emb[2], rtol=1e-6)
  assert set(p.kind) == {"pool"}


def test_sample_is_pure_balanced_and_padded():
  p = U.variants([0, 0, 1, 2], ["a", "b", "c", "d"], [0.9, 0.8, 0.85, 0.95], harmful_rows={0})
  idx, valid = U.sample(p, 4, 0.5, seed=1, step=3)
  idx2, valid2 = U.sample(p, 4, 0.5, seed=1, step=3)
  np.testing.assert_array_equal(idx, idx2)
  np.testing.assert_array_equal(valid, valid2)
  assert valid.tolist() == [True, True, True, True]
  assert p.anchor_harmful[idx[:2]].all() and not p.anchor_harmful[idx[2:]].any()
  # Three harmful-anchored entries wanted, two exist: one padding entry.
  idx, valid = U.sample(p, 4, 0.75, seed=1, step=3)
  assert valid.tolist() == [True, True, False, True]
  assert len({tuple(U.sample(p, 2, 0.5, seed=1, step=s)[0]) for s in range(8)}) > 1


def test_contrast_mine_pairs_harmful_with_safe_lookalikes():
  from semsafe_jax.data import contrast
  emb = unit([1, 0, 0], [0, 1, 0], [1, 0.3, 0], [0, 1, 0.2], [0, 0, 1])
  splits = {"train": np.array([0, 1]), "train_benign": np.array([2]),
            "train_lookalike": np.array([3]), "train_borderline": np.array([4])}
  pairs, stats = contrast.mine(emb, splits, tau=0.8, k=2)
  assert sorted(zip(pairs.harmful_rows.tolist(), pairs.safe_rows.tolist())) == [(0, 2), (1, 3)]
  assert stats["harmful_with_safe_neighbour"] == 2
  idx, valid = contrast.sample(pairs, 3, seed=0, step=0)
  assert valid.tolist() == [True, True, False] and sorted(idx[:2].tolist()) == [0, 1]
