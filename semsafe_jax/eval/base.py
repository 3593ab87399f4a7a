"""Evaluation plug-ins: the model under test, the context, results, and `run_evals`.

`config.evals` names the evaluations, big_vision style:

  c.evals = {"refusal": {"type": "refusal_splits", "max_per_split": 60}, ...}

`type` is a module in semsafe_jax/eval/evaluators/ with
`evaluate(ctx, model, opts) -> EvalResult` and an `OPTIONS` dict (its allowed
options and their defaults). `run_evals` runs every evaluation on every model
("before" and "after"), judges the answers with every judge in
`config.judges` (the first is the primary one), and writes the per-prompt rows
to W/evals/<name>.jsonl. Every number names its evaluation, judge and n. With
`gate.use`, a third model ("gated", `GatedModel`) answers through the probe gate.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import os
import pkgutil
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from semsafe_jax import files, malloc
from semsafe_jax.configs import cfg_get
from semsafe_jax.eval import stats
from semsafe_jax.losses.capability import token_kl
from semsafe_jax.models import chat as chat_lib
from semsafe_jax.models import generate as gen_lib
from semsafe_jax.models import transformer

EVALS_DIR = "evals"  # W/evals/<name>.jsonl
Prefill = str | Sequence[int] | None


# ----------------------------------------------------------------------------
# Results.


@dataclasses.dataclass(frozen=True)
class Metric:
  """One reported number: its value, sample size, interval, judge and count."""
  value: float
  n: int
  ci95: tuple[float, float] | None = None
  judge: str | None = None
  k: int | None = None  # count behind a rate (value = k / n)

  @classmethod
  def rate(cls, k: int, n: int, judge: str | None = None) -> Metric:
    if n <= 0:
      raise ValueError("a rate needs n > 0.")
    return cls(k / n, n, stats.wilson_ci(k, n), judge, int(k))

  @classmethod
  def mean(cls, values: Sequence[float], judge: str | None = None) -> Metric:
    m = stats.mean_ci(values)
    ci = None if m.lo is None else (m.lo, m.hi)
    return cls(m.mean, m.n, ci, judge, None)

  def to_dict(self) -> dict[str, Any]:
    return {"value": float(self.value), "n": int(self.n),
            "ci95": None if self.ci95 is None else [float(self.ci95[0]), float(self.ci95[1])],
            "judge": self.judge, "k": None if self.k is None else int(self.k)}


@dataclasses.dataclass
class EvalResult:
  metrics: dict[str, Metric]
  rows: list[dict[str, Any]]  # per prompt: group, key, prompt, completion, label, judges, ...
  group_labels: dict[str, str] = dataclasses.field(default_factory=dict)  # group -> label
  notes: list[str] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------
# The model under test.


def _gen_key(prompt: str, prefill: Prefill, max_new_tokens: int) -> str:
  pre = prefill if prefill is None or isinstance(prefill, str) else [int(t) for t in prefill]
  blob = json.dumps([prompt, pre, int(max_new_tokens)], ensure_ascii=False)
  return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _is_primary() -> bool:
  return jax.process_index() == 0


def _generation(rows: Sequence[tuple[str, Sequence[int], bool]]) -> gen_lib.Generation:
  return gen_lib.Generation([r[0] for r in rows], [list(r[1]) for r in rows],
                            [r[2] for r in rows])


class _Answers:
  """What every model under test offers on top of its generate_full."""

  def generate(self, prompts: Sequence[str], max_new_tokens: int,
               prefills: Sequence[Prefill] | None = None) -> list[str]:
    return self.generate_full(prompts, max_new_tokens, prefills).texts  # type: ignore[attr-defined]


@dataclasses.dataclass(eq=False)
class ModelUnderTest(_Answers):
  """A model as the evaluators see it: greedy chat generation and teacher-forced scoring.

  params are the (merged) weights, embed_fn the embedding-MLP hook (None: plain
  token embedding). Generations are memoised per (prompt, prefill, max_new_tokens),
  so evaluations that ask for the same answers share them; with `cache_file` (the
  frozen base model's) they are also kept on disk and reused by later runs.
  """
  name: str  # "before" | "after" | a method name
  params: Any
  cfg: Any  # ModelConfig
  tokenizer: Any
  embed_fn: Any = None
  batch_size: int = 8
  max_batch_tokens: int = 0  # long prompts take fewer rows (generate.generate); 0 = no cap
  cache_file: str | None = None
  _memo: dict[str, tuple[str, list[int], bool]] = dataclasses.field(default_factory=dict,
                                                                    repr=False)
  _cache_read: bool = dataclasses.field(default=False, repr=False)

  def _read_cache(self) -> None:
    if self._cache_read:
      return
    self._cache_read = True
    if not self.cache_file or not files.exists(self.cache_file):
      return
    for line in files.read_bytes(self.cache_file).split(b"\n"):
      if line.strip():
        try:
          r = json.loads(line)  # bytes: a torn UTF-8 sequence fails this line only
          self._memo[r["key"]] = (r["completion"], list(r["token_ids"]), bool(r["finished"]))
        except (ValueError, KeyError, TypeError):
          pass  # a torn line (a killed run, concurrent cells): regenerated when needed
    logging.info("Generation cache %s: %d answers.", self.cache_file, len(self._memo))

  def generate_full(self, prompts: Sequence[str], max_new_tokens: int,
                    prefills: Sequence[Prefill] | None = None) -> gen_lib.Generation:
    """Greedy answers (texts, token ids, finished flags); with prefills, the
    assistant turn starts with them and only the continuation comes back."""
    prompts = list(prompts)
    prefills = [None] * len(prompts) if prefills is None else list(prefills)
    if len(prefills) != len(prompts):
      raise ValueError(f"prefills: got {len(prefills)} for {len(prompts)} prompts.")
    self._read_cache()
    keys = [_gen_key(p, f, max_new_tokens) for p, f in zip(prompts, prefills)]
    todo: dict[str, int] = {}
    for i, k in enumerate(keys):
      if k not in self._memo and k not in todo:
        todo[k] = i
    if todo:
      idx = list(todo.values())
      t0 = time.perf_counter()
      out = gen_lib.generate_batch(
          self.params, self.cfg, self.tokenizer, [prompts[i] for i in idx],
          max_new_tokens=int(max_new_tokens), batch_size=int(self.batch_size),
          embed_fn=self.embed_fn, prefills=[prefills[i] for i in idx],
          max_batch_tokens=int(self.max_batch_tokens))
      logging.info("%s: %d answers of up to %d tokens in %.1f s.", self.name, len(idx),
                   max_new_tokens, time.perf_counter() - t0)
      new = []
      for j, i in enumerate(idx):
        self._memo[keys[i]] = (out.texts[j], list(out.token_ids[j]), bool(out.finished[j]))
        pre = prefills[i]
        if pre is not None and not isinstance(pre, str):
          pre = [int(t) for t in pre]
        new.append({"key": keys[i], "prompt": prompts[i], "prefill": pre,
                    "max_new_tokens": int(max_new_tokens), "completion": out.texts[j],
                    "token_ids": list(out.token_ids[j]), "finished": bool(out.finished[j])})
      if self.cache_file and _is_primary():  # one write per call
        files.append_text(self.cache_file,
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
    got = [self._memo[k] for k in keys]
    return _generation(got)

  def answer_logprobs(self, prompts: Sequence[str],
                      responses: Sequence[str | Sequence[int]]) -> list[np.ndarray]:
    """Per response token log-prob under this model (teacher-forced after the chat prompt)."""
    out: list[np.ndarray | None] = [None] * len(prompts)
    embed = gen_lib.as_embed_partial(self.embed_fn)
    for idx, b in _scoring_batches(self.tokenizer, prompts, responses,
                                   _scoring_rows(self.batch_size)):
      lp = np.asarray(_logprobs(self.params, embed, b.ids, b.mask, b.pos, b.tgt, cfg=self.cfg))
      for r, i in enumerate(idx):
        out[i] = lp[r, :b.lengths[r]]
    return out  # type: ignore[return-value]


def answer_token_kl(base: ModelUnderTest, model: ModelUnderTest, prompts: Sequence[str],
                    responses: Sequence[str | Sequence[int]]) -> list[np.ndarray]:
  """Per response token KL(base || model) of the next-token distributions (full vocabulary),
  teacher-forced on `responses` (e.g. the base model's own answers)."""
  if model is base:
    return [np.zeros(len(_response_ids(base.tokenizer, r)), np.float32) for r in responses]
  if isinstance(model, GatedModel):  # the base model answers what the gate lets through
    return model.route(prompts, lambda m, ix: answer_token_kl(
        base, m, [prompts[i] for i in ix], [responses[i] for i in ix]),
        base_fn=lambda ix: answer_token_kl(base, base, [prompts[i] for i in ix],
                                           [responses[i] for i in ix]))
  out: list[np.ndarray | None] = [None] * len(prompts)
  ep, eq = gen_lib.as_embed_partial(base.embed_fn), gen_lib.as_embed_partial(model.embed_fn)
  for idx, b in _scoring_batches(base.tokenizer, prompts, responses,
                                 _scoring_rows(model.batch_size)):
    kl = np.asarray(_pair_kl(base.params, ep, model.params, eq, b.ids, b.mask, b.pos,
                             cfg=base.cfg))
    for r, i in enumerate(idx):
      out[i] = kl[r, :b.lengths[r]]
  return out  # type: ignore[return-value]


@dataclasses.dataclass(eq=False)
class GatedModel(_Answers):
  """The adapted model behind a gate (probes/gate.py): a prompt the gate flags gets
  `adapted`'s answer, any other the frozen `base`'s. Both keep their own memos, so a gated
  evaluation after the "before" and "after" ones generates nothing new."""
  name: str
  base: ModelUnderTest
  adapted: ModelUnderTest
  gate_fn: Callable[[Sequence[str]], np.ndarray]  # prompts -> bool [N]: adapters on
  _flags: dict[str, bool] = dataclasses.field(default_factory=dict, repr=False)

  @property
  def tokenizer(self) -> Any:
    return self.adapted.tokenizer

  @property
  def batch_size(self) -> int:
    return self.adapted.batch_size

  def flags(self, prompts: Sequence[str]) -> np.ndarray:
    """[N] bool, memoised per prompt (the gate costs one prompt forward of the base)."""
    todo = list(dict.fromkeys(p for p in prompts if p not in self._flags))
    if todo:
      got = np.asarray(self.gate_fn(todo), bool)
      if got.shape != (len(todo),):
        raise ValueError(f"gate_fn: got shape {got.shape} for {len(todo)} prompts.")
      self._flags.update(zip(todo, got.tolist()))
    return np.array([self._flags[p] for p in prompts], bool)

  def route(self, prompts: Sequence[str], fn: Callable[[ModelUnderTest, list[int]], list],
            base_fn: Callable[[list[int]], list] | None = None) -> list:
    """fn(model, row indices) -> that many results, called once per side; the results come
    back in prompt order. base_fn, when given, replaces fn(base, .) for the unflagged rows."""
    on = self.flags(prompts)
    out: list[Any] = [None] * len(prompts)
    for side, ix in ((True, np.flatnonzero(on).tolist()), (False, np.flatnonzero(~on).tolist())):
      if not ix:
        continue
      got = (fn(self.adapted, ix) if side else
             base_fn(ix) if base_fn is not None else fn(self.base, ix))
      for i, g in zip(ix, got):
        out[i] = g
    return out

  def generate_full(self, prompts: Sequence[str], max_new_tokens: int,
                    prefills: Sequence[Prefill] | None = None) -> gen_lib.Generation:
    prompts = list(prompts)
    prefills = [None] * len(prompts) if prefills is None else list(prefills)

    def gen(m: ModelUnderTest, ix: list[int]) -> list[tuple[str, list[int], bool]]:
      g = m.generate_full([prompts[i] for i in ix], max_new_tokens, [prefills[i] for i in ix])
      return list(zip(g.texts, g.token_ids, g.finished))

    got = self.route(prompts, gen)
    return _generation(got)

  def answer_logprobs(self, prompts: Sequence[str],
                      responses: Sequence[str | Sequence[int]]) -> list[np.ndarray]:
    return self.route(prompts, lambda m, ix: m.answer_logprobs(
        [prompts[i] for i in ix], [responses[i] for i in ix]))


@dataclasses.dataclass
class _ScoreBatch:
  ids: np.ndarray  # int32 [B, L], right-padded prompt + response
  mask: np.ndarray  # bool [B, L]
  pos: np.ndarray  # int32 [B, N]: position whose logits predict response token j
  tgt: np.ndarray  # int32 [B, N]: response token j
  lengths: list[int]  # response tokens per real row


def _scoring_rows(batch_size: int) -> int:
  # Scoring holds [rows, tokens, vocabulary] logits (two models' for the KL), where a
  # generation step holds [rows, vocabulary]: a quarter of the generation batch keeps
  # its peak memory below generation's.
  return max(1, batch_size // 4)


def _response_ids(tokenizer: Any, response: str | Sequence[int]) -> list[int]:
  return chat_lib.encode_prefill(tokenizer, response)


def _scoring_batches(tokenizer: Any, prompts: Sequence[str],
                     responses: Sequence[str | Sequence[int]], batch_size: int):
  """(row indices, _ScoreBatch) with bucketed shapes, so scoring compiles once per bucket."""
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses.")
  p_ids = chat_lib.encode(tokenizer, chat_lib.format_prompts(tokenizer, prompts))
  r_ids = [_response_ids(tokenizer, r) for r in responses]
  pad = chat_lib.pad_id(tokenizer)
  rows = gen_lib.batch_rows(len(prompts), batch_size)
  order = sorted(range(len(prompts)), key=lambda i: len(p_ids[i]) + len(r_ids[i]))
  new_shape = malloc.ReleaseOnNewShape()
  for start in range(0, len(order), rows):
    idx = order[start:start + rows]
    L = gen_lib.prompt_bucket(max(len(p_ids[i]) + len(r_ids[i]) for i in idx))
    N = max(8, -(-max(len(r_ids[i]) for i in idx) // 8) * 8)
    new_shape((L, N))
    ids = np.full((rows, L), pad, np.int32)
    mask = np.zeros((rows, L), bool)
    pos = np.zeros((rows, N), np.int32)
    tgt = np.full((rows, N), pad, np.int32)
    for r, i in enumerate(idx):
      p, t = p_ids[i], r_ids[i]
      ids[r, :len(p) + len(t)] = p + t
      mask[r, :len(p) + len(t)] = True
      pos[r, :len(t)] = len(p) - 1 + np.arange(len(t))
      tgt[r, :len(t)] = t
    yield idx, _ScoreBatch(ids, mask, pos, tgt, [len(r_ids[i]) for i in idx])
  malloc.release()


def _response_logits(params, embed, ids_BxL, mask_BxL, pos_BxN, cfg):
  x_BxLxD = embed(params, cfg, ids_BxL)
  out = transformer.forward(params, cfg, inputs_embeds_BxTxD=x_BxLxD, attention_mask_BxS=mask_BxL,
                            compute_logits=False)
  h_BxNxD = jnp.take_along_axis(out.hidden, pos_BxN[..., None], axis=1)
  return transformer.lm_head(params, cfg, h_BxNxD)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _logprobs(params, embed, ids_BxL, mask_BxL, pos_BxN, tgt_BxN, *, cfg):
  logp_BxNxV = jax.nn.log_softmax(_response_logits(params, embed, ids_BxL, mask_BxL, pos_BxN,
                                                   cfg), axis=-1)
  return jnp.take_along_axis(logp_BxNxV, tgt_BxN[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _pair_kl(params_p, embed_p, params_q, embed_q, ids_BxL, mask_BxL, pos_BxN, *, cfg):
  return token_kl(_response_logits(params_p, embed_p, ids_BxL, mask_BxL, pos_BxN, cfg),
                  _response_logits(params_q, embed_q, ids_BxL, mask_BxL, pos_BxN, cfg))


def base_cache_file(config: Any, workdir: str, model_id: str = "") -> str:
  """Where the frozen base model's generations are kept: config.eval.cache_dir (shared by
  every cell of an experiment) or W/evals/cache, one file per model and dtype. model_id
  names a frozen model that is not the checkpoint itself (the retention scenario's
  aligned model: its workdir and step)."""
  mc = config.model
  cache_dir = cfg_get(config.eval, "cache_dir", "") or os.path.join(workdir, EVALS_DIR, "cache")
  ident = json.dumps([str(mc.name_or_path), str(mc.dtype), str(mc.param_dtype)]
                     + ([model_id] if model_id else []))
  return os.path.join(cache_dir, f"generations-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"
                      ".jsonl")


# ----------------------------------------------------------------------------
# The context evaluators get.


@dataclasses.dataclass(eq=False)
class EvalContext:
  config: Any
  workdir: str
  data: Any  # semsafe_jax.data.pipeline.PreparedData
  base: ModelUnderTest  # the frozen base model (the "before" model)
  judges: dict[str, Any] | None = None  # name -> judges.Judge; built from config.judges
  cache_dir: str | None = None  # judge artefacts; None = W/evals/cache

  def get_judges(self) -> dict[str, Any]:
    if self.judges is None:
      from semsafe_jax.eval import judges as judges_lib  # pylint: disable=g-import-not-at-top
      self.judges = judges_lib.make_judges(judge_names(self.config), self)
    return self.judges

  @property
  def primary_judge(self) -> str:
    return next(iter(self.get_judges()))

  def out_dir(self) -> str:
    return self.cache_dir or os.path.join(self.workdir, EVALS_DIR, "cache")

  # Evaluator options that fall back on config.eval (the main job's settings).
  def max_new_tokens(self, opts: dict[str, Any]) -> int:
    """opts["max_new_tokens"], or config.eval.max_new_tokens when it is 0."""
    v = int(opts.get("max_new_tokens", 0) or 0)
    return v if v > 0 else int(self.config.eval.max_new_tokens)

  def cap(self, value: Any) -> int:
    """A prompt cap: 0 = all, < 0 = config.eval.max_per_split."""
    v = int(value)
    return int(self.config.eval.max_per_split) if v < 0 else v

  def seed(self, value: Any) -> int:
    """A subsample seed: < 0 = config.eval.seed."""
    v = int(value)
    return int(self.config.eval.seed) if v < 0 else v


def judge_names(config: Any) -> list[str]:
  names = cfg_get(config, "judges", ("string_match",)) or ("string_match",)
  names = [names] if isinstance(names, str) else list(names)
  if len(set(names)) != len(names):
    raise ValueError(f"config.judges={tuple(names)} lists a judge twice.")
  return names


# ----------------------------------------------------------------------------
# Helpers evaluators share.


def split_rows(data: Any, split: str) -> np.ndarray:
  return np.asarray(data.splits.get(split, []), dtype=np.int64)


def subsample(rows: np.ndarray, cap: int, seed: int) -> np.ndarray:
  """At most `cap` rows (0 = all), a deterministic, sorted sample: the same rule
  (and so the same prompts) as the main job's evaluation splits."""
  rows = np.asarray(rows, np.int64)
  if cap and len(rows) > cap:
    rows = np.sort(np.random.default_rng(seed).choice(rows, int(cap), replace=False))
  return rows


def judge_rows(ctx: EvalContext, rows: list[dict[str, Any]]) -> None:
  """Fills each row's `judges` ({judge: refused}) and `scores` ({judge: probability},
  for judges that give one) in place."""
  if not rows:
    return
  prompts = [r["prompt"] for r in rows]
  completions = [r["completion"] for r in rows]
  for r in rows:
    r.setdefault("judges", {})
    r.setdefault("scores", {})
  for name, judge in ctx.get_judges().items():
    v = judge(prompts, completions)
    for i, r in enumerate(rows):
      r["judges"][name] = bool(v.refused[i])
      if v.score is not None:
        r["scores"][name] = round(float(v.score[i]), 6)


def refusal_metrics(ctx: EvalContext, rows: Sequence[dict[str, Any]],
                    group_of: Callable[[dict[str, Any]], str] = lambda r: r["group"],
                    ) -> dict[str, Metric]:
  """"<group>/refusal" (primary judge) and "<group>/refusal@<judge>" (the others)."""
  judges = list(ctx.get_judges())
  groups: dict[str, list[dict[str, Any]]] = {}
  for r in rows:
    groups.setdefault(group_of(r), []).append(r)
  out = {}
  for g, rs in groups.items():
    for j in judges:
      k = sum(bool(r["judges"][j]) for r in rs)
      name = f"{g}/refusal" if j == judges[0] else f"{g}/refusal@{j}"
      out[name] = Metric.rate(k, len(rs), judge=j)
  return out


def prompt_row(group: str, key: str, prompt: str, completion: str, label: str,
               **extra: Any) -> dict[str, Any]:
  return {"group": group, "key": key, "prompt": prompt, "completion": completion,
          "label": label, "judges": {}, "scores": {}, **extra}


# ----------------------------------------------------------------------------
# Plug-in lookup and options.

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def available_evaluators() -> list[str]:
  from semsafe_jax.eval import evaluators  # pylint: disable=g-import-not-at-top
  return sorted(m.name for m in pkgutil.iter_modules(evaluators.__path__))


def get_evaluator(kind: str):
  """The module semsafe_jax.eval.evaluators.<kind>."""
  if not isinstance(kind, str) or not _NAME.match(kind) or kind not in available_evaluators():
    raise ValueError(f"evaluation type {kind!r} is unknown; expected one of "
                     f"{', '.join(available_evaluators())}.")
  return importlib.import_module(f"semsafe_jax.eval.evaluators.{kind}")


def _plain(x: Any) -> Any:
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_plain(v) for v in x)
  return x


def resolve_options(name: str, kind: str, spec: Any, allowed: dict[str, Any]) -> dict[str, Any]:
  """The evaluator's OPTIONS overridden by the spec; an unknown option is an error."""
  spec = {k: v for k, v in _plain(spec).items() if k != "type"}
  unknown = sorted(set(spec) - set(allowed))
  if unknown:
    raise ValueError(f"config.evals.{name}.{unknown[0]} is not an option of type {kind!r}; "
                     f"allowed: {', '.join(sorted(allowed)) or 'none'}.")
  return {**allowed, **spec}


def eval_specs(config: Any) -> list[tuple[str, str, dict[str, Any]]]:
  """[(name, type, options)] of config.evals, checked (before any model work)."""
  out = []
  for name, spec in _plain(cfg_get(config, "evals", {}) or {}).items():
    if not isinstance(spec, dict) or "type" not in spec:
      raise ValueError(f"config.evals.{name} must be a dict with a 'type' (one of "
                       f"{', '.join(available_evaluators())}); got {spec!r}.")
    mod = get_evaluator(spec["type"])
    opts = resolve_options(name, spec["type"], spec, getattr(mod, "OPTIONS", {}))
    opts["type"] = spec["type"]
    out.append((name, spec["type"], opts))
  return out


def check_config(config: Any) -> None:
  """Raises ValueError for a bad config.evals / config.judges, before any model work."""
  from semsafe_jax.eval import judges as judges_lib  # pylint: disable=g-import-not-at-top
  eval_specs(config)
  judges_lib.check_judge_names(judge_names(config))


# ----------------------------------------------------------------------------
# Running them.


def judge_agreement(rows: Sequence[dict[str, Any]], judges: Sequence[str],
                    max_listed: int = 20) -> dict[str, Any]:
  """Per model, Cohen's kappa of every judge with the primary one, and the answers
  they disagree on (up to max_listed)."""
  out: dict[str, Any] = {}
  if len(judges) < 2:
    return out
  primary = judges[0]
  for model in dict.fromkeys(r["model"] for r in rows):
    mine = [r for r in rows if r["model"] == model and primary in r.get("judges", {})
            and not r.get("derived")]
    per = {}
    for j in judges[1:]:
      both = [r for r in mine if j in r["judges"]]
      if not both:
        continue
      x = [r["judges"][primary] for r in both]
      y = [r["judges"][j] for r in both]
      dis = [r for r in both if r["judges"][primary] != r["judges"][j]]
      kappa = stats.cohen_kappa(x, y)
      per[f"{primary}|{j}"] = {
          "kappa": None if kappa is None else round(kappa, 4), "n": len(both),
          "agreement": round(1 - len(dis) / len(both), 4), "disagreements": len(dis),
          "examples": [{"group": r["group"], "key": r["key"], "prompt": r["prompt"],
                        "completion": r["completion"], "judges": r["judges"]}
                       for r in dis[:max_listed]]}
    if per:
      out[model] = per
  return out


def write_rows(workdir: str, name: str, rows: Sequence[dict[str, Any]]) -> str:
  path = os.path.join(workdir, EVALS_DIR, f"{name}.jsonl")
  files.write_jsonl(path, rows)
  return path


def run_evals(config: Any, ctx: EvalContext, models: Sequence[ModelUnderTest]
              ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
  """Runs every evaluation of config.evals on every model.

  Returns (report section {name: {"type", <model name>: {metric: Metric dict},
  "judges", "judge_agreement", "group_labels", "seconds", "notes"}},
  {name: rows}); the rows (each with its "model") also go to W/evals/<name>.jsonl.
  """
  specs = eval_specs(config)
  if not specs:
    return {}, {}
  judges = list(ctx.get_judges())
  max_listed = int(cfg_get(cfg_get(config, "judge", {}) or {}, "max_disagreements", 20))
  section: dict[str, Any] = {}
  rows_by_eval: dict[str, list[dict[str, Any]]] = {}
  for name, kind, opts in specs:
    mod = get_evaluator(kind)
    entry: dict[str, Any] = {"type": kind, "judges": judges}
    rows: list[dict[str, Any]] = []
    labels: dict[str, str] = {}
    notes: list[str] = []
    seconds = {}
    for model in models:
      t0 = time.perf_counter()
      res = mod.evaluate(ctx, model, opts)
      seconds[model.name] = round(time.perf_counter() - t0, 2)
      entry[model.name] = {k: m.to_dict() for k, m in res.metrics.items()}
      rows += [{"model": model.name, **r} for r in res.rows]
      labels.update(res.group_labels)
      notes += [n for n in res.notes if n not in notes]
      logging.info("Evaluation %s (%s) on %s: %d prompts in %.1f s.", name, kind, model.name,
                   len(res.rows), seconds[model.name])
    entry["group_labels"] = labels
    entry["judge_agreement"] = judge_agreement(rows, judges, max_listed)
    entry["seconds"] = seconds
    if notes:
      entry["notes"] = notes
    section[name] = entry
    rows_by_eval[name] = rows
    if _is_primary():
      write_rows(ctx.workdir, name, rows)
  return section, rows_by_eval
