"""Near-duplicate mining: each prompt's top-K neighbours above cosine tau (FAISS).

Vectors are unit-norm, so inner product is cosine. Up to `exact_max` vectors (per
label group) we search exactly with IndexFlatIP; above it an approximate index
(HNSW or IVF-flat) keeps 1M prompts within minutes on a few cores. The benchmark
(benchmarks/bench_mining.py) calls the same `search_topk` as the product.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Sequence

import numpy as np
from absl import logging

from semsafe_jax import files
from semsafe_jax.data.schema import DataError

TAU_SWEEP = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5 ... 0.95
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")
_SEARCH_CHUNK = 65_536  # queries per faiss call: bounds memory, gives progress logs


@dataclasses.dataclass(frozen=True)
class IndexOptions:
  """How to search; see config.data.* of the same names."""

  kind: str = "auto"  # auto | flat | hnsw | ivf
  exact_max: int = 50_000  # auto: exact search up to this many vectors
  approx: str = "ivf"  # what auto uses above exact_max
  hnsw_m: int = 32
  hnsw_ef_construction: int = 64
  hnsw_ef_search: int = 128
  ivf_nlist: int = 0  # 0: about 2 * sqrt(N)
  ivf_nprobe: int = 4
  threads: int = 0  # 0: faiss default (all cores)

  @classmethod
  def from_config(cls, data_cfg: Any) -> "IndexOptions":
    """From config.data; fields it lacks keep their defaults."""
    d = cls()
    get = data_cfg.get
    return cls(kind=get("index", d.kind), exact_max=get("exact_max", d.exact_max),
               approx=get("approx_index", d.approx), hnsw_m=get("hnsw_m", d.hnsw_m),
               hnsw_ef_construction=get("hnsw_ef_construction", d.hnsw_ef_construction),
               hnsw_ef_search=get("hnsw_ef_search", d.hnsw_ef_search),
               ivf_nlist=get("ivf_nlist", d.ivf_nlist), ivf_nprobe=get("ivf_nprobe", d.ivf_nprobe),
               threads=get("faiss_threads", d.threads))


@dataclasses.dataclass(frozen=True)
class TopK:
  """Raw search result, self excluded, before the tau cut; -1 / -inf padded."""

  ids_NxK: np.ndarray  # int64
  sims_NxK: np.ndarray  # float32, descending per row


@dataclasses.dataclass(frozen=True)
class Neighbors:
  """Neighbours above tau: the arrays saved to pairs.npz (rows = prompts)."""

  neighbors_NxK: np.ndarray  # int32, -1 where invalid
  sims_NxK: np.ndarray  # float32 cosine, 0 where invalid
  valid_NxK: np.ndarray  # bool; valid entries form a prefix of each row


def index_kind(n: int, opts: IndexOptions) -> str:
  if opts.kind not in INDEX_KINDS:
    raise DataError(f"config.data.index={opts.kind!r}; expected one of {INDEX_KINDS}")
  if opts.kind != "auto":
    return opts.kind
  return "flat" if n <= opts.exact_max else opts.approx


def _faiss(opts: IndexOptions):
  import faiss  # pylint: disable=g-import-not-at-top; heavy, only needed here.
  if opts.threads > 0:
    faiss.omp_set_num_threads(opts.threads)
  return faiss


def ivf_nlist(n: int, opts: IndexOptions) -> int:
  """Coarse lists: ~2 sqrt(N) balances k-means + routing cost against list scans."""
  nlist = opts.ivf_nlist or int(2 * math.sqrt(n))
  return max(1, min(nlist, n // 39))  # faiss wants >= 39 training points per list


def _search_flat_or_hnsw(emb_NxD: np.ndarray, kk: int, kind: str, opts: IndexOptions
                         ) -> tuple[np.ndarray, np.ndarray]:
  faiss = _faiss(opts)
  n, d = emb_NxD.shape
  if kind == "flat":
    index = faiss.IndexFlatIP(d)
  else:
    index = faiss.IndexHNSWFlat(d, opts.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = opts.hnsw_ef_construction
  index.add(emb_NxD)
  if kind == "hnsw":
    index.hnsw.efSearch = opts.hnsw_ef_search
  sims, ids = np.empty((n, kk), np.float32), np.empty((n, kk), np.int64)
  for start in range(0, n, _SEARCH_CHUNK):
    stop = min(start + _SEARCH_CHUNK, n)
    sims[start:stop], ids[start:stop] = index.search(emb_NxD[start:stop], kk)
  return ids, sims


def _search_ivf_self(emb_NxD: np.ndarray, kk: int, opts: IndexOptions
                     ) -> tuple[np.ndarray, np.ndarray]:
  """IVF-flat self-join, arranged so that a 1M-row join takes minutes on 2 cores.

  Two savings over index.add + index.search: one coarse-quantizer pass serves both
  (the top-1 list for adding, the top-nprobe lists for searching), and queries are
  visited grouped by their first list, so the lists they scan stay in cache.
  """
  faiss = _faiss(opts)
  n, d = emb_NxD.shape
  nlist = ivf_nlist(n, opts)
  nprobe = max(1, min(opts.ivf_nprobe, nlist))
  index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
  index.cp.niter = 10  # centroids only route queries; more k-means rounds buy little
  index.nprobe = nprobe
  t0 = time.perf_counter()
  rng = np.random.default_rng(0)
  index.train(emb_NxD[np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))])
  t1 = time.perf_counter()
  probe_dis_NxP = np.empty((n, nprobe), np.float32)
  probe_NxP = np.empty((n, nprobe), np.int64)
  for start in range(0, n, _SEARCH_CHUNK):
    stop = min(start + _SEARCH_CHUNK, n)
    probe_dis_NxP[start:stop], probe_NxP[start:stop] = index.quantizer.search(
        emb_NxD[start:stop], nprobe)
  first_list_N = np.ascontiguousarray(probe_NxP[:, 0])  # a name: swig_ptr does not keep it alive
  index.add_core(n, faiss.swig_ptr(emb_NxD), None, faiss.swig_ptr(first_list_N))
  order_N = np.argsort(first_list_N, kind="stable")
  t2 = time.perf_counter()
  sims, ids = np.empty((n, kk), np.float32), np.empty((n, kk), np.int64)
  for start in range(0, n, _SEARCH_CHUNK):
    rows = order_N[start:start + _SEARCH_CHUNK]
    sims[rows], ids[rows] = index.search_preassigned(
        np.ascontiguousarray(emb_NxD[rows]), kk, probe_NxP[rows], probe_dis_NxP[rows])
    if n > _SEARCH_CHUNK:
      logging.info("ivf searched %d/%d", min(start + _SEARCH_CHUNK, n), n)
  logging.info("ivf nlist=%d nprobe=%d: train %.1fs, assign+add %.1fs, search %.1fs", nlist,
               nprobe, t1 - t0, t2 - t1, time.perf_counter() - t2)
  return ids, sims


def search_topk(emb_NxD: np.ndarray, k: int, opts: IndexOptions = IndexOptions(),
                kind: str | None = None) -> TopK:
  """Top-k inner-product neighbours of every row among the others (self excluded).

  The one mining entry point: the product (via `mine_neighbors`) and the benchmark
  both call it. `kind` overrides the choice made from `opts` and the row count.
  """
  emb_NxD = np.ascontiguousarray(emb_NxD, dtype=np.float32)
  n = emb_NxD.shape[0]
  kind = kind or index_kind(n, opts)
  if n == 0 or k <= 0:
    return TopK(np.full((n, max(k, 0)), -1, np.int64), np.full((n, max(k, 0)), -np.inf, np.float32))
  t0 = time.perf_counter()
  kk = min(k + 1, n)  # one extra: self usually comes back first
  if kind in ("flat", "hnsw"):
    ids, sims = _search_flat_or_hnsw(emb_NxD, kk, kind, opts)
  elif kind == "ivf":
    ids, sims = _search_ivf_self(emb_NxD, kk, opts)
  else:
    raise DataError(f"Unknown index kind {kind!r}; expected flat | hnsw | ivf")
  logging.info("%s search over %d vectors: %.1fs", kind, n, time.perf_counter() - t0)
  return _drop_self(ids, sims, k)


def _drop_self(ids_NxM: np.ndarray, sims_NxM: np.ndarray, k: int) -> TopK:
  """Removes each row's own index (wherever it landed) and pads to k columns."""
  n = ids_NxM.shape[0]
  keep_NxM = (ids_NxM != np.arange(n)[:, None]) & (ids_NxM >= 0)
  order_NxM = np.argsort(~keep_NxM, axis=1, kind="stable")  # kept entries first, order preserved
  ids_NxM = np.take_along_axis(np.where(keep_NxM, ids_NxM, -1), order_NxM, axis=1)
  sims_NxM = np.take_along_axis(np.where(keep_NxM, sims_NxM, -np.inf), order_NxM, axis=1)
  pad = max(0, k - ids_NxM.shape[1])
  ids_NxK = np.pad(ids_NxM, ((0, 0), (0, pad)), constant_values=-1)[:, :k]
  sims_NxK = np.pad(sims_NxM, ((0, 0), (0, pad)), constant_values=-np.inf)[:, :k]
  return TopK(ids_NxK, sims_NxK.astype(np.float32))


