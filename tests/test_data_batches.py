"""PairBatcher: static shapes, valid pairs over the global batch, a function of (seed, step)."""

import numpy as np
import pytest

from semsafe_jax.data import batches, neighbors
from semsafe_jax.data.batches import PairBatcher
from semsafe_jax.data.schema import DataError

TAU = 0.7


def unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
  """60 harmful intents x 5 close phrasings (rows 0..299), 100 benign rows (300..399)."""
  rng = np.random.default_rng(0)
  centres = unit(rng.standard_normal((60, 32)))
  harmful = unit(np.repeat(centres, 5, axis=0) + 0.45 * unit(rng.standard_normal((300, 32))))
  emb = np.concatenate([harmful, unit(rng.standard_normal((100, 32)))])
  labels = ["harmful"] * 300 + ["benign"] * 100
  nb, _ = neighbors.mine_neighbors(emb, 8, TAU, labels=labels)
  train = np.array([i for i in range(300) if i % 5 != 4 and i < 250])  # rest: held out
  return emb, nb, train, np.arange(300, 350)


def make(data, **kw):
  emb, nb, train, benign = data
  args = dict(harmful_per_step=16, benign_per_step=8, pairs_per_step=24, num_shards=1, seed=7)
  return PairBatcher(train, benign, nb, TAU, **{**args, **kw})


def test_shapes_are_static(data):
  batcher = make(data, num_shards=2)
  for step in range(20):
    b = batcher.batch(step)
    assert b.harmful_idx.shape == (16,) and b.harmful_idx.dtype == np.int32
    assert b.benign_idx.shape == (8,) and b.benign_idx.dtype == np.int32
    assert b.pair_index.shape == (24, 2) and b.pair_index.dtype == np.int32
    assert b.pair_weight.shape == (24,) and b.pair_weight.dtype == np.float32
    assert b.pair_valid.shape == (24,) and b.pair_valid.dtype == bool


def test_valid_pairs_are_in_batch_train_and_above_tau(data):
  emb, _, train, benign = data
  batcher = make(data)
  total_valid = 0
  for step in range(50):
    b = batcher.batch(step)
    assert set(b.harmful_idx) <= set(train) and set(b.benign_idx) <= set(benign)
    assert len(set(b.harmful_idx)) == len(b.harmful_idx)  # no repeats while the pool allows
    pos = b.pair_index[b.pair_valid]
    assert ((pos >= 0) & (pos < 16)).all()
    rows_a, rows_b = b.harmful_idx[pos[:, 0]], b.harmful_idx[pos[:, 1]]
    assert (rows_a != rows_b).all()
    cos = np.sum(emb[rows_a] * emb[rows_b], axis=1)
    assert (cos > TAU - 1e-5).all()
    np.testing.assert_allclose(b.pair_weight[b.pair_valid], cos, atol=1e-5)
    assert (b.pair_weight[~b.pair_valid] == 0).all()
    total_valid += len(pos)
  assert total_valid / 50 > 4  # the batches actually carry consistency pairs


def test_same_batch_after_resume(data):
  before = make(data, num_shards=2)
  expected = [before.batch(s) for s in range(10)]
  resumed = make(data, num_shards=2)  # a new process after a restart at step 5
  for s in range(5, 10):
    got = resumed.batch(s)
    for field in ("harmful_idx", "benign_idx", "pair_index", "pair_weight", "pair_valid"):
      np.testing.assert_array_equal(getattr(got, field), getattr(expected[s], field))
  it = resumed.batches(start_step=7)
  np.testing.assert_array_equal(next(it).harmful_idx, expected[7].harmful_idx)
  assert not np.array_equal(expected[0].harmful_idx, expected[1].harmful_idx)
  other_seed = make(data, num_shards=2, seed=8).batch(0)
  assert not np.array_equal(other_seed.harmful_idx, expected[0].harmful_idx)


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_batches_do_not_depend_on_num_shards(data, shards):
  """The device count only checks divisibility: pairs span the whole global batch."""
  one, many = make(data), make(data, num_shards=shards)
  crossing = 0
  for step in range(30):
    a, b = one.batch(step), many.batch(step)
    for field in ("harmful_idx", "benign_idx", "pair_index", "pair_weight", "pair_valid"):
      np.testing.assert_array_equal(getattr(b, field), getattr(a, field), err_msg=field)
    assert ((b.pair_index >= 0) & (b.pair_index < 16)).all()
    block = b.pair_index[b.pair_valid] // (16 // shards)  # the device holding each member
    crossing += int((block[:, 0] != block[:, 1]).sum())
  if shards == 8:  # 2 prompts per device, groups of up to 4: pairs must cross devices
    assert crossing > 0


