"""mode=experiment: methods x override sets x seeds, each an ordinary main-job run, then one
summary with intervals, paired tests and plots.

  python -m semsafe_jax.main --config=configs/experiments/main_table.py --workdir=W

Layout of W:
  W/cells/<method>[-<override set>]-s<seed>/   a main-job workdir (report.json, evals/, ...)
  W/shared/cache/, eval_cache/                 SBERT embeddings and the base model's answers,
                                               the same for every cell
  W/logs/<cell>.log                            each cell's output
  W/commands.txt                               one command line per cell
  W/summary.md, summary.csv, summary.json      the table; W/plots/ its figures

Cells run one after another as subprocesses, each exactly its printed command line. A
finished cell (report.json, same config) is skipped; a crashed one is run again in the same
workdir, where the main job resumes from its checkpoint and cached stages.
--config.experiment.print_commands=True prints the command lines (for a scheduler's job
array) and exits; --config.experiment.collect_only=True builds the summary from whatever
cells are finished and lists the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import logging

from semsafe_jax import files
from semsafe_jax.errors import ConfigError
from semsafe_jax.experiments import grid
from semsafe_jax.experiments import plots as plots_lib
from semsafe_jax.experiments import summary as summary_lib

LOGS_DIR = "logs"


def _exp_dict(exp) -> dict[str, Any]:
  return json.loads(json.dumps(exp.to_dict() if hasattr(exp, "to_dict") else dict(exp),
                               default=str))


def plan(exp, workdir: str) -> tuple[list[grid.Cell], dict[str, dict[str, Any]]]:
  """(cells, cell name -> the config its main job runs with), every override checked."""
  methods = {}  # config spec -> its ConfigDict, parsed once

  def has_field(spec: str, field: str) -> bool:
    if spec not in methods:
      name = next((k for k, v in exp.methods.items()
                   if (v if isinstance(v, str) else v.get("config")) == spec), "?")
      methods[spec] = grid.method_config(spec, name)
    node = methods[spec]
    for part in field.split("."):
      if part not in node:
        return False
      node = node[part]
    return True

  cells = grid.expand(exp, workdir, has_field=has_field)
  expected = {c.name: grid.config_dict(grid.cell_config(c)) for c in cells}
  return cells, expected


def cell_status(cells, expected) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
  status, diffs = {}, {}
  for c in cells:
    status[c.name], diffs[c.name] = grid.status(c, expected[c.name])
  return status, diffs


def run(config, workdir: str) -> dict[str, Any]:
  exp = config.get("experiment", None)
  if exp is None:
    raise ConfigError("experiment", None, "mode=experiment needs an experiment block; see "
                      "configs/experiments/tiny.py")
  cells, expected = plan(exp, workdir)
  if exp.get("print_commands", False):
    for c in cells:
      print(c.command())
    return {"commands": [c.command() for c in cells]}

  files.write_text(os.path.join(workdir, "commands.txt"),
                   "".join(c.command() + "\n" for c in cells))
  files.write_text(os.path.join(workdir, "experiment.json"), json.dumps(_exp_dict(exp), indent=2))

  status, diffs = cell_status(cells, expected)
  failed: list[str] = []
  if not exp.get("collect_only", False):
    stale = [c for c in cells if status[c.name] == grid.STALE]
    if stale and not exp.get("overwrite", False):
      c = stale[0]
      fields = ", ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in list(diffs[c.name].items())[:5])
      raise ConfigError("experiment.overwrite", False,
                        f"{len(stale)} cell(s) hold runs with another config (e.g. {c.name}: "
                        f"{fields}); pass --config.experiment.overwrite=True to rerun them "
                        "from scratch, or use a new --workdir")
    failed = _run_cells(cells, status, workdir, exp)
    # The cells parsed the config files when they started: read them again, as they did.
    cells, expected = plan(exp, workdir)
    status, _ = cell_status(cells, expected)

  summ = summary_lib.build(cells, status, exp.get("baseline", ""))
  safety = exp.get("safety_metric", "heldout_intent/refusal")
  overrefusal = exp.get("overrefusal_metric", "benign/refusal")
  names, plot_failures = plots_lib.make_all(summ, workdir, safety, overrefusal,
                                            warn=logging.warning)
  summary_lib.write(summ, workdir, experiment=_exp_dict(exp), plots=names,
                    plot_failures=plot_failures,
                    failures_limit=int(exp.get("failure_cases", 5)))
  done = sum(s == grid.DONE for s in status.values())
  print(f"{done} of {len(cells)} cells finished; summary: "
        f"{os.path.join(workdir, 'summary.md')}")
  missing = [c.name for c in cells if status[c.name] != grid.DONE]
  if missing:
    print("Not finished: " + ", ".join(f"{n} ({status[n]})" for n in missing))
  if failed:
    raise RuntimeError(f"{len(failed)} cell(s) failed: " + ", ".join(
        f"{n} (log: {os.path.join(workdir, LOGS_DIR, n + '.log')})" for n in failed))
  return {"cells": len(cells), "done": done, "missing": missing}


def _run_cells(cells, status, workdir: str, exp) -> list[str]:
  """Runs every unfinished cell in order; returns the names of those that failed."""
  python = exp.get("python", "") or sys.executable
  keep_going = bool(exp.get("keep_going", True))
  files.makedirs(os.path.join(workdir, LOGS_DIR))
  failed = []
  stop = _ForwardSigterm()
  todo = [c for c in cells if status[c.name] != grid.DONE]
  logging.info("Experiment: %d cells, %d finished, %d to run.", len(cells),
               len(cells) - len(todo), len(todo))
  with stop:
    for i, c in enumerate(todo):
      if stop.requested:
        break
      argv = c.argv(python)
      if status[c.name] == grid.STALE:
        argv.append("--config.overwrite=True")
      verb = "Resuming" if status[c.name] == grid.PARTIAL else "Running"
      logging.info("%s cell %d/%d %s: %s", verb, i + 1, len(todo), c.name, c.command())
      t0 = time.time()
      rc = _tee(argv, os.path.join(workdir, LOGS_DIR, c.name + ".log"), stop)
      if rc == 0 and files.is_file(os.path.join(c.workdir, grid.REPORT_FILE)):
        logging.info("Cell %s finished in %.0f s.", c.name, time.time() - t0)
        continue
      failed.append(c.name)
      logging.error("Cell %s failed (exit status %s); log: %s", c.name, rc,
                    os.path.join(workdir, LOGS_DIR, c.name + ".log"))
      if not keep_going:
        break
  if stop.requested:
    raise KeyboardInterrupt("experiment stopped by a signal; rerun the same command to resume")
  return failed


def _tee(argv: list[str], log_path: str, stop: "_ForwardSigterm") -> int:
  """Runs argv, copying its output (stdout + stderr) to ours and to log_path."""
  with _log_file(log_path) as log:
    log.write(f"\n$ {' '.join(argv)}\n".encode())
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stop.child = proc
    try:
      fd = proc.stdout.fileno()
      while chunk := os.read(fd, 65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        log.write(chunk)
        log.flush()
      return proc.wait()
    finally:
      stop.child = None
      if proc.poll() is None:  # we are being interrupted: let the cell save and stop
        proc.send_signal(signal.SIGTERM)
        proc.wait()


@contextlib.contextmanager
def _log_file(path: str):
  """A cell's log, open for appending. Objects cannot be appended to piece by piece: on an
  object store the output collects in a local temporary file, added to the log at the end."""
  if not files.is_remote(path):
    with open(path, "ab") as f:
      yield f
    return
  with tempfile.TemporaryFile() as f:
    try:
      yield f
    finally:
      f.seek(0)
      files.append_bytes(path, f.read())


class _ForwardSigterm:
  """SIGTERM to the runner: pass it to the running cell (which saves a checkpoint and stops),
  then start no further cell."""

  def __init__(self):
    self.child: subprocess.Popen | None = None
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no forwarding
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signum)
