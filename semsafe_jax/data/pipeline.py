"""prepare_data: sources -> embeddings -> neighbours -> splits, written to the workdir.

Outputs in W (rows of every array follow the order of W/prompts.jsonl):
  prompts.jsonl        id, text, label, category, intent_id, style, source
  pairs.npz            neighbors int32 [N,K] (-1 padded), sims float32 [N,K], valid bool [N,K]
  splits.json          {split name: [prompt ids]} (see splits.py for the names)
  split_report.json    counts, linked intents held out together, leakage checks
  mining_stats.json    pairs-per-prompt histogram, coverage, tau sweep, load counts
  mining_stats.png     the histogram and the tau sweep
  cache/               SBERT embeddings keyed by (model, texts)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np
from absl import logging
from etils import epath

from semsafe_jax import files
from semsafe_jax.data import builtin, embed, loaders, neighbors
from semsafe_jax.data import splits as splits_lib
from semsafe_jax.data.batches import PairBatcher
from semsafe_jax.data.schema import DataError, Prompt, check_trainable

PAIR_STATS_STEPS = 50  # batches make_batcher samples to estimate pairs per step


@dataclasses.dataclass(frozen=True)
class PreparedData:
  prompts: list[Prompt]
  emb_NxD: np.ndarray  # float32, unit rows
  neighbors: neighbors.Neighbors
  splits: dict[str, np.ndarray]  # split name -> sorted prompt rows
  refusals: list[str]
  refusal_records: list[builtin.Refusal]
  mining_stats: dict[str, Any]
  split_report: dict[str, Any]
  workdir: epath.Path  # a local folder or gs://...

  def texts(self, rows: Any) -> list[str]:
    return [self.prompts[int(i)].text for i in np.asarray(rows).reshape(-1)]


dump_json = files.dump_json  # indented JSON, atomic where the file system allows


def write_prompts(path: files.PathLike, prompts: list[Prompt]) -> None:
  files.write_jsonl(path, [p.to_dict() for p in prompts])


def _plain(mapping: Any) -> dict[str, Any]:
  return mapping.to_dict() if hasattr(mapping, "to_dict") else dict(mapping)


def prepare_data(config: Any, workdir: str | os.PathLike[str], *, write: bool = True
                 ) -> PreparedData:
  """Loads config.data.sources, embeds, mines, splits; writes and returns the results.

  write=False (every process but the first of a multi-host job) computes the same
  results without writing them.
  """
  cfg = config.data
  workdir = epath.Path(workdir)
  if write:
    files.makedirs(workdir)
  extra_eval_only = list(cfg.get("eval_only_sources", []))

  sources = [cfg.sources] if isinstance(cfg.sources, str) else list(cfg.sources)
  unlabeled = cfg.get("unlabeled_sources", ()) or ()
  sources += [_as_unlabeled(s) for s in ([unlabeled] if isinstance(unlabeled, str) else unlabeled)]
  prompts, load_summaries = loaders.load_sources(
      sources, on_bad_rows=cfg.get("on_bad_rows", "error"),
      columns=_plain(cfg.get("columns", {})), default_label=cfg.get("default_label", ""))
  labels = [p.label for p in prompts]

  emb_NxD = embed.embed_texts([p.text for p in prompts], cfg.sbert,
                              batch_size=cfg.get("embed_batch_size", 64),
                              cache_dir=cfg.get("cache_dir") or workdir / "cache",
                              device=cfg.get("embed_device", "cpu"), write_cache=write)

  nb, topk = neighbors.mine_neighbors(emb_NxD, cfg.k, cfg.tau,
                                      labels if cfg.get("same_label_only", True) else None,
                                      neighbors.IndexOptions.from_config(cfg))
  stats = neighbors.mining_stats(topk, cfg.tau, labels=labels)
  stats["same_label_only"] = bool(cfg.get("same_label_only", True))
  stats["sbert"] = cfg.sbert
  stats["loads"] = load_summaries

  split_rows, report = splits_lib.make_splits(
      prompts, emb_NxD, tau=cfg.tau, seed=cfg.get("split_seed", 0),
      heldout_intent_frac=cfg.heldout_intent_frac, heldout_phrasing_frac=cfg.heldout_phrasing_frac,
      eval_frac=cfg.get("eval_frac", 0.5), extra_eval_only=extra_eval_only,
      exclude_near_eval_only=cfg.get("exclude_near_eval_only", True),
      lookalike_val_frac=cfg.get("lookalike_val_frac", 0.25))

  refusal_records = builtin.load_refusals(cfg.get("refusals", "builtin"))

  if write:
    write_prompts(workdir / "prompts.jsonl", prompts)
    neighbors.save_neighbors(workdir / "pairs.npz", nb)
    dump_json(workdir / "splits.json", splits_lib.split_ids(prompts, split_rows))
    dump_json(workdir / "split_report.json", report)
    neighbors.save_stats(stats, workdir / "mining_stats.json", workdir / "mining_stats.png")
  logging.info("Data prepared in %s: %d prompts, %d train harmful, %d mined pairs", workdir,
               len(prompts), len(split_rows["train"]), stats["total_pairs"])
  return PreparedData(prompts=prompts, emb_NxD=emb_NxD, neighbors=nb, splits=split_rows,
                      refusals=[r.text for r in refusal_records], refusal_records=refusal_records,
                      mining_stats=stats, split_report=report, workdir=workdir)


def _as_unlabeled(spec: str) -> str:
  """A source spec whose prompts load with no label (label=unlabeled)."""
  if "label=" in spec:
    raise DataError(f"data.unlabeled_sources entry {spec!r} sets a label; these sources load "
                    "as unlabeled")
  return spec + ("&" if "?" in spec else "?") + "label=unlabeled"


def make_batcher(data: PreparedData, config: Any, num_shards: int = 1,
                 extra_harmful: Sequence[int] = ()) -> PairBatcher:
  """The training batcher over the train splits, sized by config.data, seeded by config.seed.

  extra_harmful: train_unlabeled rows to train on as harmful (the probe-flagged ones).
  """
  cfg = config.data
  extra_harmful = np.asarray(extra_harmful, np.int64)
  # Anything else would put evaluation prompts into training.
  stray = np.setdiff1d(extra_harmful, data.splits.get(splits_lib.UNLABELED_SPLIT, []))
  if stray.size:
    raise DataError(f"extra_harmful rows {stray[:5].tolist()} are not in "
                    f"{splits_lib.UNLABELED_SPLIT}")
  harmful = np.union1d(data.splits["train"], extra_harmful)
  # Look-alikes (benign requests on a harmful topic) are an over-refusal risk like
  # borderline prompts, so they share the borderline block of each step.
  risky = np.union1d(data.splits["train_borderline"], data.splits.get("train_lookalike", []))
  benign = np.union1d(data.splits["train_benign"], risky)
  extra = list(cfg.get("eval_only_sources", []))
  check_trainable(data.prompts, harmful, extra)
  check_trainable(data.prompts, benign, extra)
  batcher = PairBatcher(harmful, benign, data.neighbors, cfg.tau,
                        harmful_per_step=cfg.harmful_per_step,
                        benign_per_step=cfg.benign_per_step, pairs_per_step=cfg.pairs_per_step,
                        num_shards=num_shards,
                        neighbors_per_anchor=cfg.get("neighbors_per_anchor", 3),
                        pairable_anchor_frac=cfg.get("pairable_anchor_frac", 0.5),
                        seed=config.seed, borderline_idx=risky,
                        borderline_share=_share(cfg.get("borderline_share", -1.0)))
  # Data only, before any model work (methods that train on pairs warn from their metrics:
  # train/monitor.py).
  stats = batcher.pair_stats(PAIR_STATS_STEPS)
  logging.info("Batches carry %.2f valid consistency pairs per step (first %d batches, %d "
               "without any; data.pairs_per_step=%d).", stats["pairs_valid_mean"],
               PAIR_STATS_STEPS, stats["steps_without_pairs"], stats["pairs_per_step"])
  return batcher


def _share(value: Any) -> float | None:
  """config.data.borderline_share: a share in [0, 1], or < 0 for "in proportion to the data"."""
  return None if value is None or float(value) < 0 else float(value)
