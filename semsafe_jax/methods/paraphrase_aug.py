"""paraphrase_aug: LoRA SFT on the training prompts plus generated variants of them.

The variants (methods/paraphrase.py: rule-based style rewrites and model paraphrases,
filtered by SBERT cosine to their source, deduplicated, never within tau of an evaluation
prompt) are made once on the host and train as their source does: a harmful prompt's
variant towards the source's refusal target (with its weight), and, with
method.augment_safe, a benign or borderline prompt's variant towards the source's base
answer. Those are the prompts ours gets as unlabelled partners, here with pseudo-labels:
the fair rival to the consistency term.

Same examples per step as every method: the step's harmful and benign blocks keep their
prompts and sizes, and round(method.aug_share * block size) of their rows whose prompt has
a kept variant are replaced by one of its variants, drawn from (seed, step) alone. The loss
is lora_sft's (one token mean of cross-entropy); no embedding MLP.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import logging

from semsafe_jax.methods import lora_sft
from semsafe_jax.methods import paraphrase as paraphrase_lib
from semsafe_jax.methods.base import Pairs, Prepared, SafetyBatch, Tokens
from semsafe_jax.train import inputs


@dataclasses.dataclass(frozen=True)
class AugRows:
  """One block's training rows followed by its variants' rows, in one [N + M, L] table."""
  rows: inputs.Rows  # the N source rows (positions as in ctx.sft), then the M variants
  n: int  # N
  variants_of: list[np.ndarray]  # [N] row indices (>= n) of each source's variants


def aug_rows(tokenizer, prompts: list[str], responses: list[str], source_pos: np.ndarray,
             variant_texts: list[str], *, max_len: int, max_response: int) -> AugRows:
  """Rows of (prompt, response) and of each variant with its source's response."""
  source_pos = np.asarray(source_pos, np.int64)
  rows = inputs.encode_rows(tokenizer, list(prompts) + list(variant_texts),
                            list(responses) + [responses[int(p)] for p in source_pos],
                            max_len, max_response)
  n = len(prompts)
  variants_of = [[] for _ in range(n)]
  for m, p in enumerate(source_pos):
    variants_of[int(p)].append(n + m)
  return AugRows(rows, n, [np.asarray(v, np.int64) for v in variants_of])


def replace_rows(aug: AugRows, pos: np.ndarray, share: float, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(row indices into aug.rows [B], replaced [B]) for a block of source positions.

  round(share * B) rows, drawn among those whose source has a variant (fewer when not
  enough have one), become one of their source's variants, drawn uniformly.
  """
  pos = np.asarray(pos, np.int64)
  idx = pos.copy()
  want = int(round(share * len(pos)))
  eligible = np.flatnonzero([len(aug.variants_of[int(p)]) > 0 for p in pos])
  take = rng.choice(eligible, min(want, len(eligible)), replace=False) if want else eligible[:0]
  for b in np.sort(take):
    options = aug.variants_of[int(pos[b])]
    idx[b] = options[int(rng.integers(len(options)))]
  replaced = np.zeros(len(pos), bool)
  replaced[take] = True
  return idx, replaced


def prepare(ctx) -> Prepared:
  config, dc, mc = ctx.config, ctx.config.data, ctx.config.method
  share, augment_safe = float(mc.aug_share), bool(mc.augment_safe)
  if not 0.0 <= share <= 1.0:
    raise ValueError(f"method.aug_share={share}; expected a share in [0, 1]")
  sft, data = ctx.sft, ctx.data
  sources = np.concatenate([sft.harm_rows] + ([sft.benign_rows] if augment_safe else []))
  para = paraphrase_lib.paraphrases(ctx, sources)
  if not len(para):
    logging.warning("paraphrase_aug: no variant was kept (%s); training as lora_sft.",
                    {r: n for r, n in para.counts["dropped"].items() if n})

  def block(source_rows, prompts, responses) -> AugRows:
    # The variants whose source is in this block, by the source's position in it.
    pos_of = {int(r): i for i, r in enumerate(source_rows)}
    mine = [m for m, r in enumerate(para.source_rows) if int(r) in pos_of]
    return aug_rows(ctx.tokenizer, prompts, responses,
                    np.asarray([pos_of[int(para.source_rows[m])] for m in mine], np.int64),
                    [para.texts[m] for m in mine], max_len=dc.max_len,
                    max_response=dc.max_response_tokens)

  harm = block(sft.harm_rows, data.texts(sft.harm_rows), sft.harm_targets)
  benign = block(sft.benign_rows, data.texts(sft.benign_rows), sft.benign_answers)
  seed = int(config.seed)

  def batch_fn(step: int) -> SafetyBatch:
    b, hi, bi = ctx.batch_rows(step)
    rng = np.random.default_rng([seed & 0xFFFFFFFF, int(step), 0xA06])
    h_idx, _ = replace_rows(harm, hi, share, rng)
    b_idx = replace_rows(benign, bi, share, rng)[0] if augment_safe else bi
    return SafetyBatch(harm=Tokens.take(harm.rows, h_idx, sft.harm_weight[hi]),
                       benign=Tokens.take(benign.rows, b_idx),
                       pairs=Pairs(index=b.pair_index, weight=np.asarray(b.pair_weight,
                                                                         np.float32),
                                   valid=b.pair_valid))

  report = {"variants": para.counts, "aug_share": share, "augment_safe": augment_safe,
            "harmful_variants": int(harm.rows.ids.shape[0] - harm.n),
            "safe_variants": int(benign.rows.ids.shape[0] - benign.n),
            "harmful_with_variant": int(sum(len(v) > 0 for v in harm.variants_of)),
            "safe_with_variant": int(sum(len(v) > 0 for v in benign.variants_of)),
            "row_length": {"harmful": int(harm.rows.ids.shape[1]),
                           "benign": int(benign.rows.ids.shape[1])}}
  logging.info("paraphrase_aug: %d harmful and %d benign/borderline variants; %.0f%% of each "
               "block's rows replaced by one where the prompt has any.",
               report["harmful_variants"], report["safe_variants"], 100 * share)
  return dataclasses.replace(lora_sft.sft_prepared(ctx, ctx.init_trainable()),
                             batch_fn=batch_fn, report=report)
