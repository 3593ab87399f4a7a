"""The main job: data -> probe -> base answers -> adapters -> before/after report.

  python -m semsafe_jax.main --config=configs/default.py --workdir=runs/demo

Every stage caches its output in the workdir, so a re-run (or a resume after a
crash) skips what is done and training continues from the latest checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from semsafe_jax import adapters as adapters_lib, malloc
from semsafe_jax.data.pipeline import PreparedData, dump_json, make_batcher, prepare_data
from semsafe_jax.data.schema import Prompt
from semsafe_jax.data.splits import UNLABELED_SPLIT
from semsafe_jax.eval import judge, report as report_lib
from semsafe_jax.jobs import generate as gen_job
from semsafe_jax.losses.total import build_aux, total_loss
from semsafe_jax.models import generate as gen_lib
from semsafe_jax.models.loading import load_pretrained
from semsafe_jax.probes import safety as probe_lib
from semsafe_jax.train import checkpoint as ckpt_lib
from semsafe_jax.train import inputs, sharding
from semsafe_jax.train.trainer import fit

EVAL_SPLITS = {"heldout_intent": "heldout_intent", "heldout_phrasing": "heldout_phrasing",
               "borderline": "eval_borderline", "benign": "eval_benign",
               # Evaluation-only sources (e.g. XSTest), reported when loaded.
               "eval_only_harmful": "eval_only_harmful",
               "eval_only_borderline": "eval_only_borderline",
               "eval_only_benign": "eval_only_benign"}
FLAGGED_FILE = "flagged_unlabeled.json"  # in WORKDIR/probe/


def run(config, workdir: str) -> dict[str, Any]:
  check_probe_use(config.probe)  # before any model work
  sharding.initialize_distributed(config)
  ckpt_lib.prepare_workdir(workdir, config)  # refuse a changed config before any work
  primary = sharding.is_primary()
  data = prepare_data(config, workdir)
  mc = config.model
  pre = load_pretrained(mc.name_or_path, dtype=mc.dtype, param_dtype=mc.param_dtype, remat=mc.remat,
                        layer_loop=mc.layer_loop)
  cfg, params, tok = pre.cfg, jax.device_put(pre.params), pre.tokenizer
  ec = config.eval

  eval_sets = _eval_sets(data, config)
  gen = functools.partial(gen_lib.generate, tokenizer=tok, max_new_tokens=ec.max_new_tokens,
                          batch_size=ec.batch_size)
  before = _cached_answers(os.path.join(workdir, "answers_before.jsonl"), eval_sets,
                           lambda prompts: gen(params, cfg, prompts=prompts), primary)

  # Between stages whose working sets differ, the caching allocator (malloc.py)
  # hands its free blocks back, so it never holds more than one stage's.
  malloc.release()
  harm_rows, benign_rows = data.splits["train"], _benign_rows(data)
  probe = _probe_stage(config, workdir, data, params, cfg, tok, harm_rows, benign_rows)
  # Probe-flagged unlabeled prompts train as harmful, weighted by their unsafe probability.
  flagged, flagged_weight = _flag_unlabeled_stage(config, workdir, data, params, cfg, tok, probe)
  harm_weight = np.concatenate([np.ones(len(harm_rows), np.float32), flagged_weight])
  harm_rows = np.concatenate([harm_rows, flagged])
  base_answers = _cached_base_answers(workdir, data.texts(benign_rows),
                                      lambda prompts: gen(params, cfg, prompts=prompts,
                                                          max_new_tokens=ec.base_answer_tokens))

  malloc.release()
  dc = config.data
  harm = inputs.encode_rows(tok, data.texts(harm_rows), _refusal_targets(data, harm_rows),
                            dc.max_len, dc.max_response_tokens)
  benign = inputs.encode_rows(tok, data.texts(benign_rows), base_answers, dc.max_len,
                              dc.max_response_tokens)
  logging.info("Train rows: harmful %s, benign/borderline %s (%d / %d prompts shortened).",
               harm.ids.shape, benign.ids.shape, harm.truncated, benign.truncated)

  mesh = sharding.make_mesh(dict(config.train.get("mesh", {}) or {}))
  batcher = make_batcher(data, config, num_shards=sharding.batch_size_divisor(mesh),
                         extra_harmful=flagged)
  row_of = {int(r): i for i, r in enumerate(harm_rows)}
  brow_of = {int(r): i for i, r in enumerate(benign_rows)}
  unsafe_prob = None
  if config.probe.use == "weight_pairs":
    unsafe_prob = probe_lib.score_prompts(
        params, cfg, probe["probe"], *probe_lib.encode_prompts(tok, data.texts(harm_rows),
                                                               dc.max_len))

  def batch_fn(step: int) -> dict[str, np.ndarray]:
    b = batcher.batch(step)
    hi = np.asarray([row_of[int(r)] for r in b.harmful_idx])
    h = harm.take(hi)
    n = benign.take(np.asarray([brow_of[int(r)] for r in b.benign_idx]))
    weight = b.pair_weight
    if unsafe_prob is not None:
      weight = probe_lib.probe_pair_weights(unsafe_prob[[row_of[int(r)] for r in b.harmful_idx]],
                                            b.pair_index, weight)
    return {"harm_ids": h["ids"], "harm_mask": h["mask"], "harm_target_mask": h["target_mask"],
            "harm_prompt_end": h["prompt_end"],
            "harm_weight": harm_weight[hi],
            "pair_index": b.pair_index, "pair_weight": np.asarray(weight, np.float32),
            "pair_valid": b.pair_valid,
            "benign_ids": n["ids"], "benign_mask": n["mask"], "benign_target_mask": n["target_mask"]}

  aux = build_aux(config.loss, tok, probe=_probe_for_scorer(config, probe),
                  classifier=_classifier_stage(config, workdir, params, tok, data, base_answers))
  key = jax.random.key(config.seed)
  adapters0 = adapters_lib.init_adapters(config.adapters, cfg, params, key)
  summary = adapters_lib.param_summary(adapters0, params)
  logging.info("Trainable params: %d (%.2f%% of %d).", summary["trainable"],
               summary["trainable_pct"], summary["model"])

  def loss_fn(trainable, frozen, batch, rng):
    return total_loss(trainable, frozen["base"], batch, model_cfg=cfg, adapter_cfg=config.adapters,
                      loss_cfg=config.loss, aux=frozen["aux"], rng=rng)

  frozen_axes = {f"base/{k}": v for k, v in sharding.model_logical_axes(cfg).items()}
  t0 = time.time()
  trained, history = fit(loss_fn, adapters0, batch_fn, config, workdir,
                         frozen={"base": params, "aux": aux}, frozen_axes=frozen_axes, mesh=mesh)
  train_seconds = time.time() - t0  # this process's share when the run was resumed
  trained = jax.device_get(trained)
  malloc.release()

  adapted, embed_fn = gen_job.apply_trained(params, trained, config.adapters)
  after = _answers(eval_sets, lambda prompts: gen(adapted, cfg, prompts=prompts,
                                                  embed_fn=embed_fn))
  report = {
      "model": mc.name_or_path,
      "before": report_lib.refusal_summary(before),
      "after": report_lib.refusal_summary(after),
      "trainable_params": int(summary["trainable"]),
      "total_params": int(summary["model"]),
      "lora_params": int(summary["lora"]),
      "embed_mlp_params": int(summary["embed_mlp"]),
      "train_seconds": float(train_seconds),
      "steps": int(config.train.steps),
      "final_metrics": history[-1] if history else {},
      "tau": float(dc.tau),
  }
  if primary:
    gen_job.write_jsonl(os.path.join(workdir, "answers_after.jsonl"), after)
    report["plots"] = [report_lib.plot_refusal_rates(workdir, report)]
    report_lib.write_report(workdir, report, before, after)
    _print_summary(report)
  return report


# ----------------------------------------------------------------------------
# Stages.


def _benign_rows(data: PreparedData) -> np.ndarray:
  return np.concatenate([data.splits["train_benign"], data.splits["train_borderline"]])


def _eval_sets(data: PreparedData, config) -> dict[str, list[str]]:
  """Evaluation prompts per report split, a deterministic subsample of at most max_per_split."""
  cap = int(config.eval.max_per_split)
  out = {}
  for name, split in EVAL_SPLITS.items():
    rows = np.asarray(data.splits.get(split, []), dtype=np.int64)
    if not len(rows) and split.startswith("eval_only"):
      continue
    if cap and len(rows) > cap:
      rows = np.sort(np.random.default_rng(config.eval.seed).choice(rows, cap, replace=False))
    out[name] = data.texts(rows)
  return out


def _answers(eval_sets: dict[str, list[str]], generate) -> list[dict[str, Any]]:
  """Generates for every split in one pass (fewer, fuller batches) and judges each answer."""
  prompts = [p for ps in eval_sets.values() for p in ps]
  completions = generate(prompts)
  rows, i = [], 0
  for split, ps in eval_sets.items():
    for p in ps:
      c = completions[i]
      rows.append({"split": split, "prompt": p, "completion": c, "refused": judge.is_refusal(c)})
      i += 1
  return rows


def _cached_answers(path: str, eval_sets, generate, primary: bool) -> list[dict[str, Any]]:
  want = [(s, p) for s, ps in eval_sets.items() for p in ps]
  if os.path.exists(path):
    rows = _read_jsonl(path)
    if [(r["split"], r["prompt"]) for r in rows] == want:
      logging.info("Reusing %s.", path)
      return rows
  rows = _answers(eval_sets, generate)
  if primary:
    gen_job.write_jsonl(path, rows)
  return rows


def _cached_base_answers(workdir: str, prompts: list[str], generate) -> list[str]:
  """The base model's own greedy answers: the targets L_capability keeps the model close to."""
  path = os.path.join(workdir, "base_answers.jsonl")
  if os.path.exists(path):
    rows = _read_jsonl(path)
    if [r["prompt"] for r in rows] == prompts:
      return [r["completion"] for r in rows]
  logging.info("Generating base-model answers for %d benign/borderline prompts.", len(prompts))
  answers = generate(prompts)
  if sharding.is_primary():
    gen_job.write_jsonl(path, [{"prompt": p, "completion": a} for p, a in zip(prompts, answers)])
  return answers


