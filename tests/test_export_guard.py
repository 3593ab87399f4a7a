"""Export never destroys what it did not write: staging, the marker, the workdir guard,
file modes, and a damaged checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from semsafe_jax import adapters as adapters_lib
from semsafe_jax import export
from semsafe_jax.errors import DamagedCheckpointError, OutputExistsError, UserError
from semsafe_jax.export import staging
from semsafe_jax.jobs import export as export_job
from semsafe_jax.models.registry import tiny_hf_config
from semsafe_jax.models.config import from_hf_dict
from semsafe_jax.train import checkpoint
from semsafe_jax.train.step import TrainState

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny_config():
  spec = importlib.util.spec_from_file_location("tiny_config", ROOT / "configs" / "tiny.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  config.mode = "export"
  return config


def damage(workdir, step: int) -> None:
  """Deletes the array data files of the step's adapters (as a lost file would)."""
  item = pathlib.Path(workdir) / checkpoint.CHECKPOINT_DIR / str(step) / "trainable"
  data = [p for p in item.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data, f"no data files under {item}"
  for p in data:
    p.unlink()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A workdir with adapter checkpoints at steps 3 and 6 (tiny-random shapes)."""
  config = _tiny_config()
  workdir = str(tmp_path_factory.mktemp("guard") / "run")
  cfg = from_hf_dict(tiny_hf_config("llama", 512))
  ad = adapters_lib.init_adapters(config.adapters, cfg, None, jax.random.key(0))
  checkpoint.prepare_workdir(workdir, config)
  ckpt = checkpoint.Checkpointer(workdir, every=1, keep=5, async_save=False)
  for step in (3, 6):
    ad = jax.tree.map(lambda x: x + 0.1, ad)
    state = TrainState(trainable=ad, opt_state=optax.adam(1e-3).init(ad), step=jnp.int32(step),
                       rng=jnp.zeros((2,), jnp.uint32), bad_total=jnp.int32(0),
                       bad_consecutive=jnp.int32(0))
    ckpt.save(step, state, {"next_step": step}, force=True)
  ckpt.close()
  return workdir


def _export(config, workdir, **export_cfg):
  for k, v in export_cfg.items():
    config.export[k] = v
  return export_job.run(config, workdir)


def _snapshot(path) -> dict[str, bytes]:
  root = pathlib.Path(path)
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", ["workdir", "parent", "grandparent", "checkpoints"])
def test_out_dir_that_is_or_holds_the_workdir_is_refused(run_dir, target):
  out = {"workdir": run_dir, "parent": os.path.dirname(run_dir),
         "grandparent": os.path.dirname(os.path.dirname(run_dir)),
         "checkpoints": os.path.join(run_dir, "checkpoints", "new")}[target]
  before = _snapshot(run_dir)
  with pytest.raises(OutputExistsError, match="export.out_dir") as info:
    _export(_tiny_config(), run_dir, format="merged", out_dir=out)
  assert isinstance(info.value, UserError) and "\n" not in str(info.value)
  assert _snapshot(run_dir) == before


def test_out_dir_through_a_relative_path_and_a_symlinked_parent(run_dir, tmp_path, monkeypatch):
  link = tmp_path / "link"
  link.symlink_to(os.path.dirname(run_dir))
  with pytest.raises(OutputExistsError, match="is the workdir"):
    _export(_tiny_config(), run_dir, format="orbax", out_dir=str(link / "run"))
  monkeypatch.chdir(run_dir)
  with pytest.raises(OutputExistsError, match="holds the workdir"):
    _export(_tiny_config(), run_dir, format="orbax", out_dir="..")


def test_foreign_folder_is_left_alone(run_dir, tmp_path):
  model = tmp_path / "someones_model"
  model.mkdir()
  (model / "config.json").write_text('{"model_type": "llama"}')
  (model / "model.safetensors").write_bytes(b"weights")
  before = _snapshot(model)
  with pytest.raises(OutputExistsError, match="no semsafe_export.json"):
    _export(_tiny_config(), run_dir, format="merged", out_dir=str(model))
  assert _snapshot(model) == before
  afile = tmp_path / "a_file"
  afile.write_text("x")
  with pytest.raises(OutputExistsError, match="is a file"):
    _export(_tiny_config(), run_dir, format="orbax", out_dir=str(afile))
  assert afile.read_text() == "x"


def test_export_replaces_only_its_own_marked_export(run_dir, tmp_path):
  out = tmp_path / "adapters"
  assert _export(_tiny_config(), run_dir, format="orbax", out_dir=str(out)) == str(out)
  marker = json.loads((out / staging.MARKER_FILE).read_text())
  assert marker["format"] == "orbax" and marker["step"] == 6
  assert marker["source_run"] == run_dir
  first, _ = export.load_orbax(str(out))
  # Again, from another step: the marked folder is replaced as a whole.
  (out / "stale.txt").write_text("from the earlier export")
  _export(_tiny_config(), run_dir, format="orbax", out_dir=str(out), step=3)
  assert json.loads((out / staging.MARKER_FILE).read_text())["step"] == 3
  assert not (out / "stale.txt").exists()
  second, _ = export.load_orbax(str(out))
  assert not np.allclose(jax.tree.leaves(first)[0], jax.tree.leaves(second)[0])
  # Nothing is left beside it (the staging folder is gone).
  assert sorted(os.listdir(tmp_path)) == ["adapters"]


def test_a_failed_export_changes_nothing(tmp_path):
  out = tmp_path / "out"

  def good(path):
    os.makedirs(path)
    pathlib.Path(path, "a.txt").write_text("first")

  staging.write_export(str(out), {"format": "test"}, good)
  before = _snapshot(out)

  def broken(path):
    os.makedirs(path)
    pathlib.Path(path, "half.bin").write_bytes(b"...")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    staging.write_export(str(out), {"format": "test"}, broken)
  assert _snapshot(out) == before
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_empty_folder_may_be_used(tmp_path):
  out = tmp_path / "empty"
  out.mkdir()
  staging.write_export(str(out), {"format": "test"}, os.makedirs)
  assert (out / staging.MARKER_FILE).is_file()


def test_library_savers_share_the_guard(tmp_path):
  ad = {"lora": {"layers": {"attn": {"q_proj": {"a": np.ones((2, 4, 1), np.float32),
                                                "b": np.ones((2, 1, 4), np.float32)}}}}}
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "keep.txt").write_text("keep")
  with pytest.raises(OutputExistsError):
    export.save_orbax(str(foreign), ad, adapter_config={})
  assert (foreign / "keep.txt").read_text() == "keep"
  out = export.save_orbax(str(tmp_path / "orbax"), ad, adapter_config={})
  assert export.save_orbax(out, ad, adapter_config={}) == out  # its own: replaced


def test_exported_files_are_world_readable(run_dir, tmp_path):
  mask = os.umask(0o022)
  try:
    out = _export(_tiny_config(), run_dir, format="merged", out_dir=str(tmp_path / "merged"))
  finally:
    os.umask(mask)
  files = [p for p in pathlib.Path(out).rglob("*")]
  assert any(p.name == "model.safetensors" for p in files)
  for p in files + [pathlib.Path(out)]:
    want = 0o755 if p.is_dir() else 0o644
    assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))


def test_damaged_latest_checkpoint_names_the_step_and_export_step(run_dir, tmp_path):
  broken = tmp_path / "broken_run"
  shutil.copytree(run_dir, broken)
  damage(broken, 6)
  with pytest.raises(DamagedCheckpointError) as info:
    _export(_tiny_config(), str(broken), format="orbax", out_dir=str(tmp_path / "o"))
  message = str(info.value)
  assert "step 6" in message and "--config.export.step" in message and "3" in message
  assert "\n" not in message and isinstance(info.value, UserError)
  assert not (tmp_path / "o").exists()
  out = _export(_tiny_config(), str(broken), format="orbax", out_dir=str(tmp_path / "o"), step=3)
  assert json.loads(pathlib.Path(out, staging.MARKER_FILE).read_text())["step"] == 3


def test_missing_step_lists_the_steps(run_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"No checkpoint at step 9 .* 3, 6"):
    _export(_tiny_config(), run_dir, format="orbax", out_dir=str(tmp_path / "o"), step=9)


def test_checkpointer_takes_a_relative_workdir(tmp_path, monkeypatch):
  """Library callers of fit pass relative workdirs; orbax itself only takes absolute ones."""
  monkeypatch.chdir(tmp_path)
  cfg = from_hf_dict(tiny_hf_config("llama", 512))
  ad = adapters_lib.init_adapters(_tiny_config().adapters, cfg, None, jax.random.key(0))
  state = TrainState(trainable=ad, opt_state=optax.adam(1e-3).init(ad), step=jnp.int32(2),
                     rng=jnp.zeros((2,), jnp.uint32), bad_total=jnp.int32(0),
                     bad_consecutive=jnp.int32(0))
  ckpt = checkpoint.Checkpointer(os.path.join("runs", "rel"), every=1, keep=2)
  ckpt.save(2, state, {"next_step": 2}, force=True)
  ckpt.close()
  reread = checkpoint.Checkpointer("runs/rel", every=1, keep=2)
  assert reread.latest_step() == 2
  restored, data_state = reread.restore(2, jax.tree.map(np.asarray, state))
  reread.close()
  assert data_state == {"next_step": 2}
  assert (tmp_path / "runs" / "rel" / checkpoint.CHECKPOINT_DIR / "2").is_dir()
  np.testing.assert_array_equal(jax.tree.leaves(restored.trainable)[0],
                                jax.tree.leaves(ad)[0])
