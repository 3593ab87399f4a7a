"""Writing an export folder without risking anything already on disk.

Every export is written into a fresh hidden folder beside `out_dir`, then renamed into
place. An existing `out_dir` is replaced only when it is empty or carries our marker
file (`semsafe_export.json`: format, step, source run), i.e. when an earlier export
wrote it; anything else is left alone with an error. An `out_dir` that is the run's
workdir, holds it, or lies in its checkpoints is always refused.

An `out_dir` on an object store (gs://...) is written in a local temporary folder (the
system's, TMPDIR) and uploaded, with the same checks. Object stores cannot rename a
folder, so there the earlier export is deleted, then the new one uploaded, marker first:
an interrupted upload is still replaced by the next export.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from semsafe_jax import files
from semsafe_jax.errors import OutputExistsError

MARKER_FILE = "semsafe_export.json"
_CHECKPOINTS = "checkpoints"  # train/checkpoint.py's CHECKPOINT_DIR (no import: no orbax here)


def read_marker(path: str) -> dict[str, Any] | None:
  """The marker of an export folder, or None when `path` has none (or an unreadable one)."""
  try:
    marker = files.read_json(os.path.join(path, MARKER_FILE))
  except (OSError, ValueError):
    return None
  return marker if isinstance(marker, dict) else None


def _inside(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out_dir(out_dir: str, *, workdir: str | None = None) -> str:
  """`out_dir` as an absolute path, if an export may be written there.

  Raises:
    OutputExistsError: out_dir is (or holds, or is inside the checkpoints of) the
      workdir, is a file or a symbolic link, or is a non-empty folder without the marker.
  """
  if not str(out_dir).strip():
    raise OutputExistsError("export.out_dir is empty; leave it unset for WORKDIR/export/<format>.")
  fix = "choose another --config.export.out_dir (unset: WORKDIR/export/<format>)"
  if files.is_remote(str(out_dir)):
    return _check_remote_out_dir(str(out_dir), workdir, fix)
  out = os.path.abspath(os.path.expanduser(str(out_dir)))
  real = os.path.realpath(out)
  if workdir and "://" not in str(workdir):
    run = os.path.realpath(os.path.abspath(os.path.expanduser(str(workdir))))
    if _inside(run, real):
      what = "the workdir" if real == run else "a folder that holds the workdir"
      raise OutputExistsError(f"export.out_dir={out_dir!r} is {what} {run}; an export there "
                              f"would replace the run; {fix}.")
    if _inside(real, os.path.join(run, _CHECKPOINTS)):
      raise OutputExistsError(f"export.out_dir={out_dir!r} lies in the run's checkpoints "
                              f"({os.path.join(run, _CHECKPOINTS)}); {fix}.")
  if os.path.islink(out):
    raise OutputExistsError(f"export.out_dir={out_dir!r} is a symbolic link ({out} -> "
                            f"{os.readlink(out)}); {fix}, or give the link's target.")
  if os.path.lexists(out) and not os.path.isdir(out):
    raise OutputExistsError(f"export.out_dir={out_dir!r} is a file ({out}); {fix}.")
  if os.path.isdir(out) and os.listdir(out) and read_marker(out) is None:
    raise OutputExistsError(
        f"export.out_dir={out_dir!r}: {out} holds files that no earlier export wrote (it "
        f"has no {MARKER_FILE}), so they are left alone; {fix}, or empty it.")
  return out


def _check_remote_out_dir(out_dir: str, workdir: str | None, fix: str) -> str:
  """check_out_dir for a URL: no links or relative paths there, the same other checks."""
  out = out_dir.rstrip("/")
  if workdir and files.is_remote(str(workdir)):
    run = str(workdir).rstrip("/")
    if _inside(run, out):
      what = "the workdir" if out == run else "a folder that holds the workdir"
      raise OutputExistsError(f"export.out_dir={out_dir!r} is {what} {run}; an export there "
                              f"would replace the run; {fix}.")
    if _inside(out, f"{run}/{_CHECKPOINTS}"):
      raise OutputExistsError(f"export.out_dir={out_dir!r} lies in the run's checkpoints "
                              f"({run}/{_CHECKPOINTS}); {fix}.")
  path = files.as_path(out)
  if path.is_file():
    raise OutputExistsError(f"export.out_dir={out_dir!r} is a file; {fix}.")
  if path.is_dir() and any(path.iterdir()) and read_marker(out) is None:
    raise OutputExistsError(
        f"export.out_dir={out_dir!r} holds files that no earlier export wrote (it has no "
        f"{MARKER_FILE}), so they are left alone; {fix}, or empty it.")
  return out


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _make_readable(root: str) -> None:
  """Modes as a plain write would give them (0666/0777 less the umask): some writers
  (safetensors, mkdtemp) create files and folders private to the user (0600/0700)."""
  mask = _umask()
  os.chmod(root, 0o777 & ~mask)
  for folder, dirs, names in os.walk(root):
    for d in dirs:
      os.chmod(os.path.join(folder, d), 0o777 & ~mask)
    for f in names:
      path = os.path.join(folder, f)
      if not os.path.islink(path):
        os.chmod(path, 0o666 & ~mask)


def write_export(out_dir: str, marker: Mapping[str, Any], write: Callable[[str], Any], *,
                 workdir: str | None = None) -> str:
  """Writes an export folder at `out_dir` through `write(staging_path)`; returns out_dir.

  `write` creates the folder it is given (it does not exist yet) and fills it. The
  marker (`marker` plus the time) is added, file modes are made world-readable
  (umask permitting), and the folder is renamed into place, replacing an earlier
  export. On any error nothing at a local `out_dir` has changed (on object stores, see
  the module doc).
  """
  out = check_out_dir(out_dir, workdir=workdir)
  remote = files.is_remote(out)
  parent, name = out.rsplit("/", 1) if remote else os.path.split(out)
  if not remote:
    os.makedirs(parent, exist_ok=True)
  # A remote export is staged in the system's temporary folder: beside it is no local disk.
  scratch = tempfile.mkdtemp(prefix=f".{name}.export-", dir=None if remote else parent)
  try:
    staged = os.path.join(scratch, name)
    write(staged)
    if not os.path.isdir(staged):
      os.makedirs(staged)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(os.path.join(staged, MARKER_FILE), "w", encoding="utf-8") as f:
      json.dump({**marker, "written": stamp}, f, indent=2, sort_keys=True)
    check_out_dir(out_dir, workdir=workdir)  # nothing appeared there meanwhile
    if remote:
      _upload(staged, out)
      return out
    _make_readable(staged)
    if os.path.lexists(out):
      os.rename(out, os.path.join(scratch, "replaced"))
    os.rename(staged, out)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return out


def _upload(local: str, out: str) -> None:
  """Replaces the (checked) export at URL `out` with the folder `local`, marker first."""
  dest = files.as_path(out)
  if dest.exists():
    dest.rmtree()
  rel = [os.path.relpath(os.path.join(folder, f), local)
         for folder, _, names in os.walk(local) for f in names]
  for r in sorted(rel, key=lambda r: (r != MARKER_FILE, r)):
    with open(os.path.join(local, r), "rb") as src, (dest / r).open("wb") as dst:
      shutil.copyfileobj(src, dst, 16 << 20)
