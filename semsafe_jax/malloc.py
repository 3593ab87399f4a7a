"""A caching host allocator for the command-line entry points.

XLA:CPU allocates a step's temporaries afresh at every call. glibc serves
allocations above 32 MB with fresh kernel mappings and unmaps them on free, so
every train step page-faults in (and the kernel zeroes) its whole working set:
on SmolLM2-135M at 8 x 128 that is ~1.7 GB and ~0.7 CPU-s of kernel time per
step, a fifth of the step's CPU time. An allocator that keeps freed memory for
reuse removes it (benchmarks/bench_train_step.py --malloc shows both).

The allocator must be chosen before the process starts (LD_PRELOAD), so entry
points call `reexec()` first thing: it restarts the same command once with the
allocator preloaded. Choice, through the environment variable SEMSAFE_MALLOC:
  auto (default)  tcmalloc if the system has it, else tbbmalloc from the `tbb`
                  wheel (a dependency on Linux x86_64), else glibc;
  tcmalloc | tbbmalloc   that one, or an error if it is missing;
  system          keep the C library's malloc.
An LD_PRELOAD that already names an allocator is left as it is.
"""

from __future__ import annotations

import ctypes.util
import importlib.metadata
import os
import pathlib
import sys

ENV = "SEMSAFE_MALLOC"
CHOICES = ("auto", "tcmalloc", "tbbmalloc", "system")
_ACTIVE = "SEMSAFE_MALLOC_ACTIVE"  # set by reexec() in the child; also stops a second exec
_SYSTEM_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def _tcmalloc(environ) -> dict[str, str] | None:
  del environ  # system libraries only
  for name in ("tcmalloc_minimal", "tcmalloc"):
    soname = ctypes.util.find_library(name)  # e.g. "libtcmalloc_minimal.so.4"
    if not soname:
      continue
    for d in _SYSTEM_LIB_DIRS:
      if (pathlib.Path(d) / soname).exists():
        return {"LD_PRELOAD": str(pathlib.Path(d) / soname)}
  return None


def _tbbmalloc(environ) -> dict[str, str] | None:
  try:
    files = importlib.metadata.files("tbb") or []
  except importlib.metadata.PackageNotFoundError:
    return None
  proxy = next((f for f in files if f.name.startswith("libtbbmalloc_proxy.so")), None)
  if proxy is None:
    return None
  path = pathlib.Path(proxy.locate()).resolve()
  if not path.exists():
    return None
  lib_path = os.pathsep.join(p for p in (str(path.parent), environ.get("LD_LIBRARY_PATH")) if p)
  # tbbmalloc hands freed large objects back to the OS unless they count as "huge",
  # which is exactly the churn we are avoiding; 1 MiB covers every XLA temporary
  # that matters while leaving small-object handling as it is. A value the user
  # set wins.
  threshold = environ.get("TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD", str(1 << 20))
  return {"LD_PRELOAD": str(path), "LD_LIBRARY_PATH": lib_path,
          "TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD": threshold}


_FINDERS = {"tcmalloc": _tcmalloc, "tbbmalloc": _tbbmalloc}


def plan(environ: dict[str, str] | None = None) -> tuple[str, dict[str, str]] | None:
  """(allocator name, environment additions) to re-exec with, or None to stay as is."""
  environ = os.environ if environ is None else environ
  choice = environ.get(ENV, "auto").strip().lower() or "auto"
  if choice not in CHOICES:
    raise ValueError(f"{ENV}={choice!r}; expected one of {CHOICES}")
  if choice == "system" or environ.get(_ACTIVE) or not sys.platform.startswith("linux"):
    return None
  if "malloc" in environ.get("LD_PRELOAD", ""):  # the user already chose one
    return None
  names = ("tcmalloc", "tbbmalloc") if choice == "auto" else (choice,)
  for name in names:
    env = _FINDERS[name](environ)
    if env is not None:
      return name, env
  if choice != "auto":
    raise RuntimeError(f"{ENV}={choice} but no {choice} library was found "
                       f"(tcmalloc: the libtcmalloc-minimal4 package; tbbmalloc: pip install tbb).")
  return None


def reexec(choice: str | None = None) -> None:
  """Restarts this process's command line with the caching allocator preloaded.

  Call it before anything else in a `__main__` block; it returns (doing nothing)
  when no allocator is needed or available, or in the restarted process.
  `choice` (one of CHOICES) overrides $SEMSAFE_MALLOC, for this process and the restart.
  """
  if choice:
    os.environ[ENV] = choice
  p = plan()
  if p is None or not sys.executable:
    return
  name, env = p
  if env.get("LD_PRELOAD") and os.environ.get("LD_PRELOAD"):
    env["LD_PRELOAD"] = env["LD_PRELOAD"] + ":" + os.environ["LD_PRELOAD"]
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
            {**os.environ, **env, _ACTIVE: name})


def active() -> str:
  """The allocator this process runs under, for logs and benchmark headers."""
  if os.environ.get(_ACTIVE):
    return os.environ[_ACTIVE]
  preload = os.environ.get("LD_PRELOAD", "")
  return f"preloaded ({preload})" if "malloc" in preload else "system"


def release() -> None:
  """Hands the caching allocator's free memory back to the OS.

  Call it between stages whose working sets differ: the cache then holds one
  stage's freed blocks, not every stage's.
  """
  name = os.environ.get(_ACTIVE)
  if name not in _FINDERS:
    return
  lib = ctypes.CDLL(None)  # the preloaded allocator's symbols are global
  if name == "tbbmalloc":
    lib.scalable_allocation_command(0, None)  # TBBMALLOC_CLEAN_ALL_BUFFERS
  else:
    lib.MallocExtension_ReleaseFreeMemory()


class ReleaseOnNewShape:
  """Calls `release()` when a loop's batch shape changes (and not on every batch).

  Loops over length buckets run one compiled program per bucket, each with its own
  temporaries: without a release, the cache would keep every earlier bucket's freed
  blocks beside the new ones, and the stage's peak would grow with its bucket count.
  """

  def __init__(self):
    self._shape = None

  def __call__(self, shape) -> None:
    if shape != self._shape:
      release()
      self._shape = shape
