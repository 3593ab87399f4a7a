"""deep_alignment: LoRA SFT with safety-recovery examples (Qi et al., 2024, "Safety
Alignment Should Be Made More Than Just a Few Tokens Deep").

Each step, every harmful row is, with probability method.prefix_prob (the paper: 0.5), a
recovery example: the prompt, then the first k tokens of the base model's own harmful
answer (ctx.harmful_answers), then the refusal target, with k uniform in
[1, min(K, answer length)], K = method.max_prefix_tokens (the paper: 100). The prefix is
context only: the loss reads the refusal tokens after it, so the model learns to stop
and refuse mid-answer instead of only in its first tokens. Other harmful rows are the
plain prompt + refusal rows of lora_sft. The loss is lora_sft's (one token mean of
cross-entropy over the refusals and the benign/borderline base answers).

The draws are a pure function of (seed, step), so a resumed run replays the same rows.
Every row has one length L, fixed at preparation (the longest prompt + K-token prefix +
refusal), so the step compiles once.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from semsafe_jax.methods import lora_sft
from semsafe_jax.methods.base import Pairs, Prepared, SafetyBatch, Tokens
from semsafe_jax.train import inputs


@dataclasses.dataclass(frozen=True)
class PrefixRows:
  """Token ids of every harmful training row, before any prefix is drawn."""
  prompt: list[list[int]]  # chat prompt incl. the generation prompt
  answer: list[list[int]]  # the base model's harmful answer: no end-of-turn, <= K tokens
  refusal: list[list[int]]  # the refusal target incl. end-of-turn, <= max_response tokens
  length: int  # L of every built row
  pad_id: int

  @classmethod
  def encode(cls, tokenizer, prompts: Sequence[str], answers: Sequence[str],
             refusals: Sequence[str], *, max_len: int, max_response: int, max_prefix: int,
             multiple: int = 16) -> "PrefixRows":
    if not len(prompts) == len(answers) == len(refusals):
      raise ValueError(f"{len(prompts)} prompts, {len(answers)} answers and {len(refusals)} "
                       "refusals: expected one of each per harmful row")
    # The answer tokens as they sit in the chat (the prefix is cut from them), minus the
    # end-of-turn: a prefix never ends the turn.
    end = set(inputs.eos_ids(tokenizer))
    prompt, answer, refusal = [], [], []
    for p, a, r in zip(prompts, answers, refusals):
      p_ids, r_ids = inputs.encode_pair(tokenizer, p, r)
      a_ids = inputs.encode_pair(tokenizer, p, a)[1]
      while a_ids and a_ids[-1] in end:
        a_ids = a_ids[:-1]
      prompt.append(p_ids)
      answer.append(a_ids[:max_prefix])
      refusal.append(r_ids[:max_response])
    longest = max((len(p) + len(a) + len(r) for p, a, r in zip(prompt, answer, refusal)),
                  default=1)
    length = min(max_len, -(-longest // multiple) * multiple)
    return cls(prompt, answer, refusal, length, tokenizer.pad_token_id or 0)


def draw_prefix_lengths(rng: np.random.Generator, available: np.ndarray, prefix_prob: float
                        ) -> np.ndarray:
  """[B] prefix lengths: 0 (a plain row), or, with probability prefix_prob, uniform in
  [1, available] (rows with no answer tokens stay plain)."""
  available = np.asarray(available, np.int64)
  toss = rng.random(len(available)) < prefix_prob
  k = rng.integers(1, np.maximum(available, 1) + 1)
  return np.where(toss & (available > 0), k, 0)


def build_tokens(rows: PrefixRows, pos: np.ndarray, ks: np.ndarray,
                 weight: np.ndarray) -> Tokens:
  """Rows pos with the first ks answer tokens between prompt and refusal.

  target_mask is True on the refusal only; prompt_end is the last prompt token (the
  prefix sits between it and the first target). A row longer than L keeps the end of
  its prompt, as inputs.encode_rows does.
  """
  B, L = len(pos), rows.length
  ids = np.full((B, L), rows.pad_id, np.int32)
  mask = np.zeros((B, L), bool)
  tmask = np.zeros((B, L), bool)
  pend = np.zeros((B,), np.int32)
  for b, (i, k) in enumerate(zip(np.asarray(pos), np.asarray(ks))):
    r = rows.refusal[i]
    a = rows.answer[i][:max(0, min(int(k), L - len(r) - 1))]
    p = rows.prompt[i]
    room = L - len(a) - len(r)
    if len(p) > room:
      p = p[len(p) - room:]
    row = p + a + r
    ids[b, :len(row)] = row
    mask[b, :len(row)] = True
    tmask[b, len(p) + len(a):len(row)] = True
    pend[b] = len(p) - 1
  return Tokens(ids=ids, mask=mask, target_mask=tmask, prompt_end=pend,
                weight=np.asarray(weight, np.float32))


def harm_tokens(rows: PrefixRows, pos: np.ndarray, weight: np.ndarray, *, seed: int, step: int,
                prefix_prob: float) -> Tokens:
  """The step's harmful rows: prefixes drawn from (seed, step) alone."""
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step)])
  available = np.array([len(rows.answer[i]) for i in np.asarray(pos)], np.int64)
  return build_tokens(rows, pos, draw_prefix_lengths(rng, available, prefix_prob), weight)


def prepare(ctx) -> Prepared:
  config, dc, mc = ctx.config, ctx.config.data, ctx.config.method
  max_prefix, prefix_prob = int(mc.max_prefix_tokens), float(mc.prefix_prob)
  if max_prefix < 1:
    raise ValueError(f"method.max_prefix_tokens={max_prefix}; expected >= 1")
  if not 0.0 <= prefix_prob <= 1.0:
    raise ValueError(f"method.prefix_prob={prefix_prob}; expected a probability in [0, 1]")
  sft = ctx.sft
  rows = PrefixRows.encode(ctx.tokenizer, ctx.data.texts(sft.harm_rows), ctx.harmful_answers,
                           sft.harm_targets, max_len=dc.max_len,
                           max_response=dc.max_response_tokens, max_prefix=max_prefix)
  seed = int(config.seed)

  def batch_fn(step: int) -> SafetyBatch:
    b, hi, bi = ctx.batch_rows(step)
    return SafetyBatch(
        harm=harm_tokens(rows, hi, sft.harm_weight[hi], seed=seed, step=step,
                         prefix_prob=prefix_prob),
        benign=Tokens.take(sft.benign, bi),
        pairs=Pairs(index=b.pair_index, weight=np.asarray(b.pair_weight, np.float32),
                    valid=b.pair_valid))

  answer_tokens = np.array([len(a) for a in rows.answer])
  report = {"prefix_prob": prefix_prob, "max_prefix_tokens": max_prefix,
            "harmful_answers": len(rows.answer),
            "harmful_answers_empty": int((answer_tokens == 0).sum()),
            "answer_tokens_mean": float(answer_tokens.mean()) if len(answer_tokens) else 0.0,
            "row_length": rows.length}
  return dataclasses.replace(lora_sft.sft_prepared(ctx, ctx.init_trainable()),
                             batch_fn=batch_fn, report=report)
