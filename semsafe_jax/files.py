"""Workdir files on any file system etils.epath reaches: a local folder or gs://bucket/run.

Every stage reads and writes the workdir through these helpers (checkpoints go through
orbax, which uses epath too), so `--workdir=gs://...` works as a local one does. JSON-lines
files have one reader and one writer here.

Writes are atomic where the file system allows it: on a local disk a temporary file beside
the target is renamed over it, so readers never see half a file. Object stores have no
atomic rename (a "rename" is a copy), but an object only appears once its upload is
complete, so there the file is written directly.
"""

from __future__ import annotations

import io
import json
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

from semsafe_jax.errors import WorkdirError

PathLike = str | os.PathLike[str]
# gs://bucket/run, s3://...: a path on a file system other than the local one.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: PathLike) -> bool:
  return bool(_URL.match(os.fspath(path)))


def resolve_workdir(raw: str | None) -> str:
  """The workdir as an absolute local path (a URL is kept, less any trailing slash).

  Raises:
    WorkdirError: an empty value, a path that is an existing file, or a URL other than
      gs://bucket/path.
  """
  if raw is None or not raw.strip():
    raise WorkdirError("--workdir is empty; give the folder for the run's outputs, "
                       "e.g. --workdir=runs/demo")
  if is_remote(raw):
    scheme, _, rest = raw.partition("://")
    # epath also opens s3:// and az://, but orbax writes checkpoint arrays to a URL only
    # through TensorStore's gs:// driver.
    if scheme != "gs" or not rest.strip("/"):
      raise WorkdirError(f"--workdir={raw!r}: a URL workdir must be gs://bucket/path; "
                         "otherwise give a local folder")
    return f"gs://{rest.rstrip('/')}"  # one spelling per run, as for local paths
  path = os.path.abspath(os.path.expanduser(raw))
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir={raw!r} is a file ({path}); give a folder.")
  return path


def as_path(path: PathLike) -> epath.Path:
  return epath.Path(path)


def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def is_file(path: PathLike) -> bool:
  return as_path(path).is_file()


def makedirs(path: PathLike) -> None:
  """A local folder with its parents; nothing on object stores, which have no folders."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def read_bytes(path: PathLike) -> bytes:
  return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
  # Decoded here: fsspec's text mode would use the locale's encoding.
  return read_bytes(path).decode("utf-8")


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes the whole file, atomically where the file system can (see the module doc)."""
  if is_remote(path):
    as_path(path).write_bytes(data)
    return
  path = os.fspath(path)
  parent, name = os.path.split(path)
  os.makedirs(parent or ".", exist_ok=True)
  tmp = os.path.join(parent, f".{name}.tmp{os.getpid()}")
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path: PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def append_bytes(path: PathLike, data: bytes) -> None:
  """Adds data at the end of a file (creating it).

  Locally one O_APPEND write, so concurrent writers interleave whole writes. Objects
  cannot be appended to: the file is read and written back whole, and a concurrent
  writer's lines may be lost (fine for caches, whose lost lines are recomputed).
  """
  if is_remote(path):
    p = as_path(path)
    p.write_bytes((p.read_bytes() if p.exists() else b"") + data)
    return
  os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
  with open(path, "ab") as f:
    f.write(data)


def append_text(path: PathLike, text: str) -> None:
  append_bytes(path, text.encode("utf-8"))


def read_json(path: PathLike) -> Any:
  return json.loads(read_text(path))


def dump_json(path: PathLike, obj: Any, **kw: Any) -> None:
  """obj as indented JSON (kw: json.dumps options), written as write_bytes does."""
  write_text(path, json.dumps(obj, **{"indent": 2, "ensure_ascii": False, **kw}) + "\n")


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
  # split("\n"), not splitlines(): JSON leaves U+2028 and friends unescaped in strings.
  return [json.loads(line) for line in read_text(path).split("\n") if line.strip()]


def write_jsonl(path: PathLike, rows: Sequence[dict[str, Any]]) -> None:
  """One JSON object per line, written as write_bytes does: readers never see half a file."""
  write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# numpy and matplotlib write to an in-memory buffer, which goes out in one write.


def save_npy(path: PathLike, array: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, array)
  write_bytes(path, buf.getvalue())


def load_npy(path: PathLike) -> np.ndarray:
  return np.load(io.BytesIO(read_bytes(path)))


def save_npz(path: PathLike, arrays: Mapping[str, Any]) -> None:
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  write_bytes(path, buf.getvalue())


def load_npz(path: PathLike) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(read_bytes(path))) as z:
    return {k: z[k] for k in z.files}


def save_figure(fig: Any, path: PathLike, **kw: Any) -> None:
  """fig.savefig to any path; the format follows the file name (e.g. .png)."""
  buf = io.BytesIO()
  fig.savefig(buf, format=os.path.splitext(os.fspath(path))[1][1:] or None, **kw)
  write_bytes(path, buf.getvalue())
