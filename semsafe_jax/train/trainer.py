"""`fit`: the training loop around the jit step.

Builds the mesh, places the frozen model and the adapters, restores the
latest checkpoint of the workdir, runs the step (compiled once for the whole
run), logs to a tqdm bar and TensorBoard (process 0 only; with the consistency
term's pairs per step and share of the loss when the loss reports them), saves
checkpoints (interval, preemption, SIGTERM, end) and stops after
`train.max_bad_steps` consecutive non-finite steps.

The batch for step s must be a pure function of (seed, s) with the same
shapes every step: resuming then replays exactly the data of an
uninterrupted run.
"""

from __future__ import annotations

import io
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from semsafe_jax import files
from semsafe_jax.train import checkpoint as ckpt_lib
from semsafe_jax.train import monitor, sharding
from semsafe_jax.train import step as step_lib
from semsafe_jax.validate import OVERLAP_STEPS

Params = Any
BatchFn = Callable[[int], Any]


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


class Preempted(SystemExit):
  """Raised after saving a checkpoint on SIGTERM or a preemption notice, so the
  job stops instead of reporting on a half-trained model. Re-run to resume."""


class _SigtermFlag:
  """Turns SIGTERM and Ctrl-C (SIGINT) into a flag checked between steps: the loop then
  saves the current step and stops. A second Ctrl-C stops at once. Single-process runs
  only; on several processes JAX's preemption service owns SIGTERM and orbax reports a
  step that every host agrees to save at."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, enabled: bool):
    self.raised = False
    self._old: dict[int, Any] = {}
    self._enabled = enabled and threading.current_thread() is threading.main_thread()

  def __enter__(self):
    if self._enabled:
      for sig in self.SIGNALS:
        self._old[sig] = signal.signal(sig, self._handler)
    return self

  def _handler(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      if self.raised:  # asked twice: stop now, without the checkpoint
        signal.signal(signal.SIGINT, self._old.get(signal.SIGINT, signal.default_int_handler))
        raise KeyboardInterrupt
      logging.warning("Ctrl-C: saving a checkpoint after this step, then stopping "
                      "(press Ctrl-C again to stop at once).")
    self.raised = True

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}


def overlaps_steps(mode: str) -> bool:
  """Whether fit queues step s+1 before it reads step s's metrics (train.overlap_steps).

  On an accelerator the overlap hides the host's batch building behind the device's
  step. On XLA:CPU the "device" is the host: the queued step's buffers are allocated
  while the running step still holds its own, which doubles the step's working set, and
  the host work it would hide is small next to a CPU step (benchmarks/README.md). "auto"
  overlaps off the CPU.
  """
  if mode not in OVERLAP_STEPS:
    raise ValueError(f"train.overlap_steps={mode!r}; expected {', '.join(OVERLAP_STEPS)}")
  if mode == "auto":
    return jax.default_backend() != "cpu"
  return mode == "on"


def _micro_batches(batch_fn: BatchFn, step: int, accum: int) -> Any:
  """Micro-batches of optimizer step `step`, stacked on a leading axis."""
  if accum == 1:
    return batch_fn(step)
  micro = [batch_fn(step * accum + k) for k in range(accum)]
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *micro)


def _data_state(batch_fn: BatchFn, step: int) -> dict[str, Any]:
  state = {"next_step": int(step)}
  if hasattr(batch_fn, "state_dict"):
    state["sampler"] = batch_fn.state_dict()
  return state


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)


class _Logger:
  """TensorBoard scalars + tqdm bar on process 0; silent elsewhere."""

  def __init__(self, workdir: epath.Path, start: int, total: int, enabled: bool,
               progress: bool):
    self.writer = None
    self.bar = None
    if not enabled:
      return
    try:
      from tensorboardX import SummaryWriter
      logdir = str(workdir / "tensorboard")
      if files.is_remote(logdir):
        from tensorboardX import record_writer
        record_writer.register_writer_factory(logdir.split(":", 1)[0], _EventFilesOnEpath())
      self.writer = SummaryWriter(logdir)
    except Exception as e:  # logging must never kill a run
      logging.warning("TensorBoard logging disabled: %s", e)
    if progress:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

  def step(self, m: Mapping[str, float], log: bool) -> None:
    if self.bar is not None:
      shown = {k: f"{v:.4g}" for k, v in m.items()
               if k == "loss" or k.startswith("l_") or k == "bad_total" and v}
      self.bar.set_postfix(shown, refresh=False)
      self.bar.update(1)
    if log:
      s = int(m["step"])
      share = monitor.consistency_summary([m])["consistency_share_mean"]
      if share is not None:  # lam * L_consistency / L_total, when the loss reports both
        m = {**m, "consistency_share": share}
      if self.writer is not None:
        for k, v in m.items():
          if k != "step":
            self.writer.add_scalar(f"train/{k}", v, s)
      if self.bar is None and sharding.is_primary():
        logging.info("step %d: %s", s, ", ".join(f"{k}={v:.4g}" for k, v in m.items()
                                                  if k != "step"))

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None:
      self.writer.close()


class _EventFileOnEpath:
  """A TensorBoard event file on an object store. Objects cannot be appended to, so each
  flush (every 2 minutes, and at the end) writes the whole file again, as tensorboardX's
  own gs:// writer does; going through epath spares that writer's extra client library."""

  def __init__(self, path: str):
    self.path, self.buf = path, io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buf.write(data)

  def flush(self) -> None:
    files.write_bytes(self.path, self.buf.getvalue())

  def close(self) -> None:
    self.flush()