def _refusal_targets(data: PreparedData, rows: Sequence[int]) -> list[str]:
  """A refusal per harmful prompt: of its category when one exists, else a general one.

  The choice hashes the prompt id, so it is stable across runs and resumes.
  """
  by_cat: dict[str, list[str]] = {}
  for r in data.refusal_records:
    by_cat.setdefault(r.category or "general", []).append(r.text)
  general = by_cat.get("general") or [r.text for r in data.refusal_records]
  out = []
  for row in rows:
    p = data.prompts[int(row)]
    pool = by_cat.get(p.category, []) + general
    h = int(hashlib.sha256(p.id.encode()).hexdigest(), 16)
    out.append(pool[h % len(pool)])
  return out


def _probe_stage(config, workdir, data, params, cfg, tok, harm_rows, benign_rows):
  """Trains the per-layer safety probe (harmful vs benign) and writes its report."""
  if not config.probe.get("train", True):
    return None
  out_dir = os.path.join(workdir, "probe")
  os.makedirs(out_dir, exist_ok=True)
  n = int(config.probe.max_prompts)
  rng = np.random.default_rng(config.seed)
  take = lambda rows: np.sort(rng.choice(rows, min(n, len(rows)), replace=False))

  def encoded(h_rows, b_rows):
    ids, mask = probe_lib.encode_prompts(tok, data.texts(np.concatenate([h_rows, b_rows])),
                                         config.data.max_len)
    return ids, mask, np.r_[np.ones(len(h_rows)), np.zeros(len(b_rows))].astype(np.float32)

  ho_b = np.concatenate([data.splits["eval_benign"], data.splits["eval_borderline"]])
  train = encoded(take(harm_rows), take(benign_rows))
  heldout = encoded(take(data.splits["heldout_intent"]), take(ho_b))
  res = probe_lib.fit_safety_probe(params, cfg, train, heldout, out_dir, probe_cfg=config.probe)
  logging.info("Safety probe: best layer %d, held-out accuracy %.3f.", res["best_layer"],
               float(res["heldout_acc"][res["best_layer"]]))
  return res


