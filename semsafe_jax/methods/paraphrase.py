"""Generated variants of training prompts: rule-based style rewrites and model paraphrases.

Not a method: the host stage that methods training on more phrasings than the data has
share. Ours takes the variants as unlabelled partners of their source (the consistency term
carries the source's behaviour over; data/unlabeled.py `variants`); `paraphrase_aug` trains
on them with their source's target. Both read the same knobs (config.method):

  rule_rewrites           style rewrites per source prompt (data/rewrite.py), seeded
  paraphrases_per_prompt  model paraphrases per source prompt, greedy; paraphrase j uses
                          instruction TEMPLATES[j % len(TEMPLATES)], so they differ
  paraphraser             "" = the model being trained (ctx.base_generate), else any
                          model path or alias `models.loading.load_pretrained` takes
  paraphrase_min_cos      keep a variant only at SBERT cosine >= this to its source
  paraphrase_max_new_tokens, paraphrase_max_len_ratio   (see `text_reason`)

A candidate is dropped, and counted under the first reason that applies (DROP_REASONS),
when it is empty, reads as a refusal (and its source does not), is much longer than its
source or a statement where its source asks or instructs (the model answered instead of
rewriting), repeats its source or any loaded prompt (the unlabelled pool is built with the
same rewrites), comes within cosine data.tau of ANY evaluation prompt (the splits' leak
rule), sits below paraphrase_min_cos to its source, or repeats a variant already kept. The
refusal, length and statement rules read model output only: a rule rewrite is a rewrite by
construction, and its "verbose" style is long on purpose.

Model outputs are cached in W/paraphrase/ (ctx.cached_answers), embeddings in the SBERT
cache, so a re-run or a resume skips both; W/paraphrase/variants.jsonl lists every
candidate with its cosine and fate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import time
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

from semsafe_jax.data import embed as embed_lib
from semsafe_jax.data import rewrite as rewrite_lib
from semsafe_jax.data.schema import text_key
from semsafe_jax.data.splits import EVAL_SPLITS
from semsafe_jax.eval import judge
from semsafe_jax.files import write_jsonl

PARAPHRASE_DIR = "paraphrase"  # in W
CANDIDATES_FILE = "variants.jsonl"  # in W/paraphrase/: every candidate and its fate

# Instructions to the paraphraser; {text} is the source prompt.
TEMPLATES = (
    "Rewrite the following request in your own words, keeping exactly the same meaning. "
    "Do not answer it: reply with the rewritten request only.\n\nRequest: {text}",
    "Paraphrase this message so that it asks for the same thing with different wording. "
    "Reply with the paraphrase only, not with an answer.\n\nMessage: {text}",
    "How else could someone ask the following? Give one alternative phrasing of it and "
    "nothing else.\n\n{text}",
)
# Why a candidate was dropped, in the order the rules apply.
DROP_REASONS = ("empty", "refusal", "too_long", "not_a_request", "same_as_source",
                "existing_prompt", "near_eval", "low_cosine", "duplicate_variant")
# Length floor in characters for `too_long`: a short source may get a longer paraphrase.
_MIN_LEN_BASE = 40
# An opening line that introduces the rewrite ("Sure! Here is a rewritten version:").
_INTRO = re.compile(r"^(?:sure|certainly|of course|okay|ok|here|rewritten|rephrased|paraphrase"
                    r"|alternative|new request|request|message)\b.*:\s*$", re.I)
_LABEL = re.compile(r"^(?:rewritten request|rewritten|rephrased request|paraphrase|"
                    r"paraphrased request|alternative phrasing|request|message)\s*:\s*", re.I)
_QUOTES = "\"'\u201c\u201d\u2018\u2019`"
# How a request opens: a question word, an imperative verb, or "I want / need / ...".
_REQUEST_START = re.compile(
    r"^(?:(?:hey|hi|hello|ok|okay|so|yo|bro|ngl|please|kindly|quick q|lowkey)[,!:]?\s+)*"
    r"(?:what|what's|whats|which|who|whom|whose|where|when|why|how|is|are|was|were|do|does|"
    r"did|can|could|should|would|will|may|might|am|have|has|any|anyone|is there|are there|"
    r"write|give|make|find|create|help|plan|compile|identify|rewrite|describe|list|tell|"
    r"explain|show|teach|draft|generate|recommend|suggest|remind|convince|design|build|"
    r"outline|summarize|summarise|translate|produce|prepare|provide|walk|get|set|fix|point|"
    r"send|name|share|check|look|search|break|rank|compare|convert|calculate|debug|please|"
    r"imagine|pretend|suppose|act|roleplay|i (?:want|need|wanna|would like|'d like|am looking|"
    r"'m looking|am trying|'m trying|have to|must)|i'd like|i'm looking|i'm trying|"
    r"looking for|asking for|hypothetically|in theory|hows|whats|wheres|need|wanna)\b", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
# "The answer to this question is: "<the rewrite>"": a short lead-in, then the quoted rewrite.
_QUOTED_AFTER_LEAD = re.compile(r"^[^\"\u201c:]{0,60}:\s*[\"\u201c](.+)[\"\u201d]\.?$")


@dataclasses.dataclass(frozen=True)
class Paraphrases:
  """M kept variants of source prompt rows."""
  texts: list[str]  # [M] variant texts
  source_rows: np.ndarray  # int64 [M] prompt row each variant rewrites
  cos: np.ndarray  # float32 [M] SBERT cosine to its source
  origin: np.ndarray  # str [M] "rule:<style>" | "model:<template index>"
  counts: dict[str, Any]  # sources, made / kept per origin, dropped per reason, seconds

  def __len__(self) -> int:
    return len(self.texts)


def paraphrase_prompt(text: str, j: int) -> str:
  """The instruction for the source's j-th model paraphrase."""
  return TEMPLATES[j % len(TEMPLATES)].format(text=text.strip())


