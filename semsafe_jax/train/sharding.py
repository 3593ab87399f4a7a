"""Device mesh, logical-axis sharding rules and global batch arrays.

One `jax.sharding.Mesh` spans every device of every host, with axes
("data", "fsdp", "model"). Params carry logical axes (see
`models.transformer.param_specs`: vocab, embed, q_heads, kv_heads, mlp, layers,
norm); a rules table maps those to mesh axes, so data parallelism, FSDP or
tensor parallelism is a config change, not a code change. The batch's leading
dim is split over ("data", "fsdp"); adapters and optimizer state are small and
stay replicated. jit + GSPMD inserts the collectives (no pmap).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both: FSDP is data parallel too

Rules = tuple[tuple[str, str | None], ...]
# Logical axis -> mesh axis (None: replicated). Unlisted logical axes replicate.
RULES: dict[str, Rules] = {
    "replicate": (),
    # Shard the model width of every weight: ~1/fsdp of the frozen model per device.
    "fsdp": (("embed", "fsdp"),),
    # Megatron-style: heads and MLP width split over "model".
    "tensor": (("q_heads", "model"), ("kv_heads", "model"), ("mlp", "model"),
               ("vocab", "model")),
    "fsdp_tensor": (("embed", "fsdp"), ("q_heads", "model"), ("kv_heads", "model"),
                    ("mlp", "model"), ("vocab", "model")),
}


# Where a launcher without cluster auto-detection (plain processes on one machine, a
# custom scheduler) tells each process its place in the job. JAX itself reads
# JAX_COORDINATOR_ADDRESS; it reads the other two only on clusters it detects.
DIST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def distributed_args(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
  """`jax.distributed.initialize` keyword arguments from DIST_ENV (unset ones left out,
  so JAX's own cluster detection fills them on TPU pods, SLURM and Open MPI)."""
  env = os.environ if environ is None else environ
  kw: dict[str, Any] = {}
  if env.get("JAX_COORDINATOR_ADDRESS"):
    kw["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
  for name, arg, low in (("JAX_NUM_PROCESSES", "num_processes", 1),
                         ("JAX_PROCESS_ID", "process_id", 0)):
    raw = env.get(name, "")
    if not raw:
      continue
    try:
      kw[arg] = int(raw)
    except ValueError:
      kw[arg] = None
    if kw[arg] is None or kw[arg] < low:
      raise ValueError(f"{name}={raw!r}: expected an integer >= {low}.")
  if ("num_processes" in kw) != ("process_id" in kw):
    raise ValueError("Set JAX_NUM_PROCESSES and JAX_PROCESS_ID together (got only "
                     f"{'JAX_NUM_PROCESSES' if 'num_processes' in kw else 'JAX_PROCESS_ID'}).")
  if "process_id" in kw and kw["process_id"] >= kw["num_processes"]:
    raise ValueError(f"JAX_PROCESS_ID={kw['process_id']}: expected 0 .. "
                     f"JAX_NUM_PROCESSES-1 = {kw['num_processes'] - 1}.")
  if "num_processes" in kw and "coordinator_address" not in kw:
    raise ValueError("JAX_NUM_PROCESSES is set but JAX_COORDINATOR_ADDRESS is not: set it to "
                     "host:port of process 0.")
  return kw


def initialize_distributed(config) -> bool:
  """Calls `jax.distributed.initialize()` when `config.multihost` is set.

  Must run before any JAX computation (call it first thing in the entry
  point). On TPU pods and SLURM/Open MPI GPU clusters JAX finds the
  coordinator and process ids itself; elsewhere set JAX_COORDINATOR_ADDRESS
  (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID in each
  process's environment. CPU processes exchange collectives over gloo.
  Returns True when initialised here.
  """
  if not config.get("multihost", False):
    return False
  if jax.distributed.is_initialized():
    return False
  kw = distributed_args()
  _cpu_collectives()
  try:
    jax.distributed.initialize(**kw)
  except (RuntimeError, ValueError) as e:
    raise RuntimeError(
        "config.multihost=True but jax.distributed.initialize() failed. It must run "
        "before any JAX computation: call semsafe_jax.train.initialize_distributed(config) "
        "at the start of the program; off TPU pods and SLURM/Open MPI clusters, set "
        f"{', '.join(DIST_ENV)} in every process. Original error: {e}") from e
  logging.info("jax.distributed initialised: process %d of %d, %d global devices.",
               jax.process_index(), jax.process_count(), jax.device_count())
  return True


def _cpu_collectives() -> None:
  """CPU processes need a cross-process collectives backend (gloo, JAX's default in
  recent versions; older ones default to none, and CPU collectives then fail)."""
  try:
    if jax.config.jax_cpu_collectives_implementation is None:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:  # a JAX without the option
    pass


def is_primary() -> bool:
  """Only process 0 writes logs, reports and config files."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Barrier across hosts (no-op on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def make_mesh(shape: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all devices (all hosts) with axes ("data", "fsdp", "model").

  `shape` maps axis -> size; one axis may be -1 (inferred). Default: all
  devices on "data". "data" is outermost so it spans hosts, and "model"
  innermost so tensor-parallel collectives stay on the fastest links.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = {"data": -1, "fsdp": 1, "model": 1}
  unknown = set(shape or {}) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"Unknown mesh axes {sorted(unknown)}; use {MESH_AXES}.")
  sizes.update({k: int(v) for k, v in (shape or {}).items()})
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {sizes}.")
  known = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not split into mesh {sizes}.")
    sizes[free[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"Mesh {sizes} needs {math.prod(sizes.values())} devices, "
                     f"have {len(devices)}.")
  # Auto axes: GSPMD propagates shardings through the (sharding-agnostic) model.
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def get_rules(name_or_rules: str | Rules) -> Rules:
  if isinstance(name_or_rules, str):
    if name_or_rules not in RULES:
      raise ValueError(f"Unknown sharding rules {name_or_rules!r}; choose one of {sorted(RULES)}.")
    return RULES[name_or_rules]
  return tuple(name_or_rules)


def logical_to_spec(shape: Sequence[int], logical_axes: Sequence[str | None] | None,
                    mesh: Mesh, rules: Rules) -> P:
  """PartitionSpec for one array. A dim stays replicated when its mesh axis is
  size 1, already used by another dim, or does not divide the dim."""
  if logical_axes is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, name in zip(shape, logical_axes):
    axis = table.get(name) if name else None
    if axis is None or axis in used or mesh.shape[axis] == 1 or dim % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def model_logical_axes(model_cfg) -> dict[str, tuple[str, ...]]:
  """'a/b/c' param path -> logical axes, from the model's own table."""
  from semsafe_jax.models import transformer  # local: keeps this module model-agnostic
  return {path: axes for path, (_, axes) in transformer.param_specs(model_cfg).items()}


def _path_str(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def _lookup(path: str, axes_by_path: Mapping[str, Sequence[str]]) -> Sequence[str] | None:
  # Exact path, or the path under any prefix (e.g. frozen={"params": base, ...}).
  if path in axes_by_path:
    return axes_by_path[path]
  for key, axes in axes_by_path.items():
    if path.endswith("/" + key):
      return axes
  return None


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = (),
                   axes_by_path: Mapping[str, Sequence[str]] | None = None) -> Any:
  """NamedSharding per leaf: leaves named in `axes_by_path` follow the rules,
  everything else (adapters, small aux arrays) is replicated."""
  def one(path, x):
    axes = _lookup(_path_str(path), axes_by_path) if axes_by_path else None
    if axes is not None and len(axes) != np.ndim(x):
      axes = None
    return NamedSharding(mesh, logical_to_spec(np.shape(x), axes, mesh, rules))
  return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def place_tree(tree: Any, mesh: Mesh, rules: Rules = (),
               axes_by_path: Mapping[str, Sequence[str]] | None = None) -> Any:
  """Puts a pytree (host arrays or local device arrays, the same values on
  every process) onto the mesh."""
  shardings = tree_shardings(tree, mesh, rules, axes_by_path)
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def put(x, s):  # each process builds only the shards its devices hold
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])
  return jax.tree.map(put, tree, shardings)


