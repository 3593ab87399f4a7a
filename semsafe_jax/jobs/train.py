"""The main job, the same for every method: data -> model -> method.prepare -> fit -> evaluate.

  python -m semsafe_jax.main --config=configs/default.py --workdir=runs/demo
  python -m semsafe_jax.main --config=configs/methods/lora_sft.py --workdir=runs/sft

`config.method.name` picks the method (semsafe_jax/methods/). Every stage caches its
output in the workdir, so a re-run (or a resume after a crash) skips what is done and
training continues from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from semsafe_jax import adapters as adapters_lib
from semsafe_jax import files, malloc, methods, validate
from semsafe_jax.data.batches import check_block_sizes
from semsafe_jax.data.pipeline import PreparedData, prepare_data
from semsafe_jax.data.schema import DataError
from semsafe_jax.eval import base as eval_lib
from semsafe_jax.eval import judge
from semsafe_jax.eval import report as report_lib
from semsafe_jax.eval.evaluators import refusal_splits
from semsafe_jax.files import read_jsonl, write_jsonl
from semsafe_jax.methods.context import Context
from semsafe_jax.models import generate as gen_lib
from semsafe_jax.models import transformer
from semsafe_jax.models.loading import load_pretrained
from semsafe_jax.probes import gate as gate_lib
from semsafe_jax.retention import aligned as aligned_lib
from semsafe_jax.train import checkpoint as ckpt_lib
from semsafe_jax.train import monitor, sharding
from semsafe_jax.train.trainer import fit

HISTORY_FILE = "train_history.jsonl"  # one JSON of metrics per step

# The report's before/after answers: refusal_splits' groups (their data splits), in this
# order, less the training prompts and the look-alikes held back for decisions. Groups whose
# split is empty (no look-alikes, no evaluation-only sources) are left out.
EVAL_SPLITS = {g: refusal_splits.GROUPS[g] for g in (
    "heldout_intent", "heldout_phrasing", "borderline", "benign", "lookalike",
    "eval_only_harmful", "eval_only_borderline", "eval_only_benign")}


def run(config, workdir: str) -> dict[str, Any]:
  validate.validate(config)  # as the command line does, for library callers: before any work
  method = methods.get(config.method.name)
  eval_lib.check_config(config)
  sharding.initialize_distributed(config)
  mesh = sharding.make_mesh(dict(config.train.get("mesh", {}) or {}))
  dc = config.data
  check_block_sizes(dc.harmful_per_step, dc.benign_per_step, sharding.batch_size_divisor(mesh))
  ckpt_lib.prepare_workdir(workdir, config)  # refuse a changed config before any work
  clock = _Stages()
  ctx = method_context(config, workdir, mesh)
  data, model_cfg, params, aligned, tokenizer = (ctx.data, ctx.model_cfg, ctx.params,
                                                 ctx.aligned, ctx.tokenizer)
  ec = config.eval
  clock.done("data_and_model")

  # The frozen base model, as every evaluation sees it; its answers are cached on disk.
  base_m = eval_lib.ModelUnderTest(
      "before", params, model_cfg, tokenizer, batch_size=ec.batch_size,
      max_batch_tokens=ec.max_batch_tokens,
      cache_file=eval_lib.base_cache_file(config, workdir, aligned.identity if aligned else ""))
  eval_sets = _eval_sets(data, config)
  before = _cached_answers(os.path.join(workdir, "answers_before.jsonl"), eval_sets,
                           lambda ps: base_m.generate(ps, ec.max_new_tokens), ctx.primary)
  # Between stages whose working sets differ, the caching allocator (malloc.py)
  # hands its free blocks back, so it never holds more than one stage's.
  malloc.release()
  ctx.probe  # pylint: disable=pointless-statement; the probe report is part of every run
  gate = _gate(ctx) if config.gate.use else None
  clock.done("before_and_probe")
  prepared = method.prepare(ctx)
  _drop_compiled()
  clock.done("method_prepare")

  summary = adapters_lib.param_summary(prepared.trainable, params)
  logging.info("Method %s: %d trainable params (%.2f%% of %d).", config.method.name,
               summary["trainable"], summary["trainable_pct"], summary["model"])
  fit_stats: dict[str, int] = {}
  trained, history = fit(prepared.loss_fn, prepared.trainable, prepared.batch_fn, config,
                         workdir, frozen=prepared.frozen, frozen_axes=prepared.frozen_axes,
                         mesh=mesh, stats=fit_stats)
  train_seconds = clock.done("train")  # this process's share when the run was resumed
  method_report = prepared.report
  if prepared.finalize is not None:
    trained = prepared.finalize(trained)
  del prepared
  trained = jax.device_get(trained)
  _drop_compiled()
  decode_traces_before = len(gen_lib.traces())

  # Unmerged: the evaluations hold the base model beside the adapted one (KL, "before"
  # answers), and merged kernels would be a second copy of the model in host memory.
  adapted, embed_fn = adapters_lib.apply_trained(params, trained, config.adapters, merge=False)
  if aligned is None and transformer.unrolls_layers(model_cfg, differentiated=False):
    # An unrolled decoder slices every layer out of the stacked weights on each call: a
    # copy of the model among its temporaries. Held per layer instead (one copy, shared
    # by both models), the decoder reads them in place. The stacked arrays go.
    params, adapted = transformer.unstack_shared(model_cfg.num_layers, params, adapted)
    ctx.params = base_m.params = params
  after_m = eval_lib.ModelUnderTest("after", adapted, model_cfg, tokenizer, embed_fn=embed_fn,
                                    batch_size=ec.batch_size,
                                    max_batch_tokens=ec.max_batch_tokens)
  after = _answers(eval_sets, lambda ps: after_m.generate(ps, ec.max_new_tokens))
  models, gated = [base_m, after_m], None
  if gate is not None:
    # base_m.params read at call time: the per-layer arrays once the decoder unrolls.
    gated_m = eval_lib.GatedModel("gated", base_m, after_m, lambda ps: gate.flags(
        base_m.params, model_cfg, tokenizer, ps, batch_size=int(config.probe.batch_size)))
    gated = _answers(eval_sets, lambda ps: gated_m.generate(ps, ec.max_new_tokens))
    for r, on in zip(gated, gated_m.flags([r["prompt"] for r in gated])):
      r["adapters"] = bool(on)
    models.append(gated_m)
  evals, _ = eval_lib.run_evals(
      config, eval_lib.EvalContext(config=config, workdir=workdir, data=data, base=base_m),
      models)
  clock.done("evaluate")

  cons = monitor.consistency_summary(history)
  steps_run = len(history)
  decode_traces = gen_lib.traces()[decode_traces_before:]
  report = {
      "method": config.method.name,
      "seed": int(config.seed),
      "model": config.model.name_or_path,
      "before": report_lib.refusal_summary(before),
      "after": report_lib.refusal_summary(after),
      **({} if gated is None else {"gated": report_lib.refusal_summary(gated),
                                   "gate": _gate_report(gate, gated)}),
      "evals": evals,
      "trainable_params": int(summary["trainable"]),
      "total_params": int(summary["model"]),
      "lora_params": int(summary["lora"]),
      "embed_mlp_params": int(summary["embed_mlp"]),
      "full_params": int(summary["full"]),
      "train_seconds": float(train_seconds),
      "steps": int(config.train.steps),
      "final_metrics": history[-1] if history else {},
      "tau": float(config.data.tau),
      "pairs_valid_mean": cons["pairs_valid_mean"],
      "consistency_share_mean": cons["consistency_share_mean"],
      "method_report": method_report,
      "config": ckpt_lib.config_to_dict(config),
      # start_step: where this invocation began (the checkpoint it resumed from, or 0);
      # steps_run: the steps it trained; step_traces: how often the train step compiled.
      "train": {"steps": int(config.train.steps), "steps_run": steps_run,
                "start_step": fit_stats["start_step"],
                "step_traces": fit_stats["step_traces"],
                "seconds": float(train_seconds),
                # Includes the first step's compile: an upper bound on the steady cost.
                "seconds_per_step": (float(train_seconds) / steps_run if steps_run else None),
                "pairs_valid_mean": cons["pairs_valid_mean"],
                "consistency_share_mean": cons["consistency_share_mean"],
                "final_metrics": history[-1] if history else {}},
      "efficiency": {"stage_seconds": clock.seconds,
                     "peak_rss_gb": _peak_rss_gb(),
                     "stage_peak_rss_gb": clock.peak_gb,
                     # Compilations of the decoder in the evaluation stage, and for how many
                     # distinct (model, batch rows, prompt bucket, max new tokens, sampling).
                     "decode_traces": len(decode_traces),
                     "decode_keys": len(set(decode_traces)),
                     "trainable_params": int(summary["trainable"]),
                     "total_params": int(summary["model"])},
  }
  if ctx.primary:
    write_jsonl(os.path.join(workdir, "answers_after.jsonl"), after)
    if gated is not None:
      write_jsonl(os.path.join(workdir, "answers_gated.jsonl"), gated)
    _write_history(os.path.join(workdir, HISTORY_FILE), history)
    report["plots"] = [report_lib.plot_refusal_rates(workdir, report)]
    report_lib.write_report(workdir, report, before, after)
    _print_summary(report)
  return report


def method_context(config, workdir: str, mesh: jax.sharding.Mesh) -> Context:
  """Data, the frozen model and the host stages every method's `prepare` starts from."""
  data = prepare_data(config, workdir, write=sharding.is_primary())
  malloc.release()  # the sentence encoder's buffers, before the model moves in
  _check_trainable_data(config, data)
  mc = config.model
  pre = load_pretrained(mc.name_or_path, dtype=mc.dtype, param_dtype=mc.param_dtype, remat=mc.remat,
                        layer_loop=mc.layer_loop)
  # The retention scenario fine-tunes a safety-trained model: that is then the frozen
  # model of every stage, "before" included (semsafe_jax/retention). None otherwise.
  aligned = aligned_lib.load_for_run(config, workdir, pre.params, pre.cfg, data,
                                     sharding.is_primary())
  model_cfg = pre.cfg if aligned is None else aligned.cfg
  params = jax.device_put(pre.params if aligned is None else aligned.params)
  return Context(config, workdir, data, model_cfg, params, pre.tokenizer, mesh, aligned=aligned)