class _EventFilesOnEpath:
  """tensorboardX writer factory for a URL scheme."""

  def open(self, path: str) -> _EventFileOnEpath:
    return _EventFileOnEpath(path)

  def directory_check(self, path: str) -> None:
    del path  # object stores have no folders


def fit(loss_fn: step_lib.LossFn, init_trainable: Params, batch_fn: BatchFn, config,
        workdir: str, *, frozen: Any = None,
        frozen_axes: Mapping[str, Sequence[str]] | None = None,
        mesh: jax.sharding.Mesh | None = None,
        stats: dict[str, int] | None = None) -> tuple[Params, list[dict[str, float]]]:
  """Trains `init_trainable` to `config.train.steps` steps; resumes if W has a checkpoint.

  Args:
    loss_fn: `(trainable, frozen, batch, rng) -> (loss, metrics)`, pure and
      jit-able; metrics a dict of scalars (shown on the bar: keys "l_*"). A loss
      with consistency pairs reports "pairs_valid" (and "l_consistency_weighted",
      "l_total"): fit logs their run summary (train/monitor.py) and warns when
      pairs average below one per step.
    init_trainable: adapter params (cast to float32), used on a fresh start.
    batch_fn: `step -> batch` (pytree of numpy arrays, fixed shapes), a pure
      function of (seed, step) returning the GLOBAL batch; every process calls
      it and feeds its own slice. Leading dims divisible by data*fsdp are
      split over devices, other leaves replicated. With `train.grad_accum`
      A > 1 it is called for micro-steps step*A .. step*A+A-1. Optional
      `state_dict()` / `load_state_dict(d)` are checkpointed with the run.
    config: the experiment ConfigDict (uses seed, multihost, train.*,
      checkpoint.*, overwrite).
    workdir: run directory (local path or gs://...).
    frozen: pytree passed to loss_fn unchanged (base params, aux arrays).
    frozen_axes: 'a/b/c' path -> logical axes for frozen leaves (e.g.
      `sharding.model_logical_axes(model_cfg)`); other leaves are replicated.
    mesh: defaults to `sharding.make_mesh(config.train.mesh)` over all devices.
    stats: when given, filled with `start_step` (0, or the checkpoint resumed from),
      `steps_run` (steps this call trained) and `step_traces` (how often the step was
      traced, i.e. compiled).

  Returns:
    (final trainable params as float32 arrays on this process's first device,
    history: one dict of float metrics per step run in this process).

  Raises:
    NonFiniteError: after `train.max_bad_steps` consecutive skipped steps.
    Preempted: after saving on SIGTERM / a preemption notice.
    checkpoint.ConfigMismatchError: W holds a run with another config.
  """
  sharding.initialize_distributed(config)
  tc = config.train
  workdir = epath.Path(workdir)
  ckpt_lib.prepare_workdir(workdir, config)
  mesh = mesh or sharding.make_mesh(dict(tc.get("mesh", {}) or {}))
  rules = sharding.get_rules(tc.get("sharding", "replicate"))
  accum = int(tc.get("grad_accum", 1))
  total = int(tc.steps)
  primary = sharding.is_primary()

  optimizer, schedule = step_lib.make_optimizer(tc)
  if frozen is not None:
    frozen = sharding.place_tree(frozen, mesh, rules, frozen_axes)
  # Adapters and optimizer state are small: replicated everywhere.
  state0 = jax.eval_shape(lambda t: step_lib.init_state(t, optimizer, config.seed),
                          init_trainable)
  state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), state0)
  abstract = _abstract(state0, state_sharding)

  checkpointer = ckpt_lib.Checkpointer(workdir, every=config.checkpoint.every,
                                       keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.get("async_save", True))
  start = checkpointer.latest_step()
  if start is not None:
    state, data_state = checkpointer.restore(start, abstract)
    if hasattr(batch_fn, "load_state_dict") and "sampler" in data_state:
      batch_fn.load_state_dict(data_state["sampler"])
    logging.info("Resumed %s at step %d.", workdir, start)
  else:
    start = 0
    init = jax.jit(lambda t: step_lib.init_state(t, optimizer, config.seed),
                   out_shardings=state_sharding)
    # Host copy first: works for any input placement, on any number of hosts.
    state = init(sharding.place_tree(jax.device_get(init_trainable), mesh))

  train_step = step_lib.TrainStep(loss_fn, optimizer, schedule, grad_accum=accum,
                                  state_sharding=state_sharding,
                                  metrics_sharding=sharding.replicated(mesh),
                                  donate=tc.get("donate", True))
  log_every = max(int(tc.log_every), 1)
  overlap = overlaps_steps(tc.get("overlap_steps", "auto"))
  max_bad = int(tc.max_bad_steps)
  logger = _Logger(workdir, start, total, primary, tc.get("progress", True))
  history: list[dict[str, float]] = []
  early_check: list[float | None] = []  # pairs per step at the first log, once
  batch_dim = 1 if accum > 1 else 0
  sigterm = _SigtermFlag(config.checkpoint.get("save_on_sigterm", True)
                         and jax.process_count() == 1)

  def finish(pending) -> None:
    """Reads one step's metrics (blocks on it) and acts on them."""
    # Metrics are replicated: read this process's copy (works across hosts).
    m = {k: float(np.asarray(v.addressable_data(0))) for k, v in pending.items()}
    history.append(m)
    s = int(m["step"])
    log = s % log_every == 0 or s == total
    logger.step(m, log=log)
    if log and primary and s < total and not early_check:
      # Early word on a run whose consistency term is (nearly) off; the end repeats it.
      early_check.append(monitor.consistency_summary(history)["pairs_valid_mean"])
      monitor.warn_if_few_pairs(early_check[0], f"the first {len(history)} steps")
    if m["skipped"]:
      logging.warning("Step %d skipped: non-finite loss or gradient (%d in a row).",
                      s, int(m["bad_consecutive"]))
    if m["bad_consecutive"] >= max_bad:
      checkpointer.wait()
      latest = checkpointer.latest_step()
      raise NonFiniteError(
          f"Stopped at step {s}: {int(m['bad_consecutive'])} consecutive steps had a "
          f"non-finite loss or gradient (train.max_bad_steps={max_bad}); their updates "
          f"were skipped. Last checkpoint: step {latest} in {workdir / ckpt_lib.CHECKPOINT_DIR} "
          "(intact). Lower train.lr, check the data, or use bfloat16-safe settings.")

  t0 = time.time()
  try:
    with sigterm:
      pending = None
      for s in range(start, total):
        if not overlap and pending is not None:
          finish(pending)
          pending = None
        batch = sharding.shard_batch(_micro_batches(batch_fn, s, accum), mesh, batch_dim)
        state, metrics = train_step(state, frozen, batch)
        # Overlapped: block on the previous step's metrics only after queueing this step,
        # so that the host builds each batch while the device runs the step before.
        if pending is not None:
          finish(pending)
        pending = metrics
        done = s + 1
        preempt = sigterm.raised or checkpointer.reached_preemption(done)
        if done == total or preempt or checkpointer.should_save(done):
          finish(pending)  # never checkpoint a step the bad-step check has not seen
          pending = None
          checkpointer.save(done, state, _data_state(batch_fn, done), force=True)
        if preempt:
          checkpointer.wait()
          raise Preempted(f"Preempted: saved step {done} in {workdir}; re-run to resume.")
      if pending is not None:
        finish(pending)
  finally:
    checkpointer.close()  # waits for in-flight async saves
    logger.close()
  if stats is not None:
    stats.update(start_step=int(start), steps_run=len(history),
                 step_traces=int(train_step.trace_count))
  if total > start:
    logging.info("Trained steps %d..%d in %.1fs (%d step traces).", start, total,
                 time.time() - t0, train_step.trace_count)
  if primary:  # losses with consistency pairs: are they really training?
    monitor.log_summary(monitor.consistency_summary(history))
  # This process's copy (replicated): usable in single-device code such as generation.
  return jax.tree.map(lambda x: x.addressable_data(0), state.trainable), history
