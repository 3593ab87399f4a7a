"""`python -m semsafe_jax.main`, paused before one training step so that a test can kill it there.

tests/test_main_job.py runs `python tests/pause_main_job.py --config=... --workdir=W ...` with
SEMSAFE_TEST_PAUSE="S:FILE" in the environment: when the trainer is about to build the batch
of 0-based step S (the run has trained S steps), the job writes FILE and sleeps until it is
killed. Everything else is the command line as users run it, the allocator restart included.
Not a test file itself (pytest collects test_*.py only).
"""

import os
import pathlib
import time

from absl import app

from semsafe_jax import main, malloc
from semsafe_jax.train import trainer


def pause_before(step: int, marker: pathlib.Path) -> None:
  build = trainer._micro_batches  # pylint: disable=protected-access

  def micro_batches(batch_fn, s, accum):
    if s == step:
      marker.write_text(f"{s}\n")
      while True:
        time.sleep(3600)
    return build(batch_fn, s, accum)

  trainer._micro_batches = micro_batches  # pylint: disable=protected-access


if __name__ == "__main__":
  malloc.reexec()  # as `python -m semsafe_jax.main` does: restarts this same command once
  at, path = os.environ["SEMSAFE_TEST_PAUSE"].split(":", 1)
  pause_before(int(at), pathlib.Path(path))
  app.run(main.main)
