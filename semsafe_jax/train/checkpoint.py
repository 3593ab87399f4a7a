"""Orbax checkpoints of a run, and the workdir's config guard.

Layout of a workdir W:
  W/config.json            the run's config, written at first start
  W/checkpoints/<step>/    trainable/ (adapters), train_state/ (optimizer
                           state, step, RNG key, bad-step counters), data/
                           (the data sampler's JSON state)

Re-running with the same W resumes from the latest step. A different config
in an existing W is an error unless `config.overwrite=True`, which deletes the
old checkpoints and starts fresh, so a run is never silently overwritten.

A step whose files cannot be read back (a disk full, a file lost) is damaged:
training moves it aside to W/checkpoints/<step>.damaged and resumes from the
previous intact step, generation skips it, both with a warning; export stops
and names it (export.step picks another).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from semsafe_jax import files
from semsafe_jax.adapters.lora import flat_paths
from semsafe_jax.errors import DamagedCheckpointError, UserError
from semsafe_jax.train import sharding

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_SUFFIX = ".damaged"  # a damaged step is moved aside to <step>.damaged
# item -> (orbax handler, its save args, its restore args).
_STANDARD = (ocp.StandardCheckpointHandler, ocp.args.StandardSave, ocp.args.StandardRestore)
_JSON = (ocp.JsonCheckpointHandler, ocp.args.JsonSave, ocp.args.JsonRestore)
_ITEM_HANDLERS = {"trainable": _STANDARD, "train_state": _STANDARD, "data": _JSON}
ITEMS = tuple(_ITEM_HANDLERS)
# Config keys that may change between runs in one workdir: they pick what to do
# with a run (mode, logging, checkpoint cadence) or how it is evaluated (eval, judges,
# the probe gate), not what training computes.
RESUME_SAFE_KEYS = ("mode", "overwrite", "multihost", "generate", "export", "eval", "evals",
                    "judges", "judge", "gate",
                    "train.log_every", "train.progress", "train.donate", "checkpoint")

# workdir -> config already checked (and maybe wiped for) in this process.
_PREPARED: dict[str, dict[str, Any]] = {}


class ConfigMismatchError(UserError, ValueError):
  """An existing workdir holds a run with a different config."""


def config_to_dict(config: Any) -> dict[str, Any]:
  """ConfigDict / dict -> JSON-safe plain dict."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(d, default=str, sort_keys=True))


def _ignored(key: str, ignore: Iterable[str]) -> bool:
  return any(key == i or key.startswith(i + ".") for i in ignore)


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any],
                ignore: Iterable[str] = RESUME_SAFE_KEYS) -> dict[str, tuple[Any, Any]]:
  """key -> (old, new) for every differing config field not in `ignore`."""
  a, b = flat_paths(dict(old), sep="."), flat_paths(dict(new), sep=".")
  missing = object()
  return {k: (a.get(k, "<absent>"), b.get(k, "<absent>"))
          for k in sorted(set(a) | set(b))
          if not _ignored(k, ignore) and a.get(k, missing) != b.get(k, missing)}


def read_config(workdir: str | epath.Path) -> dict[str, Any] | None:
  path = epath.Path(workdir) / CONFIG_FILE
  return json.loads(path.read_text()) if path.exists() else None


def prepare_workdir(workdir: str | epath.Path, config: Any) -> bool:
  """Guards the workdir against silently mixing runs. Idempotent per process.

  First start: writes W/config.json. Same config: nothing (the run resumes).
  Different config: ConfigMismatchError, unless `config.overwrite` is set, in
  which case the old checkpoints are deleted and the new config is written.
  Returns True when this call started the run fresh.
  """
  workdir = epath.Path(workdir)
  key = str(workdir)
  new = config_to_dict(config)
  if _PREPARED.get(key) == new:
    return False
  old = read_config(workdir)  # every process reads before process 0 may write
  overwrite = bool(new.get("overwrite", False))
  fresh = old is None or overwrite
  if old is not None and not overwrite:
    diff = config_diff(old, new)
    if diff:
      lines = "\n".join(f"  {k}: {o!r} -> {n!r}" for k, (o, n) in list(diff.items())[:20])
      more = f"\n  ... and {len(diff) - 20} more" if len(diff) > 20 else ""
      raise ConfigMismatchError(
          f"Workdir {workdir} holds a run with a different config:\n{lines}{more}\n"
          "Use a new --workdir, restore the old settings to resume, or pass "
          "--config.overwrite=True to delete its checkpoints and start fresh.")
  sharding.sync("semsafe_prepare_workdir_read")
  if fresh and sharding.is_primary():
    ckpt_dir = workdir / CHECKPOINT_DIR
    if old is not None and ckpt_dir.exists():
      logging.warning("config.overwrite=True: deleting the checkpoints in %s.", ckpt_dir)
      ckpt_dir.rmtree()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / CONFIG_FILE).write_text(json.dumps(new, indent=2, sort_keys=True))
  sharding.sync("semsafe_prepare_workdir_write")
  _PREPARED[key] = new
  return fresh


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """Every item's handler, registered up front.

  With only item_names, orbax registers an item's handler on its first save or
  restore in the process, so reading step metadata before that (as
  load_latest_adapters does) logs a spurious "could not be restored" warning
  for every item.
  """
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item, (handler_cls, save_args, restore_args) in _ITEM_HANDLERS.items():
    handler = handler_cls()  # one instance for both directions, as orbax's lazy path
    registry.add(item, save_args, handler)
    registry.add(item, restore_args, handler)
  return registry


