"""dpo: Direct Preference Optimization (Rafailov et al., 2023, arXiv 2305.18290) with LoRA.

One preference pair per prompt of the shared batch:
  harmful prompt:          chosen = its refusal target, rejected = the base model's own
                           greedy answer (it complies: what the refusal should replace);
  benign/borderline prompt: chosen = the base model's own answer, rejected = a built-in
                           refusal (chosen as refusal targets are), so over-refusal costs too.
The reference is the frozen base model, so at the first step policy = reference and the
loss is log 2. loss = -log sigmoid(beta * d), d = (log pi(y_c) - log pi_ref(y_c)) -
(log pi(y_r) - log pi_ref(y_r)), log-probabilities summed over the response tokens;
mean over pairs, each weighted as its prompt is in the other methods (flagged unlabeled
prompts by the probe's probability). Same LoRA placement as ours, no embedding MLP.

Cost per step: one adapted forward and backward over both responses of every pair ([2P, L]
rows, P = harmful_per_step + benign_per_step), twice lora_sft's rows. The reference needs
no forward in the step: the frozen base model's log-probabilities of every row a step will
read are computed once before training (the rows follow from the batcher, a function of
(seed, step)) and cached in W/dpo_reference.npz. The pairs table (prompt +
chosen, prompt + rejected rows) is tokenised once too. `safedpo.py` reuses all of this.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from semsafe_jax import files
from semsafe_jax.eval import judge
from semsafe_jax.losses.common import safe_div
from semsafe_jax.losses.preference import dpo_loss
from semsafe_jax.methods import common
from semsafe_jax.methods.base import Prepared, Tokens
from semsafe_jax.models import transformer
from semsafe_jax.train import inputs

REFERENCE_FILE = "dpo_reference.npz"  # in W: the reference's log-probabilities of the pairs


@flax.struct.dataclass
class PreferenceBatch:
  """One step of preference pairs: the same prompt with a preferred and a dispreferred
  response. Row p of `chosen` and row p of `rejected` form pair p."""
  chosen: Tokens  # [P, L] prompt + preferred response
  rejected: Tokens  # [P, L] prompt + dispreferred response
  weight: Any  # float32 [P] pair weight (0: dropped); Tokens.weight holds the same
  margin: Any  # float32 [P] subtracted from beta * d inside the sigmoid (SafeDPO; 0 in DPO)
  harmful: Any  # bool [P] the prompt is harmful (per-block metrics)
  ref_chosen: Any  # float32 [P] log pi_ref(chosen response | prompt), summed over its tokens
  ref_rejected: Any  # float32 [P] the same for the rejected response


@dataclasses.dataclass(frozen=True)
class PairTable:
  """Every preference pair of the run, tokenised once: pairs [0, n_harm) follow the
  positions of ctx.sft.harm, pairs [n_harm, n) those of ctx.sft.benign."""
  rows: inputs.Rows  # [2n, L]: the n chosen rows, then the n rejected rows
  weight: np.ndarray  # float32 [n]
  margin: np.ndarray  # float32 [n]
  n_harm: int
  # float32 [2n] the reference's summed log-probability of each row (NaN: no step reads it).
  ref_logp: np.ndarray | None = None

  @property
  def n(self) -> int:
    return len(self.weight)

  def index(self, harm_pos: np.ndarray, benign_pos: np.ndarray) -> np.ndarray:
    """int64 [P] pairs of a step: its harmful prompts' pairs, then its benign prompts'."""
    return np.concatenate([np.asarray(harm_pos, np.int64),
                           self.n_harm + np.asarray(benign_pos, np.int64)])

  def batch(self, harm_pos: np.ndarray, benign_pos: np.ndarray) -> PreferenceBatch:
    if self.ref_logp is None:
      raise ValueError("PairTable.ref_logp is not computed yet (see with_reference)")
    idx = self.index(harm_pos, benign_pos)
    w, n = self.weight[idx], self.n
    return PreferenceBatch(chosen=Tokens.take(self.rows, idx, w),
                           rejected=Tokens.take(self.rows, n + idx, w), weight=w,
                           margin=self.margin[idx], harmful=idx < self.n_harm,
                           ref_chosen=self.ref_logp[idx], ref_rejected=self.ref_logp[n + idx])


def pair_table(ctx, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
               weight: np.ndarray, margin: np.ndarray, n_harm: int) -> PairTable:
  """Tokenises (prompt, chosen) and (prompt, rejected) into one block of one row length."""
  prompts, n = list(prompts), len(prompts)
  if not len(chosen) == len(rejected) == len(weight) == len(margin) == n:
    raise ValueError(f"pairs: {n} prompts, {len(chosen)} chosen, {len(rejected)} rejected, "
                     f"{len(weight)} weights, {len(margin)} margins")
  dc = ctx.config.data
  rows = inputs.encode_rows(ctx.tokenizer, prompts + prompts, list(chosen) + list(rejected),
                            dc.max_len, dc.max_response_tokens)
  logging.info("Preference pairs: %d (%d harmful), rows %s (%d prompts shortened).", n, n_harm,
               rows.ids.shape, rows.truncated)
  return PairTable(rows=rows, weight=np.asarray(weight, np.float32),
                   margin=np.asarray(margin, np.float32), n_harm=int(n_harm))


def method_knob(config: Any, name: str) -> float:
  """config.method.<name>, with a one-line error naming the config file that sets it."""
  value = config.method.get(name, None)
  if value is None:
    raise ValueError(f"method.{name} is not set; run with "
                     f"--config=configs/methods/{config.method.name}.py (it sets the default)")
  return float(value)


# --- The loss.


def _interleave(a: Tokens, b: Tokens) -> Tokens:
  """[2P, ...] rows a0, b0, a1, b1, ...: pair p stays on the device that holds row p."""
  return jax.tree.map(lambda x, y: jnp.stack([x, y], 1).reshape((-1,) + x.shape[1:]), a, b)


def pair_logprobs(params: Any, cfg: Any, embed_fn: Callable, batch: PreferenceBatch,
                  n_max: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(chosen [P], rejected [P] summed response log-probabilities, target mask [2P, n])
  from one forward over both sides."""
  logits, targets, mask, _ = common.response_logits(
      params, cfg, embed_fn, _interleave(batch.chosen, batch.rejected), n_max)
  lp = common.response_logprob(logits, targets, mask).reshape(-1, 2)
  return lp[:, 0], lp[:, 1], mask


