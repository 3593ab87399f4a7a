"""Batched text generation with a KV cache, compiled once per shape.

Prefill and the whole decode loop run inside ONE jit call: the left-padded
prompt batch fills the cache, then a `jax.lax.while_loop` appends one token
per step and exits as soon as every row has produced an end token. Shapes
are bucketed (prompt length up to a bucket, the last batch padded to the
batch size), so a run compiles once per (batch size, prompt bucket,
max_new_tokens, sampling settings), never per batch or per token.

Sampling: temperature 0 is greedy; otherwise temperature, then top-k, then
top-p (nucleus) filtering, with a seeded key folded per batch and per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from semsafe_jax import malloc
from semsafe_jax.models import chat as chat_lib
from semsafe_jax.models import transformer
from semsafe_jax.models.config import ModelConfig

Params = dict[str, Any]
EmbedFn = Callable[[Params, ModelConfig, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Static (hashable) sampling settings; part of the compilation key."""
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off


class Generation(NamedTuple):
  texts: list[str]  # new text per prompt, special tokens stripped, cut at stop strings
  token_ids: list[list[int]]  # new ids per prompt, up to and excluding the end token
  finished: list[bool]  # whether the row produced an end token


def prompt_bucket(n: int, minimum: int = 32) -> int:
  """Padded prompt length: powers of two up to 1024, then multiples of 1024."""
  if n <= 1024:
    return max(minimum, 1 << max(0, n - 1).bit_length())
  return -(-n // 1024) * 1024


def batch_rows(n_prompts: int, batch_size: int) -> int:
  """Rows per compiled batch: few prompts get a small power-of-two batch."""
  return min(batch_size, 1 << max(0, n_prompts - 1).bit_length())


def _rows_within(rows: int, tokens_per_row: int, max_batch_tokens: int) -> int:
  """rows, halved until rows x tokens_per_row fits max_batch_tokens (0 = no cap; >= 1 row).

  The KV cache and the prefill's activations grow with rows x (prompt + new tokens): long
  prompts (jailbreak templates) take fewer rows, so that one batch's memory stays bounded.
  """
  while max_batch_tokens and rows > 1 and rows * tokens_per_row > max_batch_tokens:
    rows //= 2
  return rows


def _sample(logits_BxV: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
  if s.temperature <= 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV / s.temperature
  if s.top_k > 0:
    kth_Bx1 = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth_Bx1, -jnp.inf, logits)
  if s.top_p < 1.0:
    sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token always).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < s.top_p
    cutoff_Bx1 = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff_Bx1, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class DecodeTrace(NamedTuple):
  """One trace of `decode`, i.e. one compilation, and what jit keyed it on."""
  rows: int
  prompt_len: int
  max_new_tokens: int
  sampling: Sampling
  model: tuple  # embed function, cfg, structure, dtypes and shapes of the weights
  stop_ids: int  # how many end-token ids


_TRACES: list[DecodeTrace] = []


def traces() -> list[DecodeTrace]:
  """Every trace of `decode` in this process so far, in order. Two equal ones would be a
  recompilation of a shape bucket already compiled (e.g. an argument whose dtype or weak
  type changed between calls, or an embed function made afresh for each call)."""
  return list(_TRACES)


def _record_trace(params, embed_fn, ids_BxP, stop_ids_E, cfg, max_new_tokens, sampling) -> None:
  fn = getattr(embed_fn, "func", embed_fn)
  name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
  model = (name, cfg, str(jax.tree.structure(params)),
           tuple(str(jax.typeof(x)) for x in jax.tree.leaves((params, embed_fn))))
  B, P = ids_BxP.shape
  _TRACES.append(DecodeTrace(B, P, max_new_tokens, sampling, model, stop_ids_E.shape[0]))