def _manager(workdir: str | epath.Path, *, every: int = 1, keep: int | None = None,
             async_save: bool = True, create: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(int(every), 1), max_to_keep=keep,
      enable_async_checkpointing=async_save, create=create)
  if not files.is_remote(str(workdir)):  # orbax refuses relative paths; library callers pass them
    workdir = os.path.abspath(workdir)
  return ocp.CheckpointManager(epath.Path(workdir) / CHECKPOINT_DIR,
                               handler_registry=_handler_registry(), options=options)


class Checkpointer:
  """Saves and restores (TrainState, data-sampler state) for one workdir.

  Saves every `every` steps (plus whenever orbax reports a preemption sync
  point, and on demand with force=True), keeps the latest `keep`, writes in
  the background; `wait()` blocks until the writes are durable.
  """

  def __init__(self, workdir: str | epath.Path, *, every: int, keep: int | None,
               async_save: bool = True):
    self.workdir = epath.Path(workdir)
    self._options = dict(every=every, keep=keep, async_save=async_save)
    self.manager = _manager(workdir, **self._options)
    self._intact: set[int] = set()  # steps read back or written by this process

  def latest_step(self) -> int | None:
    """The latest intact step. Damaged later steps are moved aside (with a warning), so
    training resumes from the step before them and can save their step numbers again."""
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      if step in self._intact:
        break
      error = _read_error(self.manager, step, ITEMS)
      if error is None:
        self._intact.add(step)
        break
      damaged.append((step, error))
    if damaged:
      self._set_aside(damaged)
    intact = [s for s in self.manager.all_steps() if s in self._intact]
    return max(intact) if intact else None

  def _set_aside(self, damaged: Sequence[tuple[int, str]]) -> None:
    ckpt_dir = self.workdir / CHECKPOINT_DIR
    self.manager.wait_until_finished()
    sharding.sync("semsafe_checkpoint_damaged_read")  # every process read before the move
    for step, error in damaged:
      target = _aside_path(ckpt_dir, step)
      if sharding.is_primary():
        (ckpt_dir / str(step)).rename(target)
      logging.warning("Checkpoint step %d in %s is damaged (%s); moved it to %s. Resuming "
                      "from the previous intact step.", step, ckpt_dir, error, target)
    sharding.sync("semsafe_checkpoint_damaged_moved")
    self.manager.close()  # it still lists the moved steps
    self.manager = _manager(self.workdir, **self._options)

  def reached_preemption(self, step: int) -> bool:
    """True at the step all hosts agreed to save at after a preemption notice."""
    return self.manager.reached_preemption(step)

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state, data_state: Mapping[str, Any], *, force: bool = False) -> bool:
    """Starts an (async) save; arrays are copied to host before it returns, so
    the caller may donate the buffers to the next step right away."""
    if step in self.manager.all_steps():
      return False
    args = ocp.args.Composite(
        trainable=ocp.args.StandardSave(state.trainable),
        train_state=ocp.args.StandardSave(_rest(state)),
        data=ocp.args.JsonSave(dict(data_state)))
    saved = self.manager.save(step, args=args, force=force)
    if saved:
      self._intact.add(step)
    return saved

  def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
    """Restores into the structure, dtypes and shardings of `abstract_state`
    (a TrainState of jax.ShapeDtypeStruct with .sharding)."""
    args = ocp.args.Composite(
        trainable=ocp.args.StandardRestore(abstract_state.trainable),
        train_state=ocp.args.StandardRestore(_rest(abstract_state)),
        data=ocp.args.JsonRestore())
    out = self.manager.restore(step, args=args)
    state = abstract_state._replace(trainable=out["trainable"], **out["train_state"])
    return state, dict(out["data"] or {})

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _rest(state) -> dict[str, Any]:
  return {k: getattr(state, k) for k in state._fields if k != "trainable"}


def _aside_path(ckpt_dir: epath.Path, step: int) -> epath.Path:
  target = ckpt_dir / f"{step}{DAMAGED_SUFFIX}"
  n = 1
  while target.exists():  # an earlier damaged copy of the same step number stays too
    n += 1
    target = ckpt_dir / f"{step}{DAMAGED_SUFFIX}{n}"
  return target


