"""The host-side stages every method may draw on, computed once and cached in the workdir.

A method's `prepare(ctx)` asks the context for what it needs (refusal targets, the base
model's own answers, the safety probe, the refusal classifier, the shared batcher); each
stage runs on first use and caches its output in W, so a re-run or a resume skips it.
What a method generates for itself (paraphrases, compliant answers) goes through
`ctx.base_generate` and `ctx.cached_answers` too, so it is cached and counted the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from semsafe_jax import adapters as adapters_lib
from semsafe_jax import files
from semsafe_jax.data.batches import PairBatcher
from semsafe_jax.data.pipeline import PreparedData, dump_json, make_batcher
from semsafe_jax.data.schema import Prompt
from semsafe_jax.data.splits import UNLABELED_SPLIT
from semsafe_jax.files import read_jsonl, write_jsonl
from semsafe_jax.methods.base import Pairs, SafetyBatch, Tokens
from semsafe_jax.models import generate as gen_lib
from semsafe_jax.models.config import ModelConfig
from semsafe_jax.probes import safety as probe_lib
from semsafe_jax.train import inputs, sharding

FLAGGED_FILE = "flagged_unlabeled.json"  # in W/probe/
BASE_ANSWERS_FILE = "base_answers.jsonl"  # benign/borderline train prompts -> base answers
HARMFUL_ANSWERS_FILE = "harmful_base_answers.jsonl"  # harmful train prompts -> base answers
# Safe prompts every method trains to answer as the base model does.
SAFE_TRAIN_SPLITS = ("train_benign", "train_borderline", "train_lookalike")


@dataclasses.dataclass(frozen=True)
class SftData:
  """Tokenised training rows shared by every method (the same prompts, the same targets)."""
  harm_rows: np.ndarray  # int64 [Nh] prompt rows: train harmful (+ probe-flagged unlabeled)
  harm_weight: np.ndarray  # float32 [Nh]: 1, or the probe's unsafe probability if flagged
  harm_targets: list[str]  # the refusal each harmful prompt trains towards
  harm: inputs.Rows  # prompt + refusal target
  benign_rows: np.ndarray  # int64 [Nb] train benign, borderline, then look-alikes
  benign_answers: list[str]  # the base model's own greedy answers
  benign: inputs.Rows  # prompt + base answer


class Context:
  """Config, data, frozen model and lazily computed, workdir-cached host stages."""

  def __init__(self, config: Any, workdir: str, data: PreparedData, model_cfg: ModelConfig,
               params: Any, tokenizer: Any, mesh: jax.sharding.Mesh, aligned: Any = None):
    self.config, self.workdir, self.data = config, workdir, data
    self.model_cfg, self.params, self.tokenizer, self.mesh = model_cfg, params, tokenizer, mesh
    # The retention scenario's aligned model (semsafe_jax/retention/aligned.py), which
    # `params` then is; None when the frozen model is the base model itself.
    self.aligned = aligned
    self.primary = sharding.is_primary()

  # --- Generation with the frozen base model.

  def base_generate(self, prompts: Sequence[str], max_new_tokens: int | None = None,
                    prefills: Sequence[str] | None = None) -> list[str]:
    ec = self.config.eval
    kw = {} if prefills is None else {"prefills": list(prefills)}
    return gen_lib.generate(self.params, self.model_cfg, tokenizer=self.tokenizer,
                            prompts=list(prompts), batch_size=ec.batch_size,
                            max_batch_tokens=ec.max_batch_tokens,
                            max_new_tokens=int(max_new_tokens or ec.max_new_tokens), **kw)

  def cached_answers(self, name: str, prompts: Sequence[str],
                     generate: Callable[[list[str]], list[str]]) -> list[str]:
    """generate(prompts), cached in W/<name>.jsonl and reused while the prompts match.

    With `config.shared_dir` set (the experiment runner sets it for every cell), a copy
    also lives there under a digest of the prompts and the generation settings, so runs
    that differ only in method or seed generate once.
    """
    prompts = list(prompts)
    paths = [os.path.join(self.workdir, name)] + self._shared_paths(name, prompts)
    for path in paths:
      if files.exists(path):
        rows = read_jsonl(path)
        if [r["prompt"] for r in rows] == prompts:
          answers = [r["completion"] for r in rows]
          break
    else:
      logging.info("Generating %s for %d prompts.", name, len(prompts))
      answers, path = generate(prompts), None
    if self.primary:
      rows = [{"prompt": p, "completion": a} for p, a in zip(prompts, answers)]
      for p in paths:
        if p != path:
          write_jsonl(p, rows)
    return answers

  def _shared_paths(self, name: str, prompts: Sequence[str]) -> list[str]:
    shared = self.config.get("shared_dir", "")
    if not shared:
      return []
    # What a base-model answer can depend on (over-inclusive only costs a miss); a method's
    # own generation settings are in `name` (e.g. the paraphraser's digest).
    c = self.config
    key = json.dumps([name, prompts, c.model.to_dict(), c.eval.to_dict(),
                      c.data.max_response_tokens]
                     + ([self.aligned.identity] if self.aligned is not None else []),
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem, ext = os.path.splitext(name.replace("/", "_"))
    return [os.path.join(shared, "base_model", f"{stem}_{digest}{ext}")]

  def base_answers(self, rows: np.ndarray, name: str, max_new_tokens: int) -> list[str]:
    """The base model's own greedy answers to prompt rows, cached as W/<name>."""
    return self.cached_answers(name, self.data.texts(rows),
                               lambda ps: self.base_generate(ps, max_new_tokens))

  # --- Shared training data.

  def refusal_targets(self, rows: Sequence[int]) -> list[str]:
    """A refusal per harmful prompt: of its category when one exists, else a general one.

    The choice hashes the prompt id, so it is stable across runs and resumes.
    """
    by_cat: dict[str, list[str]] = {}
    for r in self.data.refusal_records:
      by_cat.setdefault(r.category or "general", []).append(r.text)
    general = by_cat.get("general") or [r.text for r in self.data.refusal_records]
    out = []
    for row in rows:
      p = self.data.prompts[int(row)]
      pool = by_cat.get(p.category, []) + general
      h = int(hashlib.sha256(p.id.encode()).hexdigest(), 16)
      out.append(pool[h % len(pool)])
    return out

  @functools.cached_property
  def sft(self) -> SftData:
    data, dc = self.data, self.config.data
    benign_rows = np.concatenate([np.asarray(data.splits.get(s, []), np.int64)
                                  for s in SAFE_TRAIN_SPLITS])
    flagged, flagged_weight = self.flagged
    harm_rows = np.concatenate([data.splits["train"], flagged])
    harm_weight = np.concatenate([np.ones(len(data.splits["train"]), np.float32),
                                  flagged_weight])
    answers = self.base_answers(benign_rows, BASE_ANSWERS_FILE,
                                self.config.eval.base_answer_tokens)
    targets = self.refusal_targets(harm_rows)
    tok = self.tokenizer
    harm = inputs.encode_rows(tok, data.texts(harm_rows), targets, dc.max_len,
                              dc.max_response_tokens)
    benign = inputs.encode_rows(tok, data.texts(benign_rows), answers, dc.max_len,
                                dc.max_response_tokens)
    logging.info("Train rows: harmful %s, benign/borderline %s (%d / %d prompts shortened).",
                 harm.ids.shape, benign.ids.shape, harm.truncated, benign.truncated)
    return SftData(harm_rows=harm_rows, harm_weight=harm_weight, harm_targets=targets, harm=harm,
                   benign_rows=benign_rows, benign_answers=answers, benign=benign)

  @functools.cached_property
  def harmful_answers(self) -> list[str]:
    """The base model's own greedy answers to the harmful training prompts (sft.harm_rows
    order): what it says when nothing stops it. The rejected side of preference methods,
    the harmful set of circuit breakers, the prefixes of deep alignment."""
    return self.base_answers(self.sft.harm_rows, HARMFUL_ANSWERS_FILE,
                             self.config.data.max_response_tokens)

  @functools.cached_property
  def batcher(self) -> PairBatcher:
    return make_batcher(self.data, self.config,
                        num_shards=sharding.batch_size_divisor(self.mesh),
                        extra_harmful=self.flagged[0])

  def batch_rows(self, step: int):
    """(batcher batch, positions in sft.harm, positions in sft.benign) of a step."""
    b = self.batcher.batch(step)
    return b, self._harm_pos[b.harmful_idx], self._benign_pos[b.benign_idx]

  @functools.cached_property
  def _harm_pos(self) -> np.ndarray:
    return _positions(self.sft.harm_rows, len(self.data.prompts))

  @functools.cached_property
  def _benign_pos(self) -> np.ndarray:
    return _positions(self.sft.benign_rows, len(self.data.prompts))

  def safety_batch_fn(self, pair_weight_fn: Callable[[np.ndarray, Any], np.ndarray] | None = None
                      ) -> Callable[[int], SafetyBatch]:
    """step -> SafetyBatch from the shared batcher and SFT rows.

    pair_weight_fn(harm positions, batcher batch) may reweight the pairs.
    """
    sft = self.sft

    def batch_fn(step: int) -> SafetyBatch:
      b, hi, bi = self.batch_rows(step)
      weight = b.pair_weight if pair_weight_fn is None else pair_weight_fn(hi, b)
      return SafetyBatch(harm=Tokens.take(sft.harm, hi, sft.harm_weight[hi]),
                         benign=Tokens.take(sft.benign, bi),
                         pairs=Pairs(index=b.pair_index, weight=np.asarray(weight, np.float32),
                                     valid=b.pair_valid))
    return batch_fn

  # --- Adapters and the frozen model.

  def init_trainable(self, full_weights: bool | None = None) -> Any:
    """Fresh adapters per config.adapters; with full weights (method.full_weights), every
    model weight too, as float32 master copies whatever the compute dtype."""
    out = adapters_lib.init_adapters(self.config.adapters, self.model_cfg, self.params,
                                     jax.random.key(self.config.seed))
    if full_weights is None:
      full_weights = bool(self.config.method.get("full_weights", False))
    if full_weights:
      out["full"] = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), self.params)
    return out

  def base_axes(self, prefix: str = "base") -> dict[str, tuple[str, ...]]:
    """Logical axes of the frozen params, under `prefix` in the frozen pytree."""
    return {f"{prefix}/{k}": v for k, v in sharding.model_logical_axes(self.model_cfg).items()}

  # --- Safety probe (harmful vs benign on hidden states) and what uses it.

  @functools.cached_property
  def probe(self) -> dict[str, Any] | None:
    """Trains the per-layer safety probe and writes its report to W/probe/."""
    config, data = self.config, self.data
    if not config.probe.get("train", True):
      return None
    out_dir = os.path.join(self.workdir, "probe")
    n = int(config.probe.max_prompts)
    rng = np.random.default_rng(config.seed)
    take = lambda rows: np.sort(rng.choice(rows, min(n, len(rows)), replace=False))

    def encoded(h_rows, b_rows):
      ids, mask = probe_lib.encode_prompts(self.tokenizer,
                                           data.texts(np.concatenate([h_rows, b_rows])),
                                           config.data.max_len)
      return ids, mask, np.r_[np.ones(len(h_rows)), np.zeros(len(b_rows))].astype(np.float32)

    benign_rows = np.concatenate([data.splits["train_benign"], data.splits["train_borderline"]])
    ho_b = np.concatenate([data.splits["eval_benign"], data.splits["eval_borderline"]])
    train = encoded(take(data.splits["train"]), take(benign_rows))
    heldout = encoded(take(data.splits["heldout_intent"]), take(ho_b))
    res = probe_lib.fit_safety_probe(self.params, self.model_cfg, train, heldout, out_dir,
                                     probe_cfg=config.probe, write=self.primary)
    logging.info("Safety probe: best layer %d, held-out accuracy %.3f.", res["best_layer"],
                 float(res["heldout_acc"][res["best_layer"]]))
    return res

  def probe_scores(self, rows: np.ndarray) -> np.ndarray:
    """The probe's unsafe probability [N] of prompt rows."""
    return np.asarray(probe_lib.score_prompts(
        self.params, self.model_cfg, self.probe["probe"],
        *probe_lib.encode_prompts(self.tokenizer, self.data.texts(rows),
                                  self.config.data.max_len),
        batch_size=int(self.config.probe.get("batch_size", 16))))

  @functools.cached_property
  def flagged(self) -> tuple[np.ndarray, np.ndarray]:
    """probe.use="flag_unlabeled": (rows, harm weights) of the flagged train_unlabeled prompts.

    Flagged prompts train as harmful (a refusal target, L_safety weighted by their
    probability, consistency pairs with their training neighbours); unflagged ones are not
    trained on at all, as nothing says they are benign.
    """
    none = np.zeros(0, np.int64), np.zeros(0, np.float32)
    if self.config.probe.use != "flag_unlabeled":
      return none
    rows = np.asarray(self.data.splits.get(UNLABELED_SPLIT, []), np.int64)
    if not len(rows):
      logging.warning("probe.use='flag_unlabeled' but no unlabeled prompts were loaded (a "
                      "source with ?label=unlabeled): training as with probe.use='off'.")
      return none
    threshold = float(self.config.probe.threshold)
    flagged, weight, record = flag_unlabeled_rows(self.data.prompts, rows,
                                                  self.probe_scores(rows), threshold)
    logging.info("Safety probe flagged %d of %d unlabeled prompts (unsafe probability >= "
                 "%.2f); they train as harmful, the rest are not trained on.", len(flagged),
                 len(rows), threshold)
    if self.primary:
      dump_json(os.path.join(self.workdir, "probe", FLAGGED_FILE), record)
    return flagged, weight


  @functools.cached_property
  def refusal_classifier(self) -> dict[str, np.ndarray]:
    """A refusal classifier: built-in refusals (label 1) vs the base model's own answers
    (label 0), on expected-token-embedding features (W/refusal_classifier.npz)."""
    from semsafe_jax.probes import refusal as refusal_lib  # pylint: disable=g-import-not-at-top
    n, tok = self.config.data.max_response_tokens, self.tokenizer

    def ids_mask(texts):
      rows = [tok(t, add_special_tokens=False)["input_ids"][:n] for t in texts]
      ids, mask = np.zeros((len(rows), n), np.int32), np.zeros((len(rows), n), bool)
      for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, True
      return ids, mask

    lc = self.config.loss
    clf, metrics = refusal_lib.train_refusal_classifier(
        self.params["embed"]["embedding"], *ids_mask(self.data.refusals),
        *ids_mask(self.sft.benign_answers), hidden=lc.classifier_hidden,
        steps=lc.classifier_steps, lr=lc.classifier_lr, seed=self.config.seed)
    if self.primary:
      refusal_lib.save_classifier(os.path.join(self.workdir, "refusal_classifier.npz"), clf)
    logging.info("Refusal classifier: train accuracy %.3f.", metrics["train_acc"])
    return clf


def flag_unlabeled_rows(prompts: Sequence[Prompt], rows: Sequence[int], unsafe_prob: Any,
                        threshold: float) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """(flagged rows, their harm weights, the flagged_unlabeled.json record).

  rows: unlabeled prompt rows; unsafe_prob: the probe's [N] probabilities for them.
  """
  rows = np.asarray(rows, np.int64)
  flags, weight = probe_lib.flag_unlabeled(np.asarray(unsafe_prob, np.float32), threshold)
  record = {"threshold": float(threshold), "num_unlabeled": int(len(rows)),
            "num_flagged": int(flags.sum()),
            "flagged": [{"id": prompts[int(r)].id, "unsafe_prob": round(float(p), 6)}
                        for r, p in zip(rows[flags], np.asarray(unsafe_prob)[flags])]}
  return rows[flags], weight[flags], record


def _positions(rows: np.ndarray, n: int) -> np.ndarray:
  """Inverse index: prompt row -> its position in `rows` (-1 where absent)."""
  pos = np.full(n, -1, np.int64)
  pos[np.asarray(rows, np.int64)] = np.arange(len(rows))
  return pos
