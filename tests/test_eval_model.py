"""ModelUnderTest on the tiny random model: memoised generation, prefills, teacher-forced
log-probs and the KL between two models."""

import jax
import numpy as np
import pytest

from semsafe_jax.eval import base
from semsafe_jax.models import generate as gen_lib
from semsafe_jax.models import transformer
from semsafe_jax.models.loading import load_pretrained


@pytest.fixture(scope="module")
def tiny():
  """tiny-random's config and tokenizer with peaked random weights (varied tokens)."""
  pre = load_pretrained("tiny-random")
  return pre._replace(params=transformer.init_params(pre.cfg, jax.random.key(3), std=0.5))


def test_generation_memo_and_prefill_continue_greedy(tiny):
  params = tiny.params
  m = base.ModelUnderTest("m", params, tiny.cfg, tiny.tokenizer, batch_size=4)
  prompts = ["Tell me about the sea.", "What is 2 + 2?"]
  full = m.generate_full(prompts, 8)
  assert len(m._memo) == 2
  m.generate_full(prompts[::-1], 8)
  assert len(m._memo) == 2  # memoised
  k = 3
  cont = gen_lib.generate_batch(params, tiny.cfg, tiny.tokenizer, prompts, max_new_tokens=8 - k,
                                prefills=[ids[:k] for ids in full.token_ids], stop_ids=[-1])
  for ids, got in zip(full.token_ids, cont.token_ids):
    if len(ids) == 8:  # neither row ended early
      assert got == ids[k:]
  with pytest.raises(ValueError, match="prefills"):
    m.generate(prompts, 8, prefills=["x"])


def test_answer_logprobs_match_a_plain_forward(tiny):
  params = transformer.init_params(tiny.cfg, jax.random.key(4), std=0.1)
  m = base.ModelUnderTest("m", params, tiny.cfg, tiny.tokenizer, batch_size=4)
  prompts, responses = ["Hi there", "What is the capital of France?"], ["Hello!", "Paris."]
  got = m.answer_logprobs(prompts, responses)
  forward = jax.jit(lambda p, ids: transformer.forward(p, tiny.cfg, ids).logits)
  for p, r, lp in zip(prompts, responses, got):
    p_ids = tiny.tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                               add_generation_prompt=True, tokenize=False)
    p_ids = tiny.tokenizer(p_ids, add_special_tokens=False)["input_ids"]
    r_ids = tiny.tokenizer(r, add_special_tokens=False)["input_ids"]
    logits = forward(params, np.asarray([p_ids + r_ids]))[0]
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    want = [logp[len(p_ids) - 1 + j, t] for j, t in enumerate(r_ids)]
    np.testing.assert_allclose(lp, want, atol=1e-4)
  other = base.ModelUnderTest("o", jax.tree.map(lambda x: x * 1.1, params), tiny.cfg,
                              tiny.tokenizer)
  kl = base.answer_token_kl(m, other, prompts, responses)
  assert all(len(k) == len(tiny.tokenizer(r, add_special_tokens=False)["input_ids"]) and
             (k > 0).all() for k, r in zip(kl, responses))
  same = base.ModelUnderTest("s", params, tiny.cfg, tiny.tokenizer)
  assert max(float(np.abs(k).max()) for k in base.answer_token_kl(m, same, prompts, responses)
             ) < 1e-4
