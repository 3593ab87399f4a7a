"""What the retention methods share: the task rows and batches, the task loss, LoRA factor
surgery, and the statistics some methods take from the aligned model (the Gram matrices of
a kernel's inputs, the diagonal Fisher of a loss).

The methods run in the ordinary main job, whose frozen model (`ctx.params`) is the aligned
model (aligned.py); `ctx.aligned` says where it came from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from semsafe_jax import adapters as adapters_lib
from semsafe_jax import files
from semsafe_jax.adapters.lora import get_path, lora_modules, set_path
from semsafe_jax.errors import ConfigError
from semsafe_jax.losses.common import safe_div
from semsafe_jax.methods import common as mcommon
from semsafe_jax.methods.base import Prepared, Tokens
from semsafe_jax.models import transformer
from semsafe_jax.models.config import ModelConfig
from semsafe_jax.retention import section
from semsafe_jax.retention import tasks as tasks_lib
from semsafe_jax.train import checkpoint as ckpt_lib
from semsafe_jax.train import inputs, sharding

Params = dict[str, Any]


@flax.struct.dataclass
class TaskBatch:
  task: Tokens  # prompt + reference answer of `retention.task_per_step` training tasks


# --- Task data.


@dataclasses.dataclass(frozen=True)
class TaskStage:
  split: tasks_lib.TaskSplit
  rows: inputs.Rows  # the training tasks, tokenised
  per_step: int
  seed: int

  def tokens(self, step: int) -> Tokens:
    idx = tasks_lib.batch_rows(len(self.split.train), self.per_step, self.seed, step)
    return Tokens.take(self.rows, idx)


def check(config: Any) -> None:
  """The method-side checks of config.retention (validate.py runs them before any work)."""
  rc = section(config)
  if rc is None:
    raise ConfigError("retention", None, "this method fine-tunes a safety-trained model: "
                      "load configs/retention.py (the configs/methods/<name>.py of the "
                      "retention methods do)")
  from semsafe_jax.retention import aligned as aligned_lib  # pylint: disable=g-import-not-at-top
  workdir = aligned_lib.workdir_of(config)
  if not files.exists(os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)):
    raise ConfigError("retention.aligned_workdir", rc.aligned_workdir, f"{workdir} holds no "
                      "checkpoint: train a safety model there first (e.g. python -m "
                      f"semsafe_jax.main --config=configs/default.py --workdir={workdir})")
  for spec in tuple(rc.task_sources):
    tasks_lib.parse_spec(spec)
  for field in ("task_per_step", "max_response_tokens"):
    if int(rc[field]) < 1:
      raise ConfigError(f"retention.{field}", rc[field], "expected an integer >= 1")
  if not 0.0 < float(rc.heldout_frac) < 1.0:
    raise ConfigError("retention.heldout_frac", rc.heldout_frac, "expected a number in (0, 1)")


def task_stage(ctx) -> TaskStage:
  rc = ctx.config.retention
  split = tasks_lib.from_config(ctx.config)
  per_step = int(rc.task_per_step)
  shards = sharding.batch_size_divisor(ctx.mesh)
  if per_step % shards:
    raise ConfigError("retention.task_per_step", per_step, f"must be a multiple of the "
                      f"{shards} batch shards")
  rows = inputs.encode_rows(ctx.tokenizer, [t.prompt for t in split.train],
                            [t.response for t in split.train], int(ctx.config.data.max_len),
                            int(rc.max_response_tokens))
  logging.info("Task: %d training and %d held-out tasks; rows %s (%d prompts shortened).",
               len(split.train), len(split.heldout), rows.ids.shape, rows.truncated)
  return TaskStage(split, rows, per_step, int(ctx.config.seed))


def tasks_key(config: Any) -> str:
  """What the task split depends on (a key for caches of task statistics)."""
  rc = config.retention
  return json.dumps([list(rc.task_sources), float(rc.heldout_frac), int(config.data.max_len),
                     int(rc.max_response_tokens)])


def n_max(config: Any) -> int:
  return int(config.retention.max_response_tokens)


def task_loss(params: Params, cfg: ModelConfig, embed_fn: Callable, t: Tokens,
              n: int) -> jax.Array:
  """Token-mean cross-entropy of the reference answers: plain SFT on the task."""
  logits, targets, mask, _ = mcommon.response_logits(params, cfg, embed_fn, t, n)
  s, count = mcommon.token_ce_sums(logits, targets, mask, t.weight)
  return safe_div(s, count)


def prepared(ctx, trainable: Params, loss_fn: Callable, stage: TaskStage, *,
             frozen: Params | None = None, batch_fn: Callable | None = None,
             finalize: Callable | None = None, report: dict[str, Any] | None = None
             ) -> Prepared:
  """The Prepared of a retention method: frozen["base"] is the aligned model."""
  rep = {"task": {"train": len(stage.split.train), "heldout": len(stage.split.heldout)},
         **(report or {})}
  if ctx.aligned is not None:
    rep["aligned"] = ctx.aligned.describe()
  return Prepared(trainable=trainable, loss_fn=loss_fn,
                  batch_fn=batch_fn or (lambda step: TaskBatch(task=stage.tokens(step))),
                  frozen={"base": ctx.params, **(frozen or {})}, frozen_axes=ctx.base_axes(),
                  report=rep, finalize=finalize)


# --- LoRA factors.


def lora_paths(trainable: Params) -> list[str]:
  """The adapted modules ('layers/attn/q_proj'), sorted."""
  return sorted(lora_modules(trainable.get("lora", {})))


def kernel(params: Params, module: str) -> Any:
  return get_path(params, f"{module}/kernel")


# --- Statistics of the aligned model, cached in W.


@contextlib.contextmanager
def single_threaded_lapack():
  """LAPACK (OpenBLAS, which jax's CPU factorisations call) on one thread inside: next to
  XLA's own threads on a busy CPU, its thread pool made a [576, 40] QR take 0.7 s instead
  of under 1 ms. A no-op without threadpoolctl."""
  try:
    import threadpoolctl  # pylint: disable=g-import-not-at-top
    # jax's LAPACK kernels are scipy's, loaded on first use: load them so the limit sees them.
    import scipy.linalg.cython_lapack  # noqa: F401  # pylint: disable=g-import-not-at-top
  except ImportError:
    yield
    return
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    yield


def save_modules(path: str, arrays: dict[str, dict[str, np.ndarray]],
                 settings: dict[str, Any]) -> None:
  flat = {f"{m}|{k}": np.asarray(v) for m, d in arrays.items() for k, v in d.items()}
  flat["settings"] = np.asarray(json.dumps(settings, sort_keys=True))
  files.save_npz(path, flat)


def load_modules(path: str) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]] | None:
  """({module: {name: array}}, settings) of a save_modules file, or None."""
  if not files.exists(path):
    return None
  flat = files.load_npz(path)
  out: dict[str, dict[str, np.ndarray]] = {}
  for key, v in flat.items():
    if key != "settings":
      m, k = key.split("|")
      out.setdefault(m, {})[k] = v
  return out, json.loads(str(flat["settings"]))


def cached_modules(ctx, name: str, settings: dict[str, Any],
                   compute: Callable[[], dict[str, dict[str, np.ndarray]]]
                   ) -> dict[str, dict[str, np.ndarray]]:
  """compute(), cached in W/<name> and reused while `settings` (what it depends on) match:
  a resumed run skips it."""
  path = os.path.join(ctx.workdir, name)
  got = load_modules(path)
  if got is not None and got[1] == json.loads(json.dumps(settings, sort_keys=True)):
    logging.info("Reusing %s.", path)
    return got[0]
  out = compute()
  if ctx.primary:
    save_modules(path, out, settings)
  return out


class _Tap:
  """A kernel stand-in for an eager forward: `x @ tap` is `x @ kernel`, and adds the Gram
  matrix of x's real tokens to `gram`. The model code stays untouched."""

  def __init__(self, kernel_IxO: jax.Array):
    self.kernel = kernel_IxO
    self.mask_BxT: jax.Array | None = None
    self.gram = jnp.zeros((kernel_IxO.shape[0],) * 2, jnp.float32)

  def astype(self, dtype):
    del dtype
    return self

  def __rmatmul__(self, x_BxTxI):
    x = x_BxTxI.astype(jnp.float32) * self.mask_BxT[..., None]
    x_NxI = x.reshape(-1, x.shape[-1])
    self.gram = self.gram + x_NxI.T @ x_NxI
    return x_BxTxI @ self.kernel.astype(x_BxTxI.dtype)


def kernel_input_grams(params: Params, cfg: ModelConfig, ids_NxT: np.ndarray,
                       mask_NxT: np.ndarray, modules: Sequence[str], batch_size: int
                       ) -> dict[str, np.ndarray]:
  """{module: [L, in, in]} Σ x xᵀ over the real tokens of the rows, x the input of the
  module's kernel at each layer; the model runs eagerly, layer by layer."""
  cfg = cfg.replace(remat=False, layer_loop="unroll")
  L = cfg.num_layers
  layers = [jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(L)]
  taps = {m: [] for m in modules}
  for i, layer in enumerate(layers):
    for m in modules:
      node = layer
      for part in m.split("/")[1:]:  # "layers/attn/q_proj" -> layer["attn"]["q_proj"]
        node[part] = dict(node[part])
        node = node[part]
      node["kernel"] = _Tap(node["kernel"])
      taps[m].append(node["kernel"])
  eager = {**params, "layers": layers}
  width = int(np.asarray(mask_NxT).sum(1).max())
  for start in range(0, len(ids_NxT), batch_size):
    ids = jnp.asarray(ids_NxT[start:start + batch_size, :width])
    mask = jnp.asarray(mask_NxT[start:start + batch_size, :width])
    for ts in taps.values():
      for t in ts:
        t.mask_BxT = mask.astype(jnp.float32)
    transformer.forward(eager, cfg, ids, attention_mask_BxS=mask, compute_logits=False)
  return {m: np.stack([np.asarray(t.gram) for t in ts]) for m, ts in taps.items()}


def _with_kernels(params: Params, kernels: dict[str, jax.Array]) -> Params:
  out = jax.tree.map(lambda x: x, params)  # new containers, same arrays
  for m, k in kernels.items():
    set_path(out, f"{m}/kernel", k)
  return out


@functools.partial(jax.jit, static_argnames=("cfg", "n"))
def _sq_grads(kernels, params, ids, mask, tmask, *, cfg, n):
  def loss(k):
    p = _with_kernels(params, k)
    t = Tokens(ids=ids, mask=mask, target_mask=tmask, prompt_end=jnp.zeros(ids.shape[0], jnp.int32),
               weight=jnp.ones(ids.shape[0], jnp.float32))
    return task_loss(p, cfg, adapters_lib.adapted_embed_fn({}), t, n)
  return jax.tree.map(jnp.square, jax.grad(loss)(kernels))


def diag_fisher(params: Params, cfg: ModelConfig, rows: inputs.Rows, modules: Sequence[str],
                *, batch_size: int, batches: int, seed: int, n: int
                ) -> dict[str, np.ndarray]:
  """{module: [L, in, out]} the empirical diagonal Fisher of the token-mean cross-entropy of
  `rows`' targets w.r.t. the module's kernel: squared mini-batch gradients (batch_size rows,
  drawn with a seed), averaged over `batches` batches."""
  cfg = cfg.replace(layer_loop="scan")  # one compiled block: the gradient is a one-off
  kernels = {m: kernel(params, m) for m in modules}
  rng = np.random.default_rng([seed, 4242])
  total = None
  for _ in range(batches):
    idx = rng.choice(len(rows.ids), size=min(batch_size, len(rows.ids)), replace=False)
    sq = _sq_grads(kernels, params, jnp.asarray(rows.ids[idx]), jnp.asarray(rows.mask[idx]),
                   jnp.asarray(rows.target_mask[idx]), cfg=cfg, n=n)
    total = sq if total is None else jax.tree.map(jnp.add, total, sq)
  return {m: np.asarray(v) / batches for m, v in total.items()}