def _gate(ctx: Context) -> gate_lib.Gate:
  """The probe gate of gate.use (probes/gate.py), kept in W/gate.json and refit when the
  gate settings change (they may, in a finished workdir: they are resume-safe)."""
  path = os.path.join(ctx.workdir, gate_lib.GATE_FILE)
  settings = dict(ctx.config.gate.to_dict(), probe=ctx.config.probe.to_dict())
  if files.exists(path):
    got = gate_lib.load(path)
    if got.info.get("settings") == settings:
      logging.info("Reusing the probe gate in %s (layer %d).", path, got.layer)
      return got
  gc = ctx.config.gate
  got = gate_lib.fit(ctx, recall=float(gc.recall), held_back=float(gc.held_back),
                     max_per_split=int(gc.max_per_split))
  got = dataclasses.replace(got, info={**got.info, "settings": settings})
  logging.info("Probe gate: layer %d, threshold %.3f; flagged: %s.", got.layer, got.threshold,
               ", ".join(f"{k} {v:.1%}" for k, v in got.info["flagged"].items()))
  if ctx.primary:
    gate_lib.save(path, got)
  return got


def _gate_report(gate: gate_lib.Gate, gated: list[dict[str, Any]]) -> dict[str, Any]:
  """The gate's settings and, per report split, the share of prompts it gave the adapters."""
  flagged = {}
  for split in dict.fromkeys(r["split"] for r in gated):
    rows = [r for r in gated if r["split"] == split]
    flagged[split] = sum(r["adapters"] for r in rows) / len(rows)
  info = {k: v for k, v in gate.info.items() if k != "settings"}
  return {"layer": gate.layer, "threshold": gate.threshold, "fit": info,
          "flagged": flagged}


