"""Command line: parse --config/--workdir and dispatch on config.mode.

  python -m semsafe_jax.main --config=configs/default.py --workdir=runs/demo

The workdir may be given in any form (relative, ~, trailing slash); it is resolved
here, once, to an absolute path. A URL (gs://bucket/run) is kept as it is: every stage
reads and writes the workdir through etils.epath (semsafe_jax/files.py). The config is
checked (semsafe_jax/validate.py) before the job starts. Errors the user can fix print
as one line and exit with status 2; --debug (or SEMSAFE_DEBUG=1) shows their traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from semsafe_jax import malloc

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs, caches and checkpoints go.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of every error (also: "
                           "SEMSAFE_DEBUG=1).")
flags.mark_flags_as_required(["config", "workdir"])

DEBUG_ENV = "SEMSAFE_DEBUG"
EXIT_USER_ERROR = 2


class _QuietCheckpointLogs(logging.Filter):
  """Orbax logs every save step at INFO; keep its warnings, drop the chatter."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def outside_workdir_note(loads_model: bool = True) -> str:
  """Where the project writes outside the workdir, and the variables that move it."""
  home = os.path.expanduser("~")
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
  mpl = os.environ.get("MPLCONFIGDIR")
  if mpl:
    mpl_dirs = mpl
  else:
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    mpl_dirs = f"{os.path.join(config, 'matplotlib')} and {os.path.join(cache, 'matplotlib')}"
  note = (f"Outside the workdir: matplotlib's config and font cache in {mpl_dirs} "
          "(MPLCONFIGDIR moves them)")
  if not loads_model:
    return note + "."
  from semsafe_jax.models import registry  # pylint: disable=g-import-not-at-top
  hub = os.environ.get("HF_HOME") or os.path.join(cache, "huggingface")
  return (f"{note}, the model and tokenizer cache in {registry.cache_dir()} "
          f"(SEMSAFE_JAX_CACHE moves it), hub downloads in {hub} (HF_HOME).")


def user_errors() -> tuple[type[BaseException], ...]:
  """Error types whose message alone tells the user what to fix."""
  from semsafe_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  found: list[type[BaseException]] = [UserError]
  # Imported by then if they raised (looking them up keeps mine mode free of model code).
  for module, name in [("semsafe_jax.models.registry", "ModelLoadError"),
                       ("semsafe_jax.train.trainer", "NonFiniteError")]:
    if module in sys.modules:
      found.append(getattr(sys.modules[module], name))
  return tuple(found)


def _debug() -> bool:
  return _DEBUG.value or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "on")


def _fail(message: str, code: int) -> None:
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def main(argv):
  del argv
  absl_logging.get_absl_handler().addFilter(_QuietCheckpointLogs())
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except KeyboardInterrupt:
    if _debug():
      raise
    _fail("interrupted (Ctrl-C).", 130)
  except Exception as e:  # pylint: disable=broad-except; re-raised unless a user error
    if _debug() or not isinstance(e, user_errors()):
      raise
    _fail(str(e).strip() or type(e).__name__, EXIT_USER_ERROR)


def run(config, raw_workdir: str | None):
  """Resolves the workdir, checks the config, then runs the job of `config.mode`."""
  from semsafe_jax import validate  # pylint: disable=g-import-not-at-top
  from semsafe_jax.files import resolve_workdir  # pylint: disable=g-import-not-at-top
  workdir = resolve_workdir(raw_workdir)
  validate.validate(config)  # before any work, and before the job writes W/config.json
  absl_logging.info("host allocator: %s (%s=system keeps the C library's)", malloc.active(),
                    malloc.ENV)
  absl_logging.info("%s", outside_workdir_note(loads_model=config.mode != "mine"))
  if config.get("fast_compile", False):
    # configs/tiny.py: on a tiny model XLA's optimisation passes take longer than the
    # code they speed up runs (they double the train step's compile). JAX reads this at
    # each compile, so setting it before the job compiles anything covers the whole run.
    import jax  # pylint: disable=g-import-not-at-top; keeps --help free of JAX.
    jax.config.update("jax_disable_most_optimizations", True)
  job = importlib.import_module(f"semsafe_jax.jobs.{config.mode}")
  return job.run(config, workdir)


if __name__ == "__main__":
  malloc.reexec()  # restarts once under a caching allocator; see malloc.py
  app.run(main)