def test_pairs_with_one_prompt_per_device(data):
  """8 harmful prompts over 8 devices: every pair crosses devices and none is lost."""
  batcher = make(data, harmful_per_step=8, benign_per_step=8, pairs_per_step=8, num_shards=8)
  stats = batcher.pair_stats(50)
  assert stats["pairs_valid_mean"] > 2 and stats["pairs_per_step"] == 8
  ref = make(data, harmful_per_step=8, benign_per_step=8, pairs_per_step=8).pair_stats(50)
  assert stats == ref


@pytest.mark.parametrize("kw, match", [
    (dict(harmful_per_step=18, num_shards=4), "harmful_per_step=18 must be a non-negative"),
    (dict(benign_per_step=6, num_shards=4), "benign_per_step=6"),
    (dict(harmful_per_step=4, num_shards=8), "harmful_per_step=4 must be a non-negative"),
    (dict(pairs_per_step=-1), "pairs_per_step=-1 must be >= 0"),
    (dict(num_shards=0), "num_shards=0"),
])
def test_divisibility_errors(data, kw, match):
  with pytest.raises(DataError, match=match):
    make(data, **kw)
  # The pair count is free: pair arrays are index data, not a block of prompts to split.
  assert make(data, pairs_per_step=10, num_shards=4).batch(0).pair_index.shape == (10, 2)


def test_few_pairs_message_names_the_fields():
  msg = batches.few_pairs_message(0.4, "the first 50 batches")
  assert "0.40 valid pairs" in msg and "the first 50 batches" in msg
  for field in batches.PAIR_FIELDS:
    assert f"config.{field}" in msg
  assert batches.few_pairs_message(1.0) is None and batches.few_pairs_message(None) is None


def test_no_pairs_still_gives_static_batches():
  rng = np.random.default_rng(1)
  emb = unit(rng.standard_normal((40, 64)))  # random: no pair above tau
  nb, _ = neighbors.mine_neighbors(emb, 4, TAU)
  b = PairBatcher(np.arange(30), np.arange(30, 40), nb, TAU, harmful_per_step=8,
                  benign_per_step=4, pairs_per_step=8).batch(0)
  assert b.pair_index.shape == (8, 2) and not b.pair_valid.any()


def test_higher_batch_tau_filters_pairs(data):
  emb, nb, train, benign = data
  b = PairBatcher(train, benign, nb, 0.85, harmful_per_step=16, benign_per_step=8,
                  pairs_per_step=24).batch(0)
  assert (b.pair_weight[b.pair_valid] > 0.85).all()


def test_pairable_anchor_frac_trades_pairs_for_coverage():
  rng = np.random.default_rng(2)
  centres = unit(rng.standard_normal((20, 64)))
  paired = unit(np.repeat(centres, 4, axis=0) + 0.4 * unit(rng.standard_normal((80, 64))))
  emb = np.concatenate([paired, unit(rng.standard_normal((240, 64)))])  # 3/4 have no neighbour
  nb, _ = neighbors.mine_neighbors(emb, 8, TAU)

  def stats(frac):
    batcher = PairBatcher(np.arange(300), np.arange(300, 320), nb, TAU, harmful_per_step=16,
                          benign_per_step=4, pairs_per_step=64, pairable_anchor_frac=frac)
    batches = [batcher.batch(s) for s in range(100)]
    pairs = np.mean([b.pair_valid.sum() for b in batches])
    return pairs, len(set(np.concatenate([b.harmful_idx for b in batches])))
  (pairs_0, seen_0), (pairs_1, seen_1) = stats(0.0), stats(1.0)
  assert pairs_1 > 1.5 * pairs_0
  assert seen_0 > 0.9 * 300 and seen_1 <= 80  # uniform anchors reach (nearly) every prompt
  with pytest.raises(DataError, match="pairable_anchor_frac"):
    PairBatcher(np.arange(300), np.arange(300, 320), nb, TAU, harmful_per_step=16,
                benign_per_step=4, pairs_per_step=64, pairable_anchor_frac=1.5)