def _check_trainable_data(config, data: PreparedData) -> None:
  """Every method trains on both sides; say so before any model work."""
  if not len(data.splits["train"]):
    raise DataError(f"config.data.sources={tuple(config.data.sources)!r}: no harmful prompts "
                    "to train on; add a source with some (e.g. builtin)")
  n_safe = len(data.splits["train_benign"]) + len(data.splits["train_borderline"])
  if config.data.benign_per_step and not n_safe:
    raise DataError(f"config.data.sources={tuple(config.data.sources)!r}: no benign or "
                    "borderline prompts to train on; add a source with some (e.g. builtin), "
                    "or set --config.data.benign_per_step=0")


def _drop_compiled() -> None:
  """Frees what the next stage does not reuse: every compiled program (an unrolled decoder
  is about 80 MB of machine code per prompt bucket for SmolLM2-135M, the train step
  another) and the caching allocator's free blocks. The next stage's peak starts lower."""
  jax.clear_caches()
  malloc.release()


def _peak_rss_gb() -> float:
  # Rounded like the per-stage figures, so that the last stage never reads above the total.
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


class _Stages:
  """Wall seconds per stage of this process, and its peak host memory when each ended
  (a running maximum: the stage where it grows is the one that set it)."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self.peak_gb: dict[str, float] = {}
    self._t = time.time()

  def done(self, name: str) -> float:
    now = time.time()
    self.seconds[name] = round(now - self._t, 2)
    self.peak_gb[name] = _peak_rss_gb()
    self._t = now
    return self.seconds[name]


def _write_history(path: str, history: list[dict[str, float]]) -> None:
  """Merges this process's steps into the run's history (a resumed run adds its own)."""
  rows = read_jsonl(path) if files.exists(path) else []
  new = {int(m["step"]) for m in history}
  rows = [r for r in rows if int(r["step"]) not in new] + list(history)
  write_jsonl(path, sorted(rows, key=lambda r: int(r["step"])))


# ----------------------------------------------------------------------------
# Evaluation on the built-in splits.


def _eval_sets(data: PreparedData, config) -> dict[str, list[str]]:
  """Evaluation prompts per report split, a deterministic subsample of at most max_per_split."""
  cap = int(config.eval.max_per_split)
  out = {}
  for name, split in EVAL_SPLITS.items():
    rows = np.asarray(data.splits.get(split, []), dtype=np.int64)
    if not len(rows):  # e.g. no look-alikes or eval-only sources in the data
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
  if files.exists(path):
    rows = read_jsonl(path)
    if [(r["split"], r["prompt"]) for r in rows] == want:
      logging.info("Reusing %s.", path)
      return rows
  rows = _answers(eval_sets, generate)
  if primary:
    write_jsonl(path, rows)
  return rows


def _print_summary(report: dict[str, Any]) -> None:
  models = report_lib.summary_models(report)
  print(f"\nMethod {report['method']}. Refusal rate (string-match judge, 95% CI):")
  print(f"{'split':<18}" + "".join(f"{m:>22}" for m in models))
  fmt = lambda s: (f"{100 * s['refusal_rate']:5.1f}% [{100 * s['ci95'][0]:.0f}-"
                   f"{100 * s['ci95'][1]:.0f}]" if s else "-")
  for split in report["after"]:
    print(f"{split:<18}" + "".join(f"{fmt(report[m].get(split, {})):>22}" for m in models))
  if "gate" in report:
    g = report["gate"]
    print(f"gated: the adapters answer the prompts a probe flags (layer {g['layer']}, threshold "
          f"{g['threshold']:.3f}); share flagged: "
          + ", ".join(f"{k} {100 * v:.0f}%" for k, v in g["flagged"].items()))
  print(f"trainable params: {report['trainable_params']:,} / {report['total_params']:,}; "
        f"training {report['train_seconds']:.0f} s; "
        f"peak host memory {report['efficiency']['peak_rss_gb']:.1f} GB")
