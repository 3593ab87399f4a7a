"""The jit train step: schedule, non-finite skipping, accumulation, bf16."""

import jax
import jax.numpy as jnp
import numpy as np

import test_train_toy as toy
from semsafe_jax.models import transformer
from semsafe_jax.train import step as step_lib


def _setup(**train):
  c = toy.toy_config(10, **train)
  optimizer, schedule = step_lib.make_optimizer(c.train)
  state = step_lib.init_state(toy.init_trainable(), optimizer, seed=0)
  return c, optimizer, schedule, state


def test_schedule_warmup_then_cosine():
  c = toy.toy_config(10)
  c.train.lr, c.train.warmup_steps, c.train.end_lr_frac = 1.0, 4, 0.1
  sched = step_lib.make_schedule(c.train)
  lrs = np.array([float(sched(i)) for i in range(10)])
  np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)  # no lr=0 update
  assert np.all(np.diff(lrs[3:]) < 0) and lrs[-1] >= 0.1 - 1e-6


def test_nonfinite_batch_is_skipped_and_counted():
  _, optimizer, schedule, state = _setup()
  train_step = step_lib.TrainStep(toy.loss_fn, optimizer, schedule, donate=False)
  frozen = toy.frozen_params()
  data = toy.BatchFn(nan_steps=(0, 1))
  # Steps 0, 1 are NaN; step 2 is good.
  s1, m1 = train_step(state, frozen, data(0))
  assert int(m1["skipped"]) == 1 and not np.isfinite(float(m1["loss"]))
  np.testing.assert_array_equal(toy.flat(s1.trainable), toy.flat(state.trainable))
  np.testing.assert_array_equal(toy.flat(s1.opt_state), toy.flat(state.opt_state))
  assert (int(s1.step), int(s1.bad_total), int(s1.bad_consecutive)) == (1, 1, 1)
  s2, m2 = train_step(s1, frozen, data(1))
  assert (int(m2["bad_total"]), int(m2["bad_consecutive"])) == (2, 2)
  np.testing.assert_array_equal(toy.flat(s2.trainable), toy.flat(state.trainable))
  s3, m3 = train_step(s2, frozen, data(2))
  assert int(m3["skipped"]) == 0 and int(s3.bad_consecutive) == 0 and int(s3.bad_total) == 2
  assert np.all(np.isfinite(toy.flat(s3.trainable)))
  assert not np.array_equal(toy.flat(s3.trainable), toy.flat(state.trainable))
  # The first applied update used the first lr of the schedule (count 0).
  np.testing.assert_allclose(float(m3["lr"]), float(schedule(0)), rtol=1e-6)
  assert train_step.trace_count == 1


def test_grad_accumulation_matches_full_batch():
  _, optimizer, schedule, state = _setup()
  frozen = toy.frozen_params()
  full = toy.BatchFn(batch=8)(0)
  micro = jax.tree.map(lambda x: np.stack([x[:4], x[4:]]), full)  # [A=2, 4, ...]
  one = step_lib.TrainStep(toy.loss_fn, optimizer, schedule, donate=False)
  acc = step_lib.TrainStep(toy.loss_fn, optimizer, schedule, grad_accum=2, donate=False)
  s1, m1 = one(state, frozen, full)
  s2, m2 = acc(state, frozen, micro)
  np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
  np.testing.assert_allclose(toy.flat(s2.trainable), toy.flat(s1.trainable), atol=1e-6)


def test_bf16_compute_with_remat_keeps_float32_state(monkeypatch):
  monkeypatch.setattr(toy, "CFG", toy.CFG.replace(dtype="bfloat16", param_dtype="bfloat16",
                                                  remat=True))
  _, optimizer, schedule, state = _setup()
  frozen = transformer.init_params(toy.CFG, jax.random.key(1), std=0.1)
  assert frozen["layers"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
  train_step = step_lib.TrainStep(toy.loss_fn, optimizer, schedule)
  batch = toy.BatchFn()(0)
  new, m = train_step(state, frozen, batch)
  new, m = train_step(new, frozen, toy.BatchFn()(1))
  assert np.isfinite(float(m["loss"])) and int(m["skipped"]) == 0
  for tree in (new.trainable, new.opt_state):
    for x in jax.tree.leaves(tree):
      if jnp.issubdtype(x.dtype, jnp.floating):
        assert x.dtype == jnp.float32


def test_trainable_must_be_float32_after_init():
  _, optimizer, _, _ = _setup()
  state = step_lib.init_state({"w": np.ones((2, 2), np.float16)}, optimizer, seed=0)
  assert state.trainable["w"].dtype == jnp.float32


def test_remat_policies_and_layer_loops_give_the_same_gradients(monkeypatch):
  frozen, batch, trainable = toy.frozen_params(), toy.BatchFn()(0), toy.init_trainable()
  base_cfg = toy.CFG

  def grads(**kw):
    monkeypatch.setattr(toy, "CFG", base_cfg.replace(**kw))
    g = jax.jit(jax.grad(lambda t: toy.loss_fn(t, frozen, batch, None)[0]))(trainable)
    return toy.flat(g)

  want = grads(remat=False, layer_loop="scan")
  assert np.abs(want).max() > 0
  for loop in ("scan", "unroll"):
    for remat in (False, True, "full", "dots"):
      np.testing.assert_allclose(grads(remat=remat, layer_loop=loop), want, rtol=1e-5, atol=1e-7)
  with np.testing.assert_raises(ValueError):
    transformer.remat_policy("sometimes")