def search_topk_grouped(emb_NxD: np.ndarray, k: int, groups: Sequence[Any] | None,
                        opts: IndexOptions = IndexOptions()) -> TopK:
  """`search_topk` within each group (e.g. label) separately; ids stay global."""
  if groups is None:
    return search_topk(emb_NxD, k, opts)
  groups_N = np.asarray(groups)
  ids_NxK = np.full((len(groups_N), k), -1, np.int64)
  sims_NxK = np.full((len(groups_N), k), -np.inf, np.float32)
  for g in np.unique(groups_N):
    rows = np.flatnonzero(groups_N == g)
    sub = search_topk(emb_NxD[rows], k, opts)
    ids_NxK[rows] = np.where(sub.ids_NxK >= 0, rows[np.maximum(sub.ids_NxK, 0)], -1)
    sims_NxK[rows] = sub.sims_NxK
  return TopK(ids_NxK, sims_NxK)


def search_against(queries_QxD: np.ndarray, base_BxD: np.ndarray, k: int,
                   opts: IndexOptions = IndexOptions()) -> TopK:
  """Top-k inner-product neighbours of each query among the base rows (ids index `base`).

  Mines an unlabelled pool against the labelled training prompts: exact up to
  `exact_max` base vectors, HNSW above (the pool is queried once, so no IVF self-join).
  """
  queries_QxD = np.ascontiguousarray(queries_QxD, dtype=np.float32)
  base_BxD = np.ascontiguousarray(base_BxD, dtype=np.float32)
  q, n = queries_QxD.shape[0], base_BxD.shape[0]
  if q == 0 or n == 0 or k <= 0:
    return TopK(np.full((q, max(k, 0)), -1, np.int64), np.full((q, max(k, 0)), -np.inf, np.float32))
  faiss = _faiss(opts)
  d = base_BxD.shape[1]
  if n <= opts.exact_max or opts.kind == "flat":
    index = faiss.IndexFlatIP(d)
  else:
    index = faiss.IndexHNSWFlat(d, opts.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = opts.hnsw_ef_construction
  index.add(base_BxD)
  if hasattr(index, "hnsw"):
    index.hnsw.efSearch = opts.hnsw_ef_search
  kk = min(k, n)
  sims, ids = index.search(queries_QxD, kk)
  pad = k - kk
  return TopK(np.pad(ids, ((0, 0), (0, pad)), constant_values=-1),
              np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf).astype(np.float32))


