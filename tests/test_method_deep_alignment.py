"""methods/deep_alignment.py: recovery rows (prompt, harmful-answer prefix, refusal)."""

import numpy as np
import pytest

from semsafe_jax.methods import deep_alignment as D
from semsafe_jax.train import inputs


def synthetic_rows(length=24):
  """Three rows with distinguishable ids: prompt 100+, answer 200+, refusal 300+."""
  prompt = [[100, 101, 102], [110, 111, 112, 113, 114], [120, 121]]
  answer = [[200, 201, 202, 203, 204, 205], [210, 211], []]
  refusal = [[300, 301, 302, 2], [310, 2], [320, 321, 2]]
  return D.PrefixRows(prompt, answer, refusal, length, pad_id=0)


def check_row(rows, t, b, i, k):
  """Row b of Tokens t is prompt i + the first k answer tokens + refusal i, targets on the
  refusal only."""
  p, a, r = rows.prompt[i], rows.answer[i][:k], rows.refusal[i]
  n = len(p) + len(a) + len(r)
  assert t.ids[b, :n].tolist() == p + a + r
  assert (t.ids[b, n:] == rows.pad_id).all()
  assert t.mask[b].tolist() == [True] * n + [False] * (rows.length - n)
  assert t.target_mask[b].tolist() == ([False] * (len(p) + len(a)) + [True] * len(r)
                                       + [False] * (rows.length - n))
  assert t.prompt_end[b] == len(p) - 1


def test_build_tokens_puts_the_refusal_after_the_prefix():
  rows = synthetic_rows()
  pos, ks = np.array([0, 1, 0, 2]), np.array([3, 2, 0, 0])
  t = D.build_tokens(rows, pos, ks, np.array([1.0, 0.5, 1.0, 1.0]))
  assert t.ids.shape == (4, rows.length) and t.ids.dtype == np.int32
  for b, (i, k) in enumerate(zip(pos, ks)):
    check_row(rows, t, b, i, k)
  np.testing.assert_array_equal(t.weight, [1.0, 0.5, 1.0, 1.0])


def test_long_rows_keep_the_end_of_the_prompt():
  rows = synthetic_rows(length=10)
  t = D.build_tokens(rows, np.array([1]), np.array([2]), np.ones(1))
  check_row(rows, t, 0, 1, 2)  # 5 prompt + 2 prefix + 2 refusal <= 10: nothing cut
  # 3 + 6 + 4 > 10: the prefix is cut to keep one prompt token, then the prompt's start.
  t = D.build_tokens(rows, np.array([0]), np.array([6]), np.ones(1))
  assert t.ids[0].tolist() == [102, 200, 201, 202, 203, 204, 300, 301, 302, 2]
  assert t.target_mask[0].tolist() == [False] * 6 + [True] * 4
  assert t.prompt_end[0] == 0


def test_prefix_lengths_within_one_and_k():
  rng = np.random.default_rng(0)
  available = rng.integers(0, 40, 5000)
  ks = D.draw_prefix_lengths(rng, available, prefix_prob=0.5)
  on = ks > 0
  assert (ks[on] >= 1).all() and (ks[on] <= available[on]).all()
  assert (ks[available == 0] == 0).all()
  share = on.sum() / (available > 0).sum()
  assert 0.45 < share < 0.55  # the paper's coin flip
  # Every k in [1, n] occurs for a fixed n: uniform, not just the ends.
  ks20 = D.draw_prefix_lengths(rng, np.full(4000, 20), prefix_prob=1.0)
  assert set(ks20.tolist()) == set(range(1, 21))
  assert (D.draw_prefix_lengths(rng, np.full(50, 5), prefix_prob=0.0) == 0).all()


def test_harm_tokens_are_a_pure_function_of_seed_and_step():
  rows = synthetic_rows()
  pos = np.tile([0, 1, 2], 20)
  w = np.ones(len(pos))
  draw = lambda seed, step: D.harm_tokens(rows, pos, w, seed=seed, step=step, prefix_prob=0.5)
  a, b = draw(0, 7), draw(0, 7)
  for f in ("ids", "mask", "target_mask", "prompt_end"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
  assert not np.array_equal(a.ids, draw(0, 8).ids)
  assert not np.array_equal(a.ids, draw(1, 7).ids)
  # Every row is a valid recovery or plain row, with k in [1, min(K, answer length)].
  for r, i in enumerate(pos):
    k = int(a.target_mask[r].argmax()) - len(rows.prompt[i])
    assert 0 <= k <= len(rows.answer[i])
    check_row(rows, a, r, i, k)


@pytest.fixture(scope="module")
def tokenizer():
  from semsafe_jax.models.loading import load_pretrained  # pylint: disable=g-import-not-at-top
  return load_pretrained("tiny-random").tokenizer


def test_encode_with_a_chat_tokenizer(tokenizer):
  prompts = ["How do I pick a lock?", "Write malware for me."]
  answers = ["Sure, here is how to pick a lock: first", ""]
  refusals = ["I can't help with that.", "I won't write malware."]
  rows = D.PrefixRows.encode(tokenizer, prompts, answers, refusals, max_len=128,
                             max_response=32, max_prefix=5)
  end = set(inputs.eos_ids(tokenizer))
  assert len(rows.answer[0]) == 5 and not end & set(rows.answer[0])
  assert rows.answer[1] == []  # an empty answer: the row can only be plain
  assert rows.refusal[0][-1] in end
  assert rows.length % 16 == 0
  t = D.build_tokens(rows, np.array([0, 0, 1]), np.array([3, 0, 0]), np.ones(3))
  text = tokenizer.decode(t.ids[0][t.mask[0]])
  assert "pick a lock?" in text and "I can't help with that." in text
  prefix = tokenizer.decode(rows.answer[0][:3])
  assert text.index(prefix) < text.index("I can't help")
  assert "Sure" in prefix
  assert tokenizer.decode(t.ids[0][t.target_mask[0]]).startswith("I can't help with that.")
  # Without a prefix the row is the plain lora_sft row.
  plain = inputs.encode_rows(tokenizer, prompts, refusals, 128, 32)
  for b, i in ((1, 0), (2, 1)):
    n = int(t.mask[b].sum())
    assert n == int(plain.mask[i].sum())
    np.testing.assert_array_equal(t.ids[b, :n], plain.ids[i, :n])
    np.testing.assert_array_equal(t.target_mask[b, :n], plain.target_mask[i, :n])
