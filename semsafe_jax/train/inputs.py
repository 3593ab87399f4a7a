"""Tokenised, fixed-shape training rows: chat prompt + response target.

Every prompt is tokenised once on the host. A step's batch is then just a
gather of rows by index, so all steps share one shape and the jit-compiled
step compiles once.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def _chat_ids(tokenizer, prompt: str, response: str | None) -> list[int]:
  msgs = [{"role": "user", "content": prompt}]
  if response is None:
    out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
  else:
    msgs.append({"role": "assistant", "content": response})
    out = tokenizer.apply_chat_template(msgs, tokenize=True)
  if isinstance(out, dict) or hasattr(out, "input_ids"):  # BatchEncoding in some versions
    out = out["input_ids"]
  return list(out)


def encode_pair(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
  """(prompt ids incl. the generation prompt, response ids incl. the end-of-turn token)."""
  if getattr(tokenizer, "chat_template", None):
    p = _chat_ids(tokenizer, prompt, None)
    full = _chat_ids(tokenizer, prompt, response)
    if full[: len(p)] == p:
      # Drop whatever the template appends after the end-of-turn token (newlines).
      resp = full[len(p):]
      eos = set(eos_ids(tokenizer))
      cut = next((i + 1 for i, t in enumerate(resp) if t in eos), len(resp))
      return p, resp[:cut]
  p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
  r = tokenizer(response, add_special_tokens=False)["input_ids"]
  return list(p), list(r) + eos_ids(tokenizer)[:1]


def eos_ids(tokenizer) -> list[int]:
  """Token ids that end an assistant turn (the chat template's end-of-turn, then EOS)."""
  ids = []
  for tok in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
    i = tokenizer.convert_tokens_to_ids(tok)
    if isinstance(i, int) and i != tokenizer.unk_token_id and i >= 0:
      ids.append(i)
  if tokenizer.eos_token_id is not None:
    ids.append(tokenizer.eos_token_id)
  return ids


@dataclasses.dataclass
class Rows:
  """Right-padded rows [N, L]: prompt tokens then target tokens."""
  ids: np.ndarray  # int32 [N, L]
  mask: np.ndarray  # bool [N, L]
  target_mask: np.ndarray  # bool [N, L], True at response tokens
  prompt_end: np.ndarray  # int32 [N], index of the last prompt token
  truncated: int  # rows whose prompt start was dropped to fit L

  def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    return {"ids": self.ids[idx], "mask": self.mask[idx], "target_mask": self.target_mask[idx],
            "prompt_end": self.prompt_end[idx]}


def encode_rows(tokenizer, prompts: list[str], responses: list[str], max_len: int,
                max_response: int, multiple: int = 16) -> Rows:
  """Tokenises (prompt, response) pairs into fixed-shape rows.

  The prompt is never cut (the model must see the whole request); the
  response is cut to `max_response` tokens. L is the longest row rounded up
  to `multiple`, capped at `max_len`; rows longer than that keep the prompt's
  end and drop its start. No prompts give zero rows of length `multiple` (e.g. a
  data source without benign prompts: the batcher then says what is missing).
  """
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
  pairs = [encode_pair(tokenizer, p, r) for p, r in zip(prompts, responses)]
  pairs = [(p, r[:max_response]) for p, r in pairs]
  longest = max((len(p) + len(r) for p, r in pairs), default=1)
  L = min(max_len, -(-longest // multiple) * multiple)
  n = len(pairs)
  ids = np.full((n, L), tokenizer.pad_token_id or 0, np.int32)
  mask = np.zeros((n, L), bool)
  tmask = np.zeros((n, L), bool)
  pend = np.zeros((n,), np.int32)
  truncated = 0
  for i, (p, r) in enumerate(pairs):
    room = L - len(r)
    if len(p) > room:  # keep the end of the prompt (the request and the generation prompt)
      p = p[len(p) - room:]
      truncated += 1
    row = p + r
    ids[i, : len(row)] = row
    mask[i, : len(row)] = True
    tmask[i, len(p): len(row)] = True
    pend[i] = len(p) - 1
  return Rows(ids, mask, tmask, pend, truncated)