def clean_model_output(raw: str) -> str:
  """The rewrite in a paraphraser's reply: without an introducing line, a "Paraphrase:"
  label or surrounding quotes; the remaining lines joined by spaces."""
  lines = [ln.strip() for ln in raw.strip().splitlines() if ln.strip()]
  if lines and _INTRO.match(lines[0]):
    lines = lines[1:]
  text = " ".join(" ".join(lines).split())
  text = _LABEL.sub("", text)
  m = _QUOTED_AFTER_LEAD.match(text)
  if m:
    text = m.group(1).strip()
  if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
    text = text[1:-1].strip()
  return text


def reads_as_request(text: str) -> bool:
  """Whether a sentence of the text asks (a question) or instructs (an imperative, "I need
  ..."): "You're a chemist in a novel. Explain how ..." does, "To make X, you need ..."
  does not."""
  for sentence in _SENTENCE_END.split(text.strip()):
    t = sentence.strip(_QUOTES + " ")
    if t.endswith("?") or _REQUEST_START.match(t):
      return True
  return False


def text_reason(text: str, source: str, *, from_model: bool, existing_keys: set[str],
                max_len_ratio: float) -> str | None:
  """The first text-only rule that drops a candidate, or None.

  Model output only: too_long, more than max_len_ratio times the source's characters (at
  least max_len_ratio * 40); not_a_request, a statement ("To make X, you need ...") where
  the source asks or instructs: the model answered instead of rewriting.
  """
  if not text.strip():
    return "empty"
  if from_model and judge.is_refusal(text) and not judge.is_refusal(source):
    return "refusal"
  if from_model and len(text) > max_len_ratio * max(len(source), _MIN_LEN_BASE):
    return "too_long"
  if from_model and reads_as_request(source) and not reads_as_request(text):
    return "not_a_request"
  key = text_key(text)
  if key == text_key(source):
    return "same_as_source"
  if key in existing_keys:
    return "existing_prompt"
  return None


def max_cosines(q_QxD: np.ndarray, base_BxD: np.ndarray, block: int = 4096) -> np.ndarray:
  """[Q] largest cosine of each (unit) query row to any base row; -1 with no base rows."""
  out = np.full(len(q_QxD), -1.0, np.float32)
  if not len(base_BxD):
    return out
  for s in range(0, len(q_QxD), block):  # blocks bound memory for large sets
    out[s:s + block] = (q_QxD[s:s + block] @ base_BxD.T).max(axis=1)
  return out


