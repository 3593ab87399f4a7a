"""Regenerates the built-in unlabelled pool from the built-in labelled prompts.

  python semsafe_jax/data/builtin/make_unlabeled.py          # rewrite both files
  python semsafe_jax/data/builtin/make_unlabeled.py --check  # exit 1 if they are stale

Every prompt of prompts.jsonl and lookalikes.jsonl gets up to `CANDIDATES` rule-based
rewrites (semsafe_jax.data.rewrite) in distinct styles; some frame rewrites also get a
surface rewrite on top (typos, lowercase). A rewrite is kept only if the default SBERT
model puts it at cosine >= MIN_SOURCE_COS to its source prompt, and at most `PER_PROMPT`
are kept per source. That floor, above the default tau (0.7), makes every rewrite of an
evaluation prompt fall to the split's leak rule (it is within tau of its source), and
keeps the pool made of real neighbours of labelled prompts. Rewrites that repeat a
built-in prompt or an earlier rewrite (up to case and spacing) are dropped. The pool is
shuffled and numbered, so ids and order say nothing about labels:

  unlabeled.jsonl          {"id": "pool-00001", "text": ...}
  unlabeled_labels.jsonl   {"id", "label", "category", "intent_id", "topic", "style",
                            "source_id", "source_cos"}: the source prompt's label, category,
                            intent and topic, the rewrite style, the source prompt's id and
                            the rewrite's cosine to it. Evaluation only.

Deterministic: the output depends only on the built-in prompts, SEED and the SBERT
model (cosines are rounded; a value within 1e-3 of the floor is not expected to flip).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Callable, Sequence

import numpy as np

from semsafe_jax.data import rewrite
from semsafe_jax.data.schema import Prompt, text_key

SEED = 20240917
CANDIDATES = 3  # rewrites tried per built-in prompt
PER_PROMPT = 2  # rewrites kept per built-in prompt
MIN_SOURCE_COS = 0.75  # SBERT cosine a rewrite keeps to its source (default tau is 0.7)
SURFACE_PROB = 0.3  # chance that a frame rewrite also gets a surface rewrite on top
# Styles that already change the surface a lot, so no surface rewrite is stacked on them.
_NO_STACK = ("slang", "typos", "lowercase")
HERE = pathlib.Path(__file__).resolve().parent
POOL_FILE, LABELS_FILE = "unlabeled.jsonl", "unlabeled_labels.jsonl"


def candidates(p: Prompt, seed: int = SEED, n: int = CANDIDATES) -> list[tuple[str, str]]:
  """(style, text) rewrites of one prompt; a pure function of (prompt, seed, n)."""
  rng = np.random.default_rng(rewrite.string_seed(p.id, seed))
  out = []
  for style, text in rewrite.variants(p.text, n, seed=seed):
    if style not in _NO_STACK and rng.random() < SURFACE_PROB:
      surface = rewrite.SURFACE_STYLES[int(rng.integers(len(rewrite.SURFACE_STYLES)))]
      text, style = rewrite.rewrite(text, surface, rng), f"{style}+{surface}"
    out.append((style, text))
  return out


def make_pool(prompts: Sequence[Prompt], embed_fn: Callable[[list[str]], np.ndarray], *,
              seed: int = SEED, n_candidates: int = CANDIDATES, per_prompt: int = PER_PROMPT,
              min_source_cos: float = MIN_SOURCE_COS
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(pool rows, hidden label rows), aligned by id.

  embed_fn: texts -> unit-norm embeddings (the default SBERT for the shipped files).
  """
  tried = [(p, style, text) for p in prompts for style, text in candidates(p, seed, n_candidates)]
  emb_src = embed_fn([p.text for p in prompts])
  emb_new = embed_fn([text for _, _, text in tried])
  src_row = {p.id: i for i, p in enumerate(prompts)}
  cos = np.round(np.einsum("nd,nd->n", emb_new, emb_src[[src_row[p.id] for p, _, _ in tried]]),
                 3)
  seen = {text_key(p.text) for p in prompts}
  kept_per_source: dict[str, int] = {}
  made = []
  for (p, style, text), c in zip(tried, cos.tolist()):
    if c < min_source_cos or text_key(text) in seen or kept_per_source.get(p.id, 0) >= per_prompt:
      continue
    seen.add(text_key(text))
    kept_per_source[p.id] = kept_per_source.get(p.id, 0) + 1
    made.append((text, {"label": p.label, "category": p.category, "intent_id": p.intent_id,
                        "topic": p.topic, "style": style, "source_id": p.id,
                        "source_cos": c}))
  order = np.random.default_rng(seed).permutation(len(made))
  pool, labels = [], []
  for n, j in enumerate(order, 1):
    text, hidden = made[j]
    pid = f"pool-{n:05d}"
    pool.append({"id": pid, "text": text})
    labels.append({"id": pid, **hidden})
  return pool, labels


def _jsonl(rows: Sequence[dict[str, str]]) -> str:
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def render(seed: int = SEED) -> dict[str, str]:
  """{file name: content} of the pool made from the shipped labelled prompts."""
  # pylint: disable=g-import-not-at-top; SBERT and the loaders only when run.
  from semsafe_jax.data import embed, loaders
  pool, labels = make_pool(loaders.load_builtin("").prompts,
                           lambda texts: embed.embed_texts(texts, embed.DEFAULT_MODEL),
                           seed=seed)
  return {POOL_FILE: _jsonl(pool), LABELS_FILE: _jsonl(labels)}


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true",
                      help="only compare with the files on disk; exit 1 if they differ")
  args = parser.parse_args(argv)
  files = render()
  stale = [name for name, text in files.items()
           if not (HERE / name).is_file() or (HERE / name).read_text(encoding="utf-8") != text]
  if args.check:
    print("stale: " + ", ".join(stale) if stale else "up to date")
    return int(bool(stale))
  for name, text in files.items():
    (HERE / name).write_text(text, encoding="utf-8")
  print(f"wrote {len(files[POOL_FILE].splitlines())} prompts to {POOL_FILE} and {LABELS_FILE}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