def batch_size_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, shape: Sequence[int], batch_dim: int = 0) -> NamedSharding:
  """Split dim `batch_dim` over ("data", "fsdp"); replicate arrays whose batch
  dim does not divide (scalars, per-step constants)."""
  n = batch_size_divisor(mesh)
  if len(shape) <= batch_dim or shape[batch_dim] % n:
    return replicated(mesh)
  return NamedSharding(mesh, P(*([None] * batch_dim), BATCH_AXES))


def _process_block(x: np.ndarray, sharding: NamedSharding) -> tuple[slice, ...] | None:
  """The block of a global array this process's devices hold, or None when
  those devices do not form one contiguous block."""
  idx = set()
  for i in sharding.addressable_devices_indices_map(x.shape).values():
    idx.add(tuple((s.start or 0, size if s.stop is None else s.stop)
                  for s, size in zip(i, x.shape)))
  block = tuple(slice(min(i[d][0] for i in idx), max(i[d][1] for i in idx))
                for d in range(x.ndim))
  covered = sum(math.prod(b - a for a, b in i) for i in idx)
  return block if covered == math.prod(s.stop - s.start for s in block) else None


def shard_batch(batch: Any, mesh: Mesh, batch_dim: int = 0) -> Any:
  """Global batch (the same pure function of the step on every process) ->
  global jax.Arrays. Each process feeds only its own slice through
  `jax.make_array_from_process_local_data`, so no host ships the whole batch."""
  def put(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.shape, batch_dim)
    if jax.process_count() == 1:
      return jax.make_array_from_process_local_data(sharding, x, x.shape)
    block = _process_block(x, sharding)
    if block is None:  # interleaved device order: let each device pick its rows
      return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])
    return jax.make_array_from_process_local_data(sharding, x[block], x.shape)
  return jax.tree.map(put, batch)