def check_probe_use(probe_cfg) -> None:
  """Raises ValueError for a probe.use the main job cannot honour."""
  use = probe_cfg.use or "off"
  if use not in probe_lib.PROBE_USES:
    raise ValueError(f"probe.use={use!r}; expected one of {', '.join(probe_lib.PROBE_USES)}")
  if use == "flag_unlabeled" and not probe_cfg.get("train", True):
    raise ValueError("probe.use='flag_unlabeled' needs probe.train=True: the probe trained in "
                     "this run is what flags the unlabeled prompts.")


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


def _flag_unlabeled_stage(config, workdir, data, params, cfg, tok, probe
                          ) -> tuple[np.ndarray, np.ndarray]:
  """probe.use="flag_unlabeled": (rows, harm weights) of the flagged train_unlabeled prompts.

  Flagged prompts train as harmful (a refusal target, L_safety weighted by their
  probability, consistency pairs with their training neighbours); unflagged ones are not
  trained on at all, as nothing says they are benign.
  """
  none = np.zeros(0, np.int64), np.zeros(0, np.float32)
  if config.probe.use != "flag_unlabeled":
    return none
  rows = np.asarray(data.splits.get(UNLABELED_SPLIT, []), np.int64)
  if not len(rows):
    logging.warning("probe.use='flag_unlabeled' but no unlabeled prompts were loaded (a source "
                    "with ?label=unlabeled): training as with probe.use='off'.")
    return none
  unsafe_prob = probe_lib.score_prompts(
      params, cfg, probe["probe"],
      *probe_lib.encode_prompts(tok, data.texts(rows), config.data.max_len),
      batch_size=int(config.probe.get("batch_size", 16)))
  threshold = float(config.probe.threshold)
  flagged, weight, record = flag_unlabeled_rows(data.prompts, rows, unsafe_prob, threshold)
  logging.info("Safety probe flagged %d of %d unlabeled prompts (unsafe probability >= %.2f); "
               "they train as harmful, the rest are not trained on.", len(flagged), len(rows),
               threshold)
  if sharding.is_primary():
    out_dir = os.path.join(workdir, "probe")
    os.makedirs(out_dir, exist_ok=True)
    dump_json(os.path.join(out_dir, FLAGGED_FILE), record)
  return flagged, weight