def threshold(topk: TopK, tau: float) -> Neighbors:
  valid_NxK = (topk.ids_NxK >= 0) & (topk.sims_NxK > tau)
  return Neighbors(neighbors_NxK=np.where(valid_NxK, topk.ids_NxK, -1).astype(np.int32),
                   sims_NxK=np.where(valid_NxK, topk.sims_NxK, 0.0).astype(np.float32),
                   valid_NxK=valid_NxK)


def mine_neighbors(emb_NxD: np.ndarray, k: int, tau: float, labels: Sequence[str] | None = None,
                   opts: IndexOptions = IndexOptions()) -> tuple[Neighbors, TopK]:
  """Neighbours above tau (same label only when `labels` is given) and the raw top-K."""
  topk = search_topk_grouped(emb_NxD, k, labels, opts)
  return threshold(topk, tau), topk


# ----------------------------------------------------------------------------- I/O, stats


def save_neighbors(path: str | pathlib.Path, nb: Neighbors) -> None:
  files.save_npz(path, {"neighbors": nb.neighbors_NxK, "sims": nb.sims_NxK,
                        "valid": nb.valid_NxK})


def load_neighbors(path: str | pathlib.Path) -> Neighbors:
  z = files.load_npz(path)
  return Neighbors(z["neighbors"], z["sims"], z["valid"])


