"""train/packing.py: packed prompt rows give each prompt its own row's hidden states."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, V
from semsafe_jax.models import transformer
from semsafe_jax.train import packing

GEMMA = dict(family="gemma3", norm_offset=1.0, qk_norm=True, sandwich_norm=True,
             act="gelu_tanh", embed_scale=4.0, sliding_window=3, layer_is_sliding=(True, False),
             rope_local_theta=1e4)


def prompts(lengths, L, seed=0):
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), L), np.int32)
  mask = np.zeros((len(lengths), L), bool)
  for u, n in enumerate(lengths):
    ids[u, :n] = rng.integers(3, V, n)
    mask[u, :n] = True
  return ids, mask


def test_first_fit_decreasing_places_every_prompt_once_within_the_width():
  lengths = [7, 3, 9, 2, 5, 5, 1, 8]
  rows = packing.first_fit_decreasing(lengths, 10)
  assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
  assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
  assert rows == [[2, 6], [7, 3], [0, 1], [4, 5]]  # 9+1, 8+2, 7+3, 5+5: four full rows
  assert rows == packing.first_fit_decreasing(lengths, 10)  # deterministic
  with pytest.raises(ValueError, match="does not fit"):
    packing.first_fit_decreasing([11], 10)


def test_pack_unpack_round_trip_and_the_planned_rows():
  ids, mask = prompts([5, 2, 7, 4, 3], 8)
  p = packing.pack(ids, mask, rows=3, width=8)
  assert p.ids.shape == (3, 8) and int(p.mask.sum()) == int(mask.sum())
  back = np.asarray(packing.unpack(jnp.asarray(p.ids)[..., None], p.unpack))[..., 0]
  np.testing.assert_array_equal(np.where(mask, back, 0), ids)
  # Positions restart per prompt; segments number the prompts within a row.
  got_pos = np.asarray(packing.unpack(jnp.asarray(p.positions)[..., None], p.unpack))[..., 0]
  np.testing.assert_array_equal(np.where(mask, got_pos, 0), np.where(mask, np.arange(8), 0))
  with pytest.raises(ValueError, match="more than the 2 planned"):
    packing.pack(ids, mask, rows=2, width=8)
  steps = {0: [5, 2, 7], 1: [8, 8, 1]}
  assert packing.rows_for_run(lambda s: np.asarray(steps[s]), 2, 8) == 3


def test_plan_covers_the_fullest_step_and_only_packs_when_it_saves_tokens():
  steps = {0: [5, 2, 7, 4], 1: [8, 8, 1, 3]}  # 4 rows of 12 per step unpacked: 48 tokens
  of = lambda s: np.asarray(steps[s])
  assert packing.plan(of, 1, 10, plain_tokens=48) == packing.Plan(rows=2, width=10)
  assert packing.plan(of, 2, 10, plain_tokens=48) == packing.Plan(rows=3, width=10)
  # Rounded up to the batch shards; not packed once that reaches the unpacked count.
  assert packing.plan(of, 2, 10, plain_tokens=48, shards=2) == packing.Plan(rows=4, width=10)
  assert packing.plan(of, 2, 10, plain_tokens=40, shards=2) is None
  # Widened to the run's longest row; width or steps 0 turn packing off.
  assert packing.plan(of, 2, 4, plain_tokens=48) == packing.Plan(rows=3, width=8)
  assert packing.plan(of, 2, 0, plain_tokens=48) is None
  assert packing.plan(of, 0, 10, plain_tokens=48) is None


@pytest.mark.parametrize("family_kw", [{}, GEMMA], ids=["llama", "gemma3-sliding"])
@pytest.mark.parametrize("remat", ["off", "full"])
def test_packed_forward_equals_each_prompt_in_its_own_row(base, family_kw, remat):
  cfg = TINY.replace(**family_kw, remat=remat)
  params = base if not family_kw else transformer.init_params(cfg, jax.random.key(3))
  ids, mask = prompts([6, 2, 9, 4, 3, 7], 10, seed=1)
  want = transformer.forward(params, cfg, ids, attention_mask_BxS=mask,
                             output_hidden_states=True, compute_logits=False)
  p = packing.pack(ids, mask, rows=3, width=12)
  out = transformer.forward(params, cfg, p.ids, attention_mask_BxS=p.mask,
                            segment_ids_BxT=p.segment_ids, positions_BxT=p.positions,
                            output_hidden_states=True, compute_logits=False)
  got = packing.unpack(out.hidden, p.unpack)
  m = mask[..., None]
  np.testing.assert_allclose(np.where(m, got, 0), np.where(m, want.hidden, 0), atol=2e-5)
  states = jax.vmap(packing.unpack, in_axes=(0, None))(out.hidden_states, p.unpack)
  np.testing.assert_allclose(np.where(m, states, 0), np.where(m, want.hidden_states, 0),
                             atol=2e-5)


def test_segments_need_no_cache():
  ids, mask = prompts([3], 4)
  with pytest.raises(ValueError, match="segment_ids"):
    transformer.forward(transformer.init_params(TINY, jax.random.key(0)), TINY, ids,
                        attention_mask_BxS=mask, segment_ids_BxT=np.ones_like(ids),
                        cache=transformer.init_cache(TINY, 1, 8))