def filter_variants(sources: Sequence[str], texts: Sequence[str], from_model: Sequence[bool],
                    src_emb_CxD: np.ndarray, embed: Callable[[list[str]], np.ndarray],
                    eval_emb_ExD: np.ndarray, *, existing_keys: set[str], min_cos: float,
                    tau: float, max_len_ratio: float
                    ) -> tuple[list[str | None], np.ndarray]:
  """(drop reason or None per candidate, cosine to its source [C]; nan where not embedded).

  Candidate c rewrites sources[c], whose unit SBERT embedding is src_emb_CxD[c];
  `embed(texts)` embeds the candidates that pass the text rules (unit rows).
  """
  n = len(texts)
  reasons: list[str | None] = [
      text_reason(t, s, from_model=bool(m), existing_keys=existing_keys,
                  max_len_ratio=max_len_ratio) for t, s, m in zip(texts, sources, from_model)]
  cos = np.full(n, np.nan, np.float32)
  todo = [c for c in range(n) if reasons[c] is None]
  if not todo:
    return reasons, cos
  uniq = list(dict.fromkeys(texts[c] for c in todo))
  emb = np.asarray(embed(uniq), np.float32)
  row_of = {t: i for i, t in enumerate(uniq)}
  emb_TxD = emb[[row_of[texts[c]] for c in todo]]
  cos[todo] = (emb_TxD * np.asarray(src_emb_CxD, np.float32)[todo]).sum(-1)
  near = max_cosines(emb_TxD, np.asarray(eval_emb_ExD, np.float32))
  kept: set[str] = set()
  for c, near_c in zip(todo, near):
    if near_c >= tau:
      reasons[c] = "near_eval"
    elif cos[c] < min_cos:
      reasons[c] = "low_cosine"
    elif text_key(texts[c]) in kept:
      reasons[c] = "duplicate_variant"
    else:
      kept.add(text_key(texts[c]))
  return reasons, cos


def _check(mc: Any) -> tuple[int, int, float, float]:
  n_rule, n_model = int(mc.rule_rewrites), int(mc.paraphrases_per_prompt)
  min_cos, ratio = float(mc.paraphrase_min_cos), float(mc.paraphrase_max_len_ratio)
  for name, v in (("rule_rewrites", n_rule), ("paraphrases_per_prompt", n_model)):
    if v < 0:
      raise ValueError(f"method.{name}={v}; expected an integer >= 0")
  if not -1.0 <= min_cos <= 1.0:
    raise ValueError(f"method.paraphrase_min_cos={min_cos}; expected a cosine in [-1, 1]")
  if ratio <= 0:
    raise ValueError(f"method.paraphrase_max_len_ratio={ratio}; expected > 0")
  if int(mc.paraphrase_max_new_tokens) < 1:
    raise ValueError(f"method.paraphrase_max_new_tokens={mc.paraphrase_max_new_tokens}; "
                     "expected >= 1")
  return n_rule, n_model, min_cos, ratio


def _generator(ctx) -> tuple[str, Callable[[list[str]], list[str]]]:
  """(cache file name in W, prompts -> replies) of the configured paraphraser."""
  config = ctx.config
  name, n_tok = str(config.method.paraphraser or ""), int(config.method.paraphrase_max_new_tokens)
  who = name or f"base:{config.model.name_or_path}"
  digest = hashlib.sha256(f"{who}|{n_tok}".encode()).hexdigest()[:12]
  cache = f"{PARAPHRASE_DIR}/model_outputs_{digest}.jsonl"
  if not name:
    return cache, lambda prompts: ctx.base_generate(prompts, n_tok)

  def generate(prompts: list[str]) -> list[str]:
    # Imported here: only a separate paraphraser needs them, and only on a cache miss.
    from semsafe_jax.models import generate as gen_lib  # pylint: disable=g-import-not-at-top
    from semsafe_jax.models import loading  # pylint: disable=g-import-not-at-top
    mcfg = config.model
    logging.info("Loading the paraphraser %s.", name)
    pre = loading.load_pretrained(name, dtype=mcfg.dtype, param_dtype=mcfg.param_dtype,
                                  layer_loop=mcfg.get("layer_loop", "auto"))
    if pre.tokenizer is None:
      raise ValueError(f"method.paraphraser={name!r} has no tokenizer; expected a model "
                       "directory or GGUF with one")
    return gen_lib.generate(pre.params, pre.cfg, tokenizer=pre.tokenizer, prompts=prompts,
                            max_new_tokens=n_tok, batch_size=int(config.eval.batch_size))
  return cache, generate