def mining_stats(topk: TopK, tau: float, labels: Sequence[str] | None = None,
                 taus: Sequence[float] = TAU_SWEEP) -> dict[str, Any]:
  """Pairs-per-prompt histogram, coverage at tau and a tau sweep (within top-K)."""
  n, k = topk.ids_NxK.shape
  found_NxK = topk.ids_NxK >= 0

  def summary(t: float, rows: np.ndarray | slice = slice(None)) -> dict[str, Any]:
    count_N = (found_NxK[rows] & (topk.sims_NxK[rows] > t)).sum(1)
    return {"tau": t, "frac_with_neighbor": float(np.mean(count_N >= 1)) if count_N.size else 0.0,
            "mean_pairs": float(np.mean(count_N)) if count_N.size else 0.0,
            "total_pairs": int(count_N.sum())}

  count_N = (found_NxK & (topk.sims_NxK > tau)).sum(1)
  stats = {
      "num_prompts": n, "k": k, "tau": tau,
      "frac_with_neighbor": summary(tau)["frac_with_neighbor"],
      "total_pairs": int(count_N.sum()),
      "pairs_per_prompt_hist": np.bincount(count_N, minlength=k + 1).tolist(),
      "tau_sweep": [summary(t) for t in taus],
      "note": "pairs are directed and capped at K per prompt",
  }
  if labels is not None:
    labels_N = np.asarray(labels)
    stats["by_label"] = {str(l): summary(tau, labels_N == l) for l in np.unique(labels_N)}
  return stats


def format_stats(stats: dict[str, Any]) -> str:
  lines = [f"{stats['num_prompts']} prompts, K={stats['k']}, tau={stats['tau']}: "
           f"{stats['frac_with_neighbor']:.1%} have >=1 neighbour, {stats['total_pairs']} pairs",
           "pairs/prompt histogram: " + " ".join(
               f"{i}:{c}" for i, c in enumerate(stats["pairs_per_prompt_hist"]) if c),
           "  tau  frac>=1  mean_pairs  total_pairs"]
  for row in stats["tau_sweep"]:
    lines.append(f"  {row['tau']:.2f}  {row['frac_with_neighbor']:7.1%}  {row['mean_pairs']:10.2f}"
                 f"  {row['total_pairs']:11d}")
  for label, row in stats.get("by_label", {}).items():
    lines.append(f"  {label}: {row['frac_with_neighbor']:.1%} with >=1 neighbour at tau")
  return "\n".join(lines)


def save_stats(stats: dict[str, Any], json_path: str | pathlib.Path,
               png_path: str | pathlib.Path | None = None) -> None:
  files.write_text(json_path, json.dumps(stats, indent=2) + "\n")
  if png_path is not None:
    plot_stats(stats, png_path)


def plot_stats(stats: dict[str, Any], path: str | pathlib.Path) -> None:
  """Histogram of pairs per prompt and the tau sweep, as a PNG (no display needed)."""
  # A bare Figure renders with Agg and leaves pyplot's global backend alone.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(10, 4))
  ax_hist, ax_sweep = fig.subplots(1, 2)
  hist = stats["pairs_per_prompt_hist"]
  ax_hist.bar(range(len(hist)), hist)
  ax_hist.set(xlabel=f"neighbours with cosine > {stats['tau']}", ylabel="prompts",
              title="pairs per prompt")
  taus = [r["tau"] for r in stats["tau_sweep"]]
  ax_sweep.plot(taus, [r["frac_with_neighbor"] for r in stats["tau_sweep"]], marker="o")
  ax_sweep.axvline(stats["tau"], color="gray", linestyle="--")
  ax_sweep.set(xlabel="tau", ylabel="fraction with >= 1 neighbour", ylim=(0, 1.02),
               title=f"tau sweep (top-{stats['k']})")
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)