def _decode(params: Params, embed_fn: jax.tree_util.Partial, ids_BxP: jax.Array,
            mask_BxP: jax.Array, stop_ids_E: jax.Array, key: jax.Array, pad: jax.Array, *,
            cfg: ModelConfig, max_new_tokens: int, sampling: Sampling
            ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Prefill + decode loop.

  Returns (tokens [B, N], lengths [B], finished [B], steps): lengths count
  produced tokens including the end token, which only finished rows have;
  steps is how many tokens the loop ran for (< N when all rows ended early).
  """
  # Python side effect: runs once per trace (= compile), never per call.
  _record_trace(params, embed_fn, ids_BxP, stop_ids_E, cfg, max_new_tokens, sampling)
  B, P = ids_BxP.shape
  N = max_new_tokens
  mask_BxS = jnp.concatenate([mask_BxP, jnp.zeros((B, N), bool)], axis=1)
  cache = transformer.init_cache(cfg, B, P + N)
  # Per-layer arrays: sliced once, not once per token.
  if transformer.unrolls_layers(cfg, differentiated=False):
    params = transformer.unstack_layers(params, cfg.num_layers)
    cache = transformer.unstack_cache(cache, cfg.num_layers)
  out = transformer.forward(params, cfg, inputs_embeds_BxTxD=embed_fn(params, cfg, ids_BxP),
                            attention_mask_BxS=mask_BxS, cache=cache, cache_index=0,
                            compute_logits=False)
  # Left padding puts every row's last prompt token in column P-1: only its
  # logits are needed, which skips a [B, P, V] projection.
  logits_BxV = transformer.lm_head(params, cfg, out.hidden[:, -1:])[:, 0]
  cache = out.cache
  next_pos_B = jnp.sum(mask_BxP, axis=1).astype(jnp.int32)
  is_stop = lambda t_B: jnp.any(t_B[:, None] == stop_ids_E[None, :], axis=1)

  tok_B = _sample(logits_BxV, jax.random.fold_in(key, 0), sampling)
  empty_B = next_pos_B == 0  # all-padding rows fill the last, partial batch
  tok_B = jnp.where(empty_B, pad, tok_B)
  tokens_BxN = jnp.full((B, N), pad, jnp.int32).at[:, 0].set(tok_B)
  done_B = empty_B | is_stop(tok_B)
  lengths_B = jnp.where(empty_B, 0, 1).astype(jnp.int32)

  def cond(state):
    step, _, _, _, _, done_B, _ = state
    return (step < N) & ~jnp.all(done_B)

  def body(state):
    step, cache, mask_BxS, tokens_BxN, lengths_B, done_B, pos_B = state
    slot = P + step - 1  # the previous token's cache slot
    prev_B = jax.lax.dynamic_index_in_dim(tokens_BxN, step - 1, axis=1, keepdims=False)
    mask_BxS = jax.lax.dynamic_update_slice_in_dim(mask_BxS, jnp.ones((B, 1), bool), slot, 1)
    x_Bx1xD = embed_fn(params, cfg, prev_B[:, None])
    out = transformer.forward(params, cfg, inputs_embeds_BxTxD=x_Bx1xD,
                              attention_mask_BxS=mask_BxS, positions_BxT=pos_B[:, None],
                              cache=cache, cache_index=slot, compute_logits=False)
    logits_BxV = transformer.lm_head(params, cfg, out.hidden)[:, 0]
    tok_B = _sample(logits_BxV, jax.random.fold_in(key, step), sampling)
    tok_B = jnp.where(done_B, pad, tok_B)  # finished rows emit padding only
    tokens_BxN = jax.lax.dynamic_update_slice_in_dim(tokens_BxN, tok_B[:, None], step, 1)
    lengths_B = lengths_B + (~done_B).astype(jnp.int32)
    done_B = done_B | is_stop(tok_B)
    return step + 1, out.cache, mask_BxS, tokens_BxN, lengths_B, done_B, pos_B + 1

  state = (jnp.int32(1), cache, mask_BxS, tokens_BxN, lengths_B, done_B, next_pos_B)
  steps, _, _, tokens_BxN, lengths_B, done_B, _ = jax.lax.while_loop(cond, body, state)
  return tokens_BxN, lengths_B, done_B & ~empty_B, steps


# One jitted function for the process: its cache keys on the shapes plus the
# static args, so repeated `generate` calls with the same settings reuse it.
decode = jax.jit(_decode, static_argnames=("cfg", "max_new_tokens", "sampling"))


def as_embed_partial(embed_fn: EmbedFn | None) -> jax.tree_util.Partial:
  """Wraps embed_fn as a pytree, so arrays it carries are traced arguments.

  A `jax.tree_util.Partial` passes through jit with its bound arrays as
  inputs (no recompilation when they change, nothing baked into the
  executable); a plain function is keyed by identity.
  """
  fn = transformer.embed if embed_fn is None else embed_fn
  return fn if isinstance(fn, jax.tree_util.Partial) else jax.tree_util.Partial(fn)


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
  cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=-1)
  return (text[:cut], True) if cut >= 0 else (text, False)


def generate_batch(params: Params, cfg: ModelConfig, tokenizer: Any, prompts: Sequence[str], *,
                   max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
                   stop_strings: Sequence[str] = (), chat: bool = True,
                   embed_fn: EmbedFn | None = None, stop_ids: Sequence[int] | None = None,
                   prefills: Sequence[str | Sequence[int] | None] | None = None,
                   max_batch_tokens: int = 0) -> Generation:
  """Like `generate`, but also returns token ids and finished flags per prompt."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  if not prompts:
    return Generation([], [], [])
  sampling = Sampling(float(temperature), int(top_k), float(top_p))
  texts = chat_lib.format_prompts(tokenizer, prompts, chat=chat)
  ids = chat_lib.with_prefills(tokenizer, chat_lib.encode(tokenizer, texts, chat=chat), prefills)
  pad = chat_lib.pad_id(tokenizer)
  stop_E = np.asarray(chat_lib.stop_token_ids(tokenizer) if stop_ids is None else stop_ids,
                      np.int32).reshape(-1)
  if stop_E.size == 0:  # keep a static, non-empty shape; -1 never matches
    stop_E = np.full((1,), -1, np.int32)
  embed = as_embed_partial(embed_fn)
  rows = batch_rows(len(prompts), batch_size)
  # Length-sorted batches waste less padding and share buckets.
  order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
  key = jax.random.key(seed)

  out_ids: list[list[int]] = [[] for _ in prompts]
  out_fin = [False] * len(prompts)
  new_shape = malloc.ReleaseOnNewShape()
  start, b = 0, 0
  while start < len(order):
    idx = order[start:start + rows]
    length = prompt_bucket(max(len(ids[i]) for i in idx))
    B = _rows_within(rows, length + max_new_tokens, max_batch_tokens)
    if B < rows:
      idx = idx[:B]
      length = prompt_bucket(max(len(ids[i]) for i in idx))
    new_shape((B, length))
    ids_BxP, mask_BxP = chat_lib.left_pad([ids[i] for i in idx], length=length, rows=B, pad=pad)
    tokens_BxN, lengths_B, finished_B, _ = jax.device_get(decode(
        params, embed, ids_BxP, mask_BxP, stop_E, jax.random.fold_in(key, b), np.int32(pad),
        cfg=cfg, max_new_tokens=max_new_tokens, sampling=sampling))
    for r, i in enumerate(idx):
      n = int(lengths_B[r]) - int(finished_B[r])  # drop the end token itself
      out_ids[i] = tokens_BxN[r, :n].tolist()
      out_fin[i] = bool(finished_B[r])
    start, b = start + len(idx), b + 1
  malloc.release()

  out_texts = []
  for i, toks in enumerate(out_ids):
    text = tokenizer.decode(toks, skip_special_tokens=True)
    text, hit = truncate_at_stop(text, stop_strings)
    out_fin[i] = out_fin[i] or hit
    out_texts.append(text)
  return Generation(out_texts, out_ids, out_fin)


def generate(params: Params, cfg: ModelConfig, tokenizer: Any, prompts: Sequence[str], *,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
             stop_strings: Sequence[str] = (), chat: bool = True,
             embed_fn: EmbedFn | None = None,
             prefills: Sequence[str | Sequence[int] | None] | None = None,
             max_batch_tokens: int = 0) -> list[str]:
  """Completes each prompt; returns only the new text (special tokens stripped).

  chat=True renders each prompt as a user turn with the tokenizer's chat
  template (plain text when it has none). Rows stop at any end token
  (`chat.stop_token_ids`) or after max_new_tokens; the text is cut at the
  first stop string. `embed_fn(params, cfg, ids_BxT) -> x_BxTxD` replaces the
  token embedding (prompt and every generated token), e.g. to apply the
  embedding-MLP adapter; pass a `jax.tree_util.Partial` to keep its arrays
  out of the compiled executable.

  prefills: one per prompt (None or "" for none), a string or token ids that the
  assistant turn already begins with; the answer continues it, and only the
  continuation is returned (the prefilling attack, forced answer openings).

  max_batch_tokens: when > 0, a batch of long prompts takes fewer rows (halving
  batch_size) so that rows x (prompt bucket + max_new_tokens) stays within it.
  """
  return generate_batch(params, cfg, tokenizer, prompts, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                        batch_size=batch_size, stop_strings=stop_strings, chat=chat,
                        embed_fn=embed_fn, prefills=prefills,
                        max_batch_tokens=max_batch_tokens).texts
