"""Chat formatting and left-padded batch tokenisation for generation.

Prompts are rendered with the tokenizer's own chat template (so each model
family gets its native turn markers) and left-padded, so every row's last
prompt token sits in the same column and decoding appends in lock step.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# End-of-turn markers of the supported chat formats. Generation stops on
# whichever of these the vocabulary has, besides the tokenizer's own EOS.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<eos>", "<|eot_id|>",
                       "<|end_of_text|>", "</s>")


def has_chat_template(tokenizer: Any) -> bool:
  return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, prompt: str, *, system: str | None = None) -> str:
  """`prompt` as one user turn plus the assistant header; plain text without a template."""
  if not has_chat_template(tokenizer):
    return prompt
  messages = [{"role": "system", "content": system}] if system else []
  messages.append({"role": "user", "content": prompt})
  return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def format_prompts(tokenizer: Any, prompts: Sequence[str], *, chat: bool = True) -> list[str]:
  return [format_prompt(tokenizer, p) for p in prompts] if chat else list(prompts)


def encode(tokenizer: Any, texts: Sequence[str], *, chat: bool = True) -> list[list[int]]:
  """Token ids per text, unpadded.

  A rendered chat template already holds its special tokens (e.g. Gemma's
  <bos>), so they are only added to plain text.
  """
  add_special = not (chat and has_chat_template(tokenizer))
  return [list(ids) for ids in
          tokenizer(list(texts), add_special_tokens=add_special)["input_ids"]]


def encode_prefill(tokenizer: Any, prefill: str | Sequence[int] | None) -> list[int]:
  """Ids that open the assistant turn: a string is tokenised on its own (no special
  tokens), a sequence of ids is taken as it is (exact, e.g. a model's own first tokens)."""
  if prefill is None or (isinstance(prefill, str) and not prefill):
    return []
  if isinstance(prefill, str):
    return list(tokenizer(prefill, add_special_tokens=False)["input_ids"])
  return [int(t) for t in prefill]


def with_prefills(tokenizer: Any, ids: Sequence[Sequence[int]],
                  prefills: Sequence[str | Sequence[int] | None] | None) -> list[list[int]]:
  """Appends each row's assistant-turn prefill to its prompt ids (after the generation
  prompt), so decoding continues the prefilled answer."""
  if prefills is None:
    return [list(x) for x in ids]
  if len(prefills) != len(ids):
    raise ValueError(f"prefills: got {len(prefills)} for {len(ids)} prompts; pass one per prompt "
                     "(None or '' for no prefill).")
  return [list(x) + encode_prefill(tokenizer, p) for x, p in zip(ids, prefills)]


def pad_id(tokenizer: Any) -> int:
  """Any id works for padding (it is masked); prefer the tokenizer's own."""
  for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if tid is not None:
      return int(tid)
  return 0


def left_pad(ids: Sequence[Sequence[int]], *, length: int | None = None, rows: int | None = None,
             pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads id lists into (ids int32 [rows, length], mask bool [rows, length]).

  Extra rows (up to `rows`) are all padding: they let the last, partial batch
  reuse the compiled shape of the full ones.
  """
  longest = max((len(x) for x in ids), default=0)
  length = longest if length is None else length
  rows = len(ids) if rows is None else rows
  if longest > length or len(ids) > rows:
    raise ValueError(
        f"{len(ids)} sequences of up to {longest} tokens do not fit [{rows}, {length}].")
  ids_BxP = np.full((rows, length), pad, np.int32)
  mask_BxP = np.zeros((rows, length), bool)
  for i, x in enumerate(ids):
    if x:
      ids_BxP[i, length - len(x):] = x
      mask_BxP[i, length - len(x):] = True
  return ids_BxP, mask_BxP


def tokenize_batch(tokenizer: Any, prompts: Sequence[str], *, chat: bool = True,
                   length: int | None = None, rows: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Formats (chat template or plain) and tokenises prompts with LEFT padding."""
  texts = format_prompts(tokenizer, prompts, chat=chat)
  return left_pad(encode(tokenizer, texts, chat=chat), length=length, rows=rows,
                  pad=pad_id(tokenizer))


def stop_token_ids(tokenizer: Any, extra: Sequence[int] = ()) -> list[int]:
  """All ids that end a reply: the tokenizer's EOS plus known end-of-turn tokens."""
  ids = set(int(i) for i in extra)
  eos = tokenizer.eos_token_id
  if eos is not None:
    ids.update([int(eos)] if np.isscalar(eos) else (int(i) for i in eos))
  vocab = tokenizer.get_vocab()
  ids.update(int(vocab[t]) for t in _END_OF_TURN_TOKENS if t in vocab)
  return sorted(ids)
