"""The jit-compiled train step, generic over the loss.

`loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)` is differentiated
w.r.t. `trainable` only, so no gradients are computed for the frozen model.
The frozen params are a jit argument: closing over them would bake hundreds of
MB of constants into the HLO and recompile per model.

Compute dtype is the model's (`config.model.dtype`, e.g. bfloat16 with remat);
trainable params, gradients and optimizer state are always float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Params = Any
LossFn = Callable[[Params, Any, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]


class TrainState(NamedTuple):
  trainable: Params  # float32 adapter params
  opt_state: optax.OptState
  step: jax.Array  # int32: steps taken, skipped ones included (the data index)
  rng: jax.Array  # uint32 raw key data; step keys are fold_in(rng, step)
  bad_total: jax.Array  # int32: skipped (non-finite) steps so far
  bad_consecutive: jax.Array  # int32: skipped steps since the last good one


def make_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to `lr * end_lr_frac`."""
  steps = int(train_cfg.steps)
  warmup = min(int(train_cfg.warmup_steps), max(steps - 1, 0))
  base = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.lr, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1),
      end_value=train_cfg.lr * train_cfg.get("end_lr_frac", 0.0))
  # Update n (0-based) uses base(n + 1): the first update is not wasted on lr=0.
  return lambda count: base(count + 1) if warmup else base(count)


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping then AdamW on the warmup+cosine schedule."""
  schedule = make_schedule(train_cfg)
  parts = []
  if train_cfg.clip_norm and train_cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.clip_norm))
  parts.append(optax.adamw(schedule, b1=train_cfg.get("b1", 0.9), b2=train_cfg.get("b2", 0.999),
                           eps=train_cfg.get("eps", 1e-8),
                           weight_decay=train_cfg.weight_decay))
  return optax.chain(*parts), schedule


def init_state(trainable: Params, optimizer: optax.GradientTransformation,
               seed: int) -> TrainState:
  """Fresh state. Every leaf gets its own buffer (copies, separate zeros): the
  step donates the state, and a buffer shared with the caller's arrays or
  between leaves would be deleted under the caller or donated twice."""
  trainable = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), trainable)
  zero = lambda: jnp.zeros((), jnp.int32)
  return TrainState(trainable=trainable, opt_state=optimizer.init(trainable), step=zero(),
                    rng=jax.random.key_data(jax.random.key(seed)),
                    bad_total=zero(), bad_consecutive=zero())


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return functools.reduce(jnp.logical_and, leaves, jnp.bool_(True))


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _mean_metrics(metrics: Mapping[str, Any]) -> dict[str, jax.Array]:
  return {k: jnp.mean(jnp.asarray(v, jnp.float32)) for k, v in metrics.items()}


class TrainStep:
  """`step(state, frozen, batch) -> (state, metrics)`, jit-compiled once.

  With `grad_accum` A > 1 the batch has a leading micro-batch axis [A, ...]
  (each micro-batch a complete batch, so any loss works) and gradients are
  averaged under a `lax.scan`. A non-finite loss or gradient skips the update
  (params and optimizer state unchanged) and is counted in the state.
  `trace_count` counts traces, so tests can check the step compiles once.
  """

  def __init__(self, loss_fn: LossFn, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, *, grad_accum: int = 1,
               state_sharding: Any = None, metrics_sharding: Any = None,
               donate: bool = True):
    self.loss_fn = loss_fn
    self.optimizer = optimizer
    self.schedule = schedule
    self.grad_accum = int(grad_accum)
    self.trace_count = 0
    out_shardings = None
    if state_sharding is not None:
      out_shardings = (state_sharding, metrics_sharding)
    kw = {} if out_shardings is None else {"out_shardings": out_shardings}
    # Donating the state lets XLA update params/opt state in place.
    self._jitted = jax.jit(self._step, donate_argnums=(0,) if donate else (), **kw)

  def __call__(self, state: TrainState, frozen: Any, batch: Any) -> tuple[TrainState, dict]:
    return self._jitted(state, frozen, batch)

  def lower(self, state, frozen, batch):
    return self._jitted.lower(state, frozen, batch)

  def _grads(self, trainable, frozen, batch, rng):
    def f(p, b, key):
      loss, metrics = self.loss_fn(p, frozen, b, key)
      return loss, _mean_metrics(metrics)
    grad_fn = jax.value_and_grad(f, has_aux=True)
    if self.grad_accum == 1:
      (loss, metrics), grads = grad_fn(trainable, batch, rng)
      return loss, metrics, grads

    def body(carry, xs):
      k, micro = xs
      (loss, metrics), grads = grad_fn(trainable, micro, jax.random.fold_in(rng, k))
      return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

    # Zero running sums shaped like one micro-step's outputs (eval_shape adds no
    # ops), so the HLO holds a single copy of the forward/backward pass.
    first = jax.tree.map(lambda x: x[0], batch)
    shapes = jax.eval_shape(grad_fn, trainable, first, rng)
    (loss_s, metrics_s), grads_s = shapes
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_s, metrics_s, grads_s))
    (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(self.grad_accum), batch))
    scale = 1.0 / self.grad_accum
    return jax.tree.map(lambda x: x * scale, (loss, metrics, grads))

  def _step(self, state: TrainState, frozen: Any, batch: Any) -> tuple[TrainState, dict]:
    self.trace_count += 1  # Python side effect: runs only while tracing
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss, metrics, grads = self._grads(state.trainable, frozen, batch, key)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    ok = jnp.isfinite(loss) & _all_finite(grads)
    # Zero bad grads so the (discarded) update math stays NaN-free.
    safe_grads = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
    updates, new_opt = self.optimizer.update(safe_grads, state.opt_state, state.trainable)
    new_params = optax.apply_updates(state.trainable, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    bad = (~ok).astype(jnp.int32)
    applied = state.step - state.bad_total  # updates applied so far = optimizer count
    new_state = TrainState(
        trainable=keep(new_params, state.trainable),
        opt_state=keep(new_opt, state.opt_state),
        step=state.step + 1,
        rng=state.rng,
        bad_total=state.bad_total + bad,
        bad_consecutive=jnp.where(ok, 0, state.bad_consecutive + 1).astype(jnp.int32))
    out = dict(metrics)
    out.update(loss=loss.astype(jnp.float32), grad_norm=_global_norm(grads),
               lr=jnp.asarray(self.schedule(applied), jnp.float32), skipped=bad,
               bad_total=new_state.bad_total, bad_consecutive=new_state.bad_consecutive,
               step=new_state.step)
    return new_state, out