# --- borderline_share -----------------------------------------------------------

BORDERLINE = np.arange(340, 360)  # overlaps the fixture's benign rows 300..349 on 340..349


def make_bord(data, share, borderline=BORDERLINE, **kw):
  return make(data, borderline_idx=borderline, borderline_share=share, **kw)


@pytest.mark.parametrize("share", [0.0, 0.3, 0.5, 0.6, 1.0])
def test_borderline_share_fixes_counts_per_batch(data, share):
  pure_benign = np.setdiff1d(data[3], BORDERLINE)  # overlap rows count as borderline only
  want = round(share * 8)
  batcher = make_bord(data, share, num_shards=2)
  for step in range(20):
    b = batcher.batch(step)
    assert b.benign_idx.shape == (8,) and b.benign_idx.dtype == np.int32
    is_bord = np.isin(b.benign_idx, BORDERLINE)
    assert is_bord.sum() == want, (step, b.benign_idx)
    assert np.isin(b.benign_idx[~is_bord], pure_benign).all()
    assert len(set(b.benign_idx)) == 8  # both pools are big enough: no repeats


def test_borderline_share_is_a_function_of_seed_and_step(data):
  a, b = make_bord(data, 0.5), make_bord(data, 0.5)
  for step in (0, 3, 11):
    np.testing.assert_array_equal(a.batch(step).benign_idx, b.batch(step).benign_idx)
  # Reverse order: no state carried between calls.
  np.testing.assert_array_equal(b.batch(3).benign_idx, a.batch(3).benign_idx)
  assert not np.array_equal(a.batch(0).benign_idx, a.batch(1).benign_idx)
  other = make_bord(data, 0.5, seed=8)
  assert not np.array_equal(other.batch(0).benign_idx, a.batch(0).benign_idx)


@pytest.mark.parametrize("share", [None, -1.0])
def test_borderline_share_off_draws_from_the_union(data, share):
  """None / negative: the old behaviour, benign and borderline rows drawn as one pool."""
  _, nb, train, benign = data
  # The pre-borderline_share batcher, fed the union as its benign rows.
  old = PairBatcher(train, np.union1d(benign, BORDERLINE), nb, TAU, harmful_per_step=16,
                    benign_per_step=8, pairs_per_step=24, seed=7)
  new = make_bord(data, share)
  seen = []
  for step in range(30):
    got = new.batch(step).benign_idx
    np.testing.assert_array_equal(got, old.batch(step).benign_idx)
    seen.append(got)
  seen = np.concatenate(seen)
  assert np.isin(seen, np.setdiff1d(BORDERLINE, benign)).any()  # borderline-only rows show up


def test_borderline_share_errors(data):
  with pytest.raises(DataError, match="borderline_share=1.5"):
    make_bord(data, 1.5)
  with pytest.raises(DataError, match="no training borderline"):
    make_bord(data, 0.5, borderline=())
  make_bord(data, 0.0, borderline=())  # share 0 needs no borderline rows
  _, nb, train, _ = data
  with pytest.raises(DataError, match="no training benign"):  # benign rows are all borderline
    PairBatcher(train, BORDERLINE, nb, TAU, harmful_per_step=16, benign_per_step=8,
                pairs_per_step=24, borderline_idx=BORDERLINE, borderline_share=0.5)
