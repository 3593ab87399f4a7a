"""--workdir=gs://bucket/run: every stage reads and writes the workdir through etils.epath.

No network: `fake_gcs` serves gs:// from a local folder. epath's gs:// backend is swapped
for fsspec's DirFileSystem over that folder (the way epath.testing.mock_epath swaps
backends), and orbax's TensorStore spec for gs:// becomes the file driver on the same
folder. Not fsspec's memory://: epath opens only gs://, s3://, az:// and hf:// URLs, and
orbax writes arrays to a URL only through TensorStore's gs:// driver, so gs:// is the one
URL the whole job runs on.
"""

import json
import pathlib

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils
from tensorboardX import record_writer

from semsafe_jax import files, main
from semsafe_jax.configs import load_config
from semsafe_jax.errors import OutputExistsError, WorkdirError
from semsafe_jax.experiments import summary as summary_lib
from semsafe_jax.export import native, staging

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN = "gs://bucket/run"


class _BucketFolder(DirFileSystem):
  """gs://<bucket>/<key> -> <root>/<bucket>/<key>; parents appear on write, as on GCS."""

  protocol = ("gs", "gcs")
  cachable = False


class _Backend(epath_backend._FileSystemSpecBackend):  # pylint: disable=protected-access
  def __init__(self, fs):
    self._fs = fs

  def fs(self, path):
    del path
    return self._fs


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """The local folder that holds the gs:// buckets for this test."""
  root = tmp_path / "gcs"
  root.mkdir()
  fs = _BucketFolder(path=str(root), fs=LocalFileSystem(auto_mkdir=True))
  backends = gpath._PREFIX_TO_BACKEND  # pylint: disable=protected-access
  monkeypatch.setitem(backends, "gs", _Backend(fs))

  def kvstore(path):
    bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {"driver": "file", "path": str(root / bucket / key)}

  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  # The run registers its gs:// TensorBoard writer there; drop it after the test.
  monkeypatch.setattr(record_writer, "REGISTERED_FACTORIES",
                      dict(record_writer.REGISTERED_FACTORIES))
  return root


def test_files_on_a_url_backend(fake_gcs):
  rows = [{"prompt": "a\u2028b", "n": 1}, {"prompt": "é", "n": 2}]
  files.write_jsonl("gs://bucket/x/rows.jsonl", rows)
  assert files.read_jsonl("gs://bucket/x/rows.jsonl") == rows
  assert json.loads((fake_gcs / "bucket/x/rows.jsonl").read_text().split("\n")[1]) == rows[1]

  files.dump_json("gs://bucket/x/a.json", {"k": [1, 2]})
  assert files.read_json("gs://bucket/x/a.json") == {"k": [1, 2]}
  files.append_text("gs://bucket/x/log.txt", "one\n")
  files.append_text("gs://bucket/x/log.txt", "two\n")
  assert files.read_text("gs://bucket/x/log.txt") == "one\ntwo\n"

  files.save_npz("gs://bucket/x/arrays.npz", {"w": np.arange(3.0), "key": "abc"})
  z = files.load_npz("gs://bucket/x/arrays.npz")
  np.testing.assert_array_equal(z["w"], np.arange(3.0))
  assert str(z["key"]) == "abc"
  files.save_npy("gs://bucket/x/e.npy", np.eye(2, dtype=np.float32))
  assert files.load_npy("gs://bucket/x/e.npy").dtype == np.float32

  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure()
  fig.subplots().plot([0, 1])
  files.save_figure(fig, "gs://bucket/x/p.png")
  assert (fake_gcs / "bucket/x/p.png").read_bytes()[:4] == b"\x89PNG"

  assert files.is_remote("gs://bucket/x") and not files.is_remote("runs/x")
  assert files.is_file("gs://bucket/x/a.json") and not files.exists("gs://bucket/x/none")
  assert sorted(p.name for p in (fake_gcs / "bucket/x").iterdir()) == [
      "a.json", "arrays.npz", "e.npy", "log.txt", "p.png", "rows.jsonl"]  # no temporaries


def test_local_writes_stay_atomic_and_leave_no_temporaries(tmp_path):
  files.write_jsonl(tmp_path / "sub" / "rows.jsonl", [{"a": 1}])
  files.write_jsonl(tmp_path / "sub" / "rows.jsonl", [{"a": 2}])
  assert files.read_jsonl(tmp_path / "sub" / "rows.jsonl") == [{"a": 2}]
  assert [p.name for p in (tmp_path / "sub").iterdir()] == ["rows.jsonl"]


def test_url_workdirs_are_kept_and_unknown_schemes_refused():
  assert files.resolve_workdir("gs://bucket/run//") == "gs://bucket/run"
  for url in ("memory://run", "s3://bucket/run", "gs://"):
    with pytest.raises(WorkdirError, match="must be gs://bucket/path"):
      files.resolve_workdir(url)


def test_main_job_train_generate_export_on_a_url_workdir(fake_gcs, tmp_path, monkeypatch,
                                                         fast_compile):
  del fast_compile
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  config = load_config(str(REPO / "configs" / "tiny.py"))
  config.train.progress = False
  report = main.run(config, RUN + "/")  # a trailing slash, as users type it
  run = fake_gcs / "bucket" / "run"

  assert json.loads((run / "report.json").read_text())["steps"] == report["steps"]
  steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] == config.train.steps
  for name in ("config.json", "report.md", "refusal_rates.png", "prompts.jsonl", "pairs.npz",
               "splits.json", "mining_stats.png", "answers_before.jsonl", "answers_after.jsonl",
               "train_history.jsonl", "probe/safety_probe.npz", "evals"):
    assert (run / name).exists(), name
  assert list((run / "cache").glob("sbert-*.npy"))
  assert list((run / "evals" / "cache").glob("generations-*.jsonl"))
  assert list((run / "tensorboard").glob("events.out.tfevents.*"))
  history = summary_lib.read_history(RUN)  # what an experiment's summary reads of a cell
  assert [m["step"] for m in history][-1] == config.train.steps

  # generate: the trained adapters come back from the bucket.
  config.mode = "generate"
  config.generate.prompts = ("Name a colour.",)
  config.generate.max_new_tokens = 4
  rows = main.run(config, RUN)
  assert rows[0]["adapters"]
  assert files.read_jsonl(RUN + "/generations.jsonl")[0]["prompt"] == "Name a colour."

  # export: staged locally, uploaded; a second export replaces the first.
  config.mode = "export"
  config.export.format = "orbax"
  out = main.run(config, RUN)
  assert out == RUN + "/export/orbax"
  marker = staging.read_marker(out)
  assert marker["source_run"] == RUN and marker["step"] == config.train.steps
  (run / "export" / "orbax" / "left_by_the_first_export").write_text("")
  main.run(config, RUN)
  assert not (run / "export" / "orbax" / "left_by_the_first_export").exists()
  adapters, adapter_config = native.load_orbax(out)
  assert adapters and adapter_config["base_model_name_or_path"] == "tiny-random"
  config.export.out_dir = RUN + "/checkpoints/x"
  with pytest.raises(OutputExistsError, match="checkpoints"):
    main.run(config, RUN)
  (run / "notes").mkdir()
  (run / "notes" / "mine.txt").write_text("")
  config.export.out_dir = RUN + "/notes"
  with pytest.raises(OutputExistsError, match="no earlier export wrote"):
    main.run(config, RUN)

  assert not list(cwd.iterdir())  # nothing local by mistake (e.g. a "gs:" folder)
  assert epath.Path(RUN, "report.json").exists()