def _host_target(meta: Any) -> Any:
  """Restore target for an item: its saved shapes and dtypes on this host's CPU, whatever
  devices wrote it."""
  tree = getattr(meta, "tree", meta)
  device = jax.local_devices(backend="cpu")[0]
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(device)),
      tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def _restore_items(manager: ocp.CheckpointManager, step: int,
                   items: Sequence[str]) -> dict[str, Any]:
  meta = manager.item_metadata(step)
  args = {}
  for item in items:
    if _ITEM_HANDLERS[item] is _JSON:
      args[item] = ocp.args.JsonRestore()
    else:
      if meta[item] is None:
        raise FileNotFoundError(f"no metadata for {item!r}")
      args[item] = ocp.args.StandardRestore(_host_target(meta[item]))
  return dict(manager.restore(step, args=ocp.args.Composite(**args)))


def _short(error: BaseException) -> str:
  """First line of an orbax / tensorstore error, without the storage spec it appends."""
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  text = text.split(" [tensorstore_spec=", 1)[0]
  return text if len(text) <= 300 else text[:297] + "..."


def _read_error(manager: ocp.CheckpointManager, step: int, items: Sequence[str]) -> str | None:
  """Why `items` of `step` cannot be read back, or None when they can."""
  try:
    _restore_items(manager, step, items)
  except Exception as e:  # pylint: disable=broad-except; any failure means unreadable
    return _describe_failure(e)
  return None


def _describe_failure(error: BaseException) -> str:
  _quiet_closed_loop_callbacks()
  return f"{type(error).__name__}: {_short(error)}"


def _quiet_closed_loop_callbacks() -> None:
  """After a failed restore, tensorstore still completes the other reads and calls back
  into the event loop orbax already closed; Python prints each such "Event loop is
  closed" as an unraisable-exception traceback. Drops exactly those, once installed."""
  previous = sys.unraisablehook
  if getattr(previous, "_semsafe_quiet", False):
    return

  def hook(unraisable):
    if (unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    previous(unraisable)

  hook._semsafe_quiet = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def available_steps(workdir: str | epath.Path) -> list[int]:
  """The finished checkpoint steps in `workdir` (damaged ones included)."""
  ckpt_dir = epath.Path(workdir) / CHECKPOINT_DIR
  if not ckpt_dir.exists():
    return []
  manager = _manager(workdir, create=False, async_save=False)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


@dataclasses.dataclass(frozen=True)
class LoadedAdapters:
  trainable: Any  # numpy arrays
  config: dict[str, Any]  # the run's W/config.json ({} when missing)
  step: int


def load_adapters(workdir: str | epath.Path, step: int | None = None, *,
                  fallback: bool = True, hint: str = "") -> LoadedAdapters | None:
  """The trainable params (as numpy) of the latest (or given) checkpoint in `workdir`.

  Returns None when `workdir` has no checkpoint (or none at `step`). A damaged
  latest step is skipped with a warning naming it when `fallback` (and no step was
  asked for); otherwise it raises DamagedCheckpointError, ending with `hint` (how the
  caller picks another step). Works on any device
  layout: arrays are restored onto this host, not the devices that saved them.
  """
  ckpt_dir = epath.Path(workdir) / CHECKPOINT_DIR
  if not ckpt_dir.exists():
    return None
  manager = _manager(workdir, create=False, async_save=False)
  try:
    steps = sorted(manager.all_steps(), reverse=True)
    candidates = steps if step is None else [s for s in steps if s == step]
    for s in candidates:
      try:
        out = _restore_items(manager, s, ("trainable",))
      except Exception as e:  # pylint: disable=broad-except; any failure means unreadable
        error = _describe_failure(e)
        others = ", ".join(str(o) for o in steps if o != s) or "none"
        if not fallback or step is not None:
          raise DamagedCheckpointError(
              f"Checkpoint step {s} in {ckpt_dir} is damaged ({error}); other steps there: "
              f"{others}.{' ' + hint if hint else ''}") from None
        logging.warning("Checkpoint step %d in %s is damaged (%s); using the previous step.",
                        s, ckpt_dir, error)
        continue
      trainable = jax.tree.map(np.asarray, out["trainable"])
      return LoadedAdapters(trainable, read_config(workdir) or {}, s)
  finally:
    manager.close()
  if candidates:
    raise DamagedCheckpointError(
        f"Every checkpoint step in {ckpt_dir} is damaged ({', '.join(map(str, steps))}); "
        "retrain, or restore the files.")
  return None


def load_latest_adapters(workdir: str | epath.Path,
                         step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
  """(trainable params as numpy, saved config dict) from the latest (or given)
  checkpoint in `workdir`, or None when it has none; see `load_adapters`."""
  got = load_adapters(workdir, step)
  return None if got is None else (got.trainable, got.config)
