"""Benchmark: neighbour mining on 1M synthetic clustered 384-d unit vectors.

Runs the product's own `neighbors.search_topk` (the approximate index that
config.data.index="auto" picks above exact_max) and reports build+search time,
recall@K against exact search on sampled queries, and peak RSS; beside it, the
exact brute-force (IndexFlatIP) time at 10k and 100k vectors.

  python benchmarks/bench_mining.py                       # defaults: 1M, K=16, 2 threads
  python benchmarks/bench_mining.py --n=200000 --index=ivf --ivf_nprobe=16
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import time

from absl import logging
import numpy as np

from semsafe_jax.data import neighbors


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def clustered_unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
  """emb_NxD: topics -> clusters of paraphrase-like points (cosine ~0.55-0.9 inside).

  Two levels so that clusters also have near neighbours in other clusters, like
  real prompt sets; cluster sizes are uneven (geometric).
  """
  rng = np.random.default_rng(seed)
  num_topics, num_clusters = max(1, n // 1000), max(1, n // 50)

  def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  topics_TxD = unit(rng.standard_normal((num_topics, d), dtype=np.float32))
  cluster_topic_C = rng.integers(0, num_topics, num_clusters)
  centres_CxD = unit(topics_TxD[cluster_topic_C]
                     + 1.2 * unit(rng.standard_normal((num_clusters, d), dtype=np.float32)))
  spread_C = rng.uniform(0.35, 0.9, num_clusters).astype(np.float32)  # noise norm per cluster
  sizes_p = rng.geometric(0.3, num_clusters).astype(np.float64)
  cluster_N = rng.choice(num_clusters, size=n, p=sizes_p / sizes_p.sum())
  emb_NxD = np.empty((n, d), np.float32)
  for start in range(0, n, 100_000):  # chunked: no float64 or full-size temporaries
    c = cluster_N[start:start + 100_000]
    noise = unit(rng.standard_normal((len(c), d), dtype=np.float32)) * spread_C[c, None]
    emb_NxD[start:start + len(c)] = unit(centres_CxD[c] + noise)
  return emb_NxD


def exact_topk_for(emb_NxD: np.ndarray, query_rows: np.ndarray, k: int) -> np.ndarray:
  """Exact top-k (self excluded) of a few query rows against all rows."""
  import faiss  # pylint: disable=g-import-not-at-top
  index = faiss.IndexFlatIP(emb_NxD.shape[1])
  index.add(emb_NxD)
  _, ids = index.search(emb_NxD[query_rows], k + 1)
  ids = np.where(ids == query_rows[:, None], -1, ids)
  return np.stack([row[row >= 0][:k] for row in ids])


def recall_at_k(approx_QxK: np.ndarray, exact_QxK: np.ndarray) -> float:
  hits = [len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approx_QxK, exact_QxK)]
  return float(np.sum(hits) / exact_QxK.size)


def timed(fn):
  """fn() with its wall and CPU (all threads) seconds: CPU time is the fairer number
  when other jobs share the machine."""
  t0, c0 = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--n", type=int, default=1_000_000)
  p.add_argument("--d", type=int, default=384)
  p.add_argument("--k", type=int, default=16)
  p.add_argument("--queries", type=int, default=2000)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--index", default="auto", help="auto (the product default) | hnsw | ivf")
  p.add_argument("--exact_sizes", default="10000,100000")
  for f in dataclasses.fields(neighbors.IndexOptions):
    if f.name.startswith(("hnsw_", "ivf_")):
      p.add_argument(f"--{f.name}", type=int, default=None)
  args = p.parse_args()
  logging.set_verbosity(logging.INFO)  # the product's phase timings and progress
  logging.use_absl_handler()

  overrides = {f: getattr(args, f) for f in vars(args) if f.startswith(("hnsw_", "ivf_"))
               and getattr(args, f) is not None}
  opts = dataclasses.replace(neighbors.IndexOptions(), kind=args.index, threads=args.threads,
                             **overrides)
  kind = neighbors.index_kind(args.n, opts)
  print(f"options: {opts} -> {kind} at N={args.n}", flush=True)

  print("load average at start: %.1f %.1f %.1f" % os.getloadavg(), flush=True)
  emb_NxD, t_gen, _ = timed(lambda: clustered_unit_vectors(args.n, args.d))
  print(f"generated {emb_NxD.shape} in {t_gen:.1f}s, RSS {peak_rss_gb():.2f} GB", flush=True)

  rows = []
  for size in [int(s) for s in args.exact_sizes.split(",") if s]:
    _, t, cpu = timed(lambda: neighbors.search_topk(emb_NxD[:size], args.k, opts, kind="flat"))
    rows.append((size, "flat (exact)", t, cpu, 1.0))
    print(f"exact N={size}: {t:.1f}s (cpu {cpu:.1f}s)", flush=True)

  topk, t_mine, cpu_mine = timed(lambda: neighbors.search_topk(emb_NxD, args.k, opts))
  rss = peak_rss_gb()
  print(f"{kind} N={args.n}: build+search {t_mine:.1f}s (cpu {cpu_mine:.1f}s), "
        f"peak RSS {rss:.2f} GB", flush=True)

  q_rows = np.sort(np.random.default_rng(1).choice(args.n, args.queries, replace=False))
  exact_QxK, t_exact_q, _ = timed(lambda: exact_topk_for(emb_NxD, q_rows, args.k))
  recall = recall_at_k(topk.ids_NxK[q_rows], exact_QxK)
  rows.append((args.n, f"{kind} (product path)", t_mine, cpu_mine, recall))

  print(f"\nrecall@{args.k} on {args.queries} queries (exact ground truth took {t_exact_q:.1f}s)")
  recall_col = f"recall@{args.k}"
  print(f"{'N':>9}  {'method':<22} {'build+search s':>14} {'cpu s':>8}  {recall_col:>9}")
  for n, method, t, cpu, r in rows:
    print(f"{n:>9}  {method:<22} {t:>14.1f} {cpu:>8.1f}  {r:>9.3f}")
  print(f"peak RSS: {rss:.2f} GB after mining, {peak_rss_gb():.2f} GB whole run "
        f"(incl. exact ground truth); targets: <=300 s, recall>=0.95, <=8 GB")
  print("load average at end: %.1f %.1f %.1f (2 cores; >2 means other jobs shared them)"
        % os.getloadavg())


if __name__ == "__main__":
  main()