def eval_rows(splits: dict[str, np.ndarray]) -> np.ndarray:
  """Every prompt row a model is scored on (no variant may come within tau of one)."""
  return np.concatenate([np.asarray(splits.get(n, []), np.int64) for n in EVAL_SPLITS])


def paraphrases(ctx, rows: Sequence[int]) -> Paraphrases:
  """Kept variants of the prompt rows `rows` (see the module docstring), and counts."""
  t0 = time.time()
  config, data = ctx.config, ctx.data
  dc = config.data
  n_rule, n_model, min_cos, ratio = _check(config.method)
  rows = np.asarray(list(dict.fromkeys(int(r) for r in np.asarray(rows).reshape(-1))), np.int64)
  src_texts = data.texts(rows)

  # Candidates: (position in rows, text, origin).
  pos: list[int] = []
  texts: list[str] = []
  origin: list[str] = []
  for i, text in enumerate(src_texts):
    for style, v in rewrite_lib.variants(text, n_rule, seed=int(config.seed)):
      pos.append(i)
      texts.append(v)
      origin.append(f"rule:{style}")
  gen_seconds = 0.0
  if n_model and len(rows):
    cache, generate = _generator(ctx)
    prompts = [paraphrase_prompt(t, j) for j in range(n_model) for t in src_texts]
    t1 = time.time()
    replies = ctx.cached_answers(cache, prompts, generate)
    gen_seconds = time.time() - t1
    for k, reply in enumerate(replies):
      pos.append(k % len(rows))
      texts.append(clean_model_output(reply))
      origin.append(f"model:{(k // len(rows)) % len(TEMPLATES)}")
  pos_C = np.asarray(pos, np.int64)
  from_model = np.asarray([o.startswith("model") for o in origin], bool)

  cache_dir = dc.get("cache_dir") or os.path.join(ctx.workdir, "cache")
  embed = lambda ts: embed_lib.embed_texts(
      ts, dc.sbert, batch_size=dc.get("embed_batch_size", 64), cache_dir=cache_dir,
      device=dc.get("embed_device", "cpu"))
  reasons, cos = filter_variants(
      [src_texts[i] for i in pos], texts, from_model, data.emb_NxD[rows[pos_C]], embed,
      data.emb_NxD[eval_rows(data.splits)], existing_keys={text_key(p.text) for p in data.prompts},
      min_cos=min_cos, tau=float(dc.tau), max_len_ratio=ratio)
  keep = np.asarray([r is None for r in reasons], bool)

  kinds = ("rule", "model")
  counts = {
      "sources": int(len(rows)), "rule_rewrites": n_rule, "paraphrases_per_prompt": n_model,
      "paraphraser": str(config.method.paraphraser or "") or "the model being trained",
      "min_cos": min_cos, "tau": float(dc.tau),
      "made": {k: int((from_model == (k == "model")).sum()) for k in kinds},
      "kept": {k: int((keep & (from_model == (k == "model"))).sum()) for k in kinds},
      "dropped": {r: sum(x == r for x in reasons) for r in DROP_REASONS},
      "generate_seconds": round(gen_seconds, 2), "seconds": round(time.time() - t0, 2)}
  logging.info("Variants of %d prompts: %d rule rewrites kept of %d, %d model paraphrases kept "
               "of %d (%.1f s); dropped: %s.", len(rows), counts["kept"]["rule"],
               counts["made"]["rule"], counts["kept"]["model"], counts["made"]["model"],
               counts["seconds"], {r: n for r, n in counts["dropped"].items() if n})
  if ctx.primary:
    write_jsonl(os.path.join(ctx.workdir, PARAPHRASE_DIR, CANDIDATES_FILE), [
        {"source_id": data.prompts[int(rows[i])].id, "origin": o, "text": t,
         "cos": None if np.isnan(c) else round(float(c), 4), "kept": r is None, "reason": r}
        for i, o, t, c, r in zip(pos, origin, texts, cos, reasons)])
  return Paraphrases(texts=[t for t, k in zip(texts, keep) if k], source_rows=rows[pos_C[keep]],
                     cos=cos[keep], origin=np.asarray(origin, str)[keep], counts=counts)
