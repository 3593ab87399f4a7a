"""Command line: parse --config/--workdir and dispatch on config.mode.

  python -m semsafe_jax.main --config=configs/default.py --workdir=runs/demo
"""

import importlib
import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from semsafe_jax import malloc

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs, caches and checkpoints go.")
flags.mark_flags_as_required(["config", "workdir"])

# mode -> module in semsafe_jax.jobs exposing run(config, workdir).
_MODES = {"train": "train", "generate": "generate", "mine": "mine", "export": "export"}


class _QuietCheckpointLogs(logging.Filter):
  """Orbax logs every save step at INFO; keep its warnings, drop the chatter."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def main(argv):
  del argv
  absl_logging.get_absl_handler().addFilter(_QuietCheckpointLogs())
  config = _CONFIG.value
  absl_logging.info("host allocator: %s (%s=system keeps the C library's)", malloc.active(),
                    malloc.ENV)
  if config.mode not in _MODES:
    raise app.UsageError(f"Unknown config.mode={config.mode!r}; choose one of {sorted(_MODES)}.")
  if config.get("fast_compile", False):
    # configs/tiny.py: on a tiny model XLA's optimisation passes take longer than the
    # code they speed up runs (they double the train step's compile). JAX reads this at
    # each compile, so setting it before the job compiles anything covers the whole run.
    import jax  # pylint: disable=g-import-not-at-top; keeps --help free of JAX.
    jax.config.update("jax_disable_most_optimizations", True)
  job = importlib.import_module(f"semsafe_jax.jobs.{_MODES[config.mode]}")
  job.run(config, _WORKDIR.value)


if __name__ == "__main__":
  malloc.reexec()  # restarts once under a caching allocator; see malloc.py
  app.run(main)