def loss(trainable, frozen, batch: PreferenceBatch, rng, *, model_cfg, adapter_cfg,
         beta: float, n_max: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(DPO loss, metrics). frozen = {"base": base params}; the reference log-probabilities
  (of that frozen model, `reference_logprobs`) come with the batch."""
  params, embed_fn = common.adapted(trainable, frozen["base"], adapter_cfg, rng)
  pc, pr, mask = pair_logprobs(params, model_cfg, embed_fn, batch, n_max)
  rc = jax.lax.stop_gradient(batch.ref_chosen.astype(jnp.float32))
  rr = jax.lax.stop_gradient(batch.ref_rejected.astype(jnp.float32))
  w = batch.weight.astype(jnp.float32)
  l_dpo, metrics = dpo_loss(pc, pr, rc, rr, beta, weight=w, margin=batch.margin)
  harm = batch.harmful.astype(jnp.float32)
  for name, wb in (("harmful", w * harm), ("benign", w * (1.0 - harm))):
    lb, mb = dpo_loss(pc, pr, rc, rr, beta, weight=wb, margin=batch.margin)
    metrics[f"dpo_{name}"] = jax.lax.stop_gradient(lb)
    metrics[f"accuracy_{name}"] = mb["reward_accuracy"]
  t = _interleave(batch.chosen, batch.rejected)
  count = lambda m: m.astype(jnp.float32).sum()
  metrics.update(l_dpo=l_dpo, l_total=l_dpo, pairs=count(w > 0),
                 # Response tokens past loss.max_target_tokens: not in log pi (should be 0).
                 targets_dropped=count(t.target_mask[:, 1:]) - count(mask),
                 logp_chosen=jax.lax.stop_gradient(safe_div((pc * w).sum(), w.sum())),
                 logp_rejected=jax.lax.stop_gradient(safe_div((pr * w).sum(), w.sum())))
  return l_dpo, metrics


@functools.partial(jax.jit, static_argnames=("cfg", "n_max"))
def row_logprobs(params: Any, cfg: Any, t: Tokens, n_max: int) -> jax.Array:
  """[B] summed response log-probability of each row under the model `params` (unadapted):
  the same gather and sum as the policy side of the loss."""
  logits, targets, mask, _ = common.response_logits(params, cfg, transformer.embed, t, n_max)
  return common.response_logprob(logits, targets, mask)


def reference_logprobs(params: Any, cfg: Any, rows: inputs.Rows, which: np.ndarray,
                       n_max: int, batch_size: int) -> np.ndarray:
  """float32 [N] row_logprobs of rows[which] (NaN elsewhere), in fixed-size batches."""
  out = np.full(len(rows.ids), np.nan, np.float32)
  which = np.asarray(which, np.int64)
  out[which] = common.map_rows(lambda t: row_logprobs(params, cfg, t, n_max), rows, which,
                               batch_size)
  return out


def with_reference(ctx, table: PairTable, n_max: int) -> PairTable:
  """The table with the frozen base model's log-probabilities of every row the run's steps
  read (from the batcher: steps x grad_accum micro-batches), cached in W/dpo_reference.npz."""
  tc = ctx.config.train
  steps = int(tc.steps) * max(1, int(tc.get("grad_accum", 1)))
  pairs = np.unique(np.concatenate(
      [table.index(*ctx.batch_rows(s)[1:]) for s in range(steps)] or [np.zeros(0, np.int64)]))
  which = np.concatenate([pairs, table.n + pairs])
  r = table.rows
  digest = hashlib.sha256()
  for a in (r.ids, r.mask, r.target_mask, which):
    digest.update(np.ascontiguousarray(a).tobytes())
  mc = ctx.config.model
  digest.update(f"{mc.name_or_path}|{mc.dtype}|{mc.get('param_dtype', '')}|{n_max}".encode())
  key = digest.hexdigest()
  path = os.path.join(ctx.workdir, REFERENCE_FILE)
  if files.exists(path):
    f = files.load_npz(path)
    if str(f["key"]) == key:
      return dataclasses.replace(table, ref_logp=f["logp"])
  t0 = time.time()
  logp = reference_logprobs(ctx.params, ctx.model_cfg, r, which, n_max,
                            int(ctx.config.eval.batch_size))
  logging.info("Reference log-probabilities of %d rows (%d pairs) in %.1fs.", len(which),
               len(pairs), time.time() - t0)
  if ctx.primary:
    files.save_npz(path, {"key": key, "logp": logp})
  return dataclasses.replace(table, ref_logp=logp)


def preference_prepared(ctx, table: PairTable, beta: float,
                        report: dict[str, Any] | None = None) -> Prepared:
  """The DPO loss over `table`, on the shared batcher's prompts, with fresh adapters."""
  n_max = common.target_window(ctx.config)
  table = with_reference(ctx, table, n_max)
  loss_fn = functools.partial(loss, model_cfg=ctx.model_cfg, adapter_cfg=ctx.config.adapters,
                              beta=float(beta), n_max=n_max)

  def batch_fn(step: int) -> PreferenceBatch:
    _, hi, bi = ctx.batch_rows(step)
    return table.batch(hi, bi)

  return Prepared(trainable=ctx.init_trainable(), loss_fn=loss_fn, batch_fn=batch_fn,
                  frozen={"base": ctx.params}, frozen_axes=ctx.base_axes(),
                  report=dict(report or {}))


# --- Host-side preparation.


def compliant(answers: Sequence[str]) -> np.ndarray:
  """bool [N]: the string-match judge does not read the answer as a refusal."""
  return np.array([not judge.is_refusal(a) for a in answers], bool)


def prepare(ctx) -> Prepared:
  sft, data = ctx.sft, ctx.data
  n_harm, n_benign = len(sft.harm_rows), len(sft.benign_rows)
  prompts = data.texts(sft.harm_rows) + data.texts(sft.benign_rows)
  chosen = list(sft.harm_targets) + list(sft.benign_answers)
  rejected = list(ctx.harmful_answers) + ctx.refusal_targets(sft.benign_rows)
  weight = np.concatenate([sft.harm_weight, np.ones(n_benign, np.float32)])
  table = pair_table(ctx, prompts, chosen, rejected, weight, np.zeros(n_harm + n_benign),
                     n_harm)
  n_comply = int(compliant(ctx.harmful_answers).sum())
  logging.info("DPO: %d harmful pairs (the base model complies with %d), %d benign pairs.",
               n_harm, n_comply, n_benign)
  return preference_prepared(ctx, table, method_knob(ctx.config, "beta"), report={
      "pairs_harmful": n_harm, "pairs_benign": n_benign, "harmful_base_compliant": n_comply})
