"""fit: one compile per run, gradient accumulation, logs, sampler state."""

import pathlib

import numpy as np
import pytest

import test_train_toy as toy
from semsafe_jax.train import checkpoint as ckpt_lib


class StatefulBatches(toy.BatchFn):
  """A batch_fn with checkpointed state (still a pure function of the step)."""

  def __init__(self, **kw):
    super().__init__(**kw)
    self.loaded = None

  def state_dict(self):
    return {"seed": self.seed, "epoch_order": [3, 1, 2]}

  def load_state_dict(self, d):
    self.loaded = d


def test_accumulating_run_compiles_once_logs_and_restores_sampler(tmp_path):
  workdir = tmp_path / "w"
  c = toy.toy_config(4, grad_accum=2)
  data = StatefulBatches(batch=8)
  with toy.record_train_steps() as made:
    params, history = toy.run(str(workdir), c, data)
  assert [m.trace_count for m in made] == [1]
  assert [m._jitted._cache_size() for m in made] == [1]
  assert [h["step"] for h in history] == [1, 2, 3, 4]
  assert all(np.isfinite(h["loss"]) and np.isfinite(h["l_ce"]) for h in history)
  assert {"loss", "l_ce", "l_max", "grad_norm", "lr", "skipped"} <= set(history[0])

  events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert events and events[0].stat().st_size > 0

  step_dir = workdir / ckpt_lib.CHECKPOINT_DIR / "4"
  assert {"trainable", "train_state", "data"} <= {p.name for p in step_dir.iterdir()}

  # A finished run re-run in its workdir: restores, trains nothing, same params.
  again = StatefulBatches(batch=8)
  params2, history2 = toy.run(str(workdir), c, again)
  assert history2 == []
  assert again.loaded == {"seed": 0, "epoch_order": [3, 1, 2]}
  np.testing.assert_array_equal(toy.flat(params2), toy.flat(params))


def test_returned_params_are_usable_after_fit(tmp_path):
  # fit donates its own copies: the caller's initial adapters stay alive.
  init = toy.init_trainable()
  before = toy.flat(init)
  c = toy.toy_config(toy.STRAIGHT_STEPS)  # same step as the shared run: a cache hit
  with toy.compile_cache():
    toy.trainer.fit(toy.loss_fn, init, toy.BatchFn(), c, str(pathlib.Path(tmp_path) / "w"),
                    frozen=toy.frozen_params())
  np.testing.assert_array_equal(toy.flat(init), before)


class _Order(toy.BatchFn):
  """Records, at each batch request, how many steps' metrics fit had read."""

  def __init__(self, read, **kw):
    super().__init__(**kw)
    self.read, self.seen = read, []

  def __call__(self, step):
    self.seen.append((step, len(self.read)))
    return super().__call__(step)


def test_overlap_steps_changes_the_order_not_the_result(tmp_path, monkeypatch):
  """Overlapped, step s+1 is queued before step s's metrics are read; not overlapped (the
  CPU default, which halves the host's peak), after. The trained params are the same."""
  assert not toy.trainer.overlaps_steps("auto") and toy.trainer.overlaps_steps("on")
  with pytest.raises(ValueError, match="overlap_steps"):
    toy.trainer.overlaps_steps("sometimes")
  read = []
  real_step = toy.trainer._Logger.step
  monkeypatch.setattr(toy.trainer._Logger, "step",
                      lambda self, m, log: (read.append(m["step"]), real_step(self, m, log)))
  out = {}
  for mode in ("on", "off"):
    read.clear()
    data = _Order(read)
    out[mode] = toy.run(str(tmp_path / mode), toy.toy_config(4, overlap_steps=mode), data)
    # Batch s is requested once s steps ran. Not overlapped, all s were read by then;
    # overlapped, step s is still pending (unless a checkpoint just read it: steps 1, 2).
    lag = dict(data.seen)
    if mode == "off":
      assert all(n == s for s, n in data.seen), data.seen
    else:
      assert lag[3] == 2, data.seen
  np.testing.assert_array_equal(toy.flat(out["on"][0]), toy.flat(out["off"][0]))
  assert out["on"][1] == out["off"][1]