def _classifier_stage(config, workdir, params, tok, data, base_answers):
  """Refusal classifier for loss.scorer='classifier': built-in refusals (label 1) vs the
  base model's own answers (label 0), as expected-token-embedding features."""
  if config.loss.scorer != "classifier":
    return None
  from semsafe_jax.probes import refusal as refusal_lib  # pylint: disable=g-import-not-at-top
  n = config.data.max_response_tokens

  def ids_mask(texts):
    rows = [tok(t, add_special_tokens=False)["input_ids"][:n] for t in texts]
    ids, mask = np.zeros((len(rows), n), np.int32), np.zeros((len(rows), n), bool)
    for i, r in enumerate(rows):
      ids[i, :len(r)], mask[i, :len(r)] = r, True
    return ids, mask

  lc = config.loss
  clf, metrics = refusal_lib.train_refusal_classifier(
      params["embed"]["embedding"], *ids_mask(data.refusals), *ids_mask(base_answers),
      hidden=lc.classifier_hidden, steps=lc.classifier_steps, lr=lc.classifier_lr, seed=config.seed)
  refusal_lib.save_classifier(os.path.join(workdir, "refusal_classifier.npz"), clf)
  logging.info("Refusal classifier: train accuracy %.3f.", metrics["train_acc"])
  return clf


def _probe_for_scorer(config, probe):
  if config.loss.scorer != "probe":
    return None
  if probe is None:
    raise ValueError("loss.scorer='probe' needs probe.train=True.")
  return {**probe["probe"], "layer": np.int32(probe["best_layer"])}


def _print_summary(report: dict[str, Any]) -> None:
  print("\nRefusal rate (string-match judge, 95% CI):")
  print(f"{'split':<18}{'before':>22}{'after':>22}")
  for split, a in report["after"].items():
    b = report["before"].get(split, {})
    fmt = lambda s: (f"{100 * s['refusal_rate']:5.1f}% [{100 * s['ci95'][0]:.0f}-"
                     f"{100 * s['ci95'][1]:.0f}]" if s else "-")
    print(f"{split:<18}{fmt(b):>22}{fmt(a):>22}")
  print(f"trainable params: {report['trainable_params']:,} / {report['total_params']:,}; "
        f"training {report['train_seconds']:.0f} s")


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
