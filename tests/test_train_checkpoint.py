"""Checkpoints: resume after SIGKILL / SIGTERM / Ctrl-C, config guard, non-finite halt, a
damaged latest step."""

import json
import logging
import pathlib
import shutil
import signal
import time

import numpy as np
import pytest

import test_train_toy as toy
from semsafe_jax.train import checkpoint as ckpt_lib
from semsafe_jax.train import trainer

N = toy.STRAIGHT_STEPS


def _finished_steps(workdir: pathlib.Path) -> list[int]:
  d = workdir / ckpt_lib.CHECKPOINT_DIR
  # Orbax writes into a temporary name and renames when done: digits = finalised.
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _interrupted_run(workdir: pathlib.Path, sig: int, min_step: int) -> tuple[int, str]:
  """Starts a slow training subprocess, sends `sig` once a checkpoint at step
  >= min_step is on disk, and returns (exit code, output)."""
  proc = toy.start_cli(["--workdir", str(workdir), "--steps", str(N), "--every", "2",
                        "--sleep", "0.4"])
  deadline = time.time() + 240
  try:
    while not any(s >= min_step for s in _finished_steps(workdir)):
      assert proc.poll() is None, f"trainer exited early:\n{proc.stdout.read()}"
      assert time.time() < deadline, "no checkpoint written in time"
      time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be interrupted"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, out


def _resume_and_compare(workdir: pathlib.Path) -> list[dict]:
  latest = max(_finished_steps(workdir))
  assert 0 < latest < N
  params, history = toy.run(str(workdir), toy.toy_config(N))
  assert history[0]["step"] == latest + 1  # resumed, not restarted
  ref = toy.straight_run()
  np.testing.assert_allclose(toy.flat(params), ref["params"], atol=1e-6, rtol=0)
  ref_loss = {h["step"]: h["loss"] for h in ref["history"]}
  for h in history:
    np.testing.assert_allclose(h["loss"], ref_loss[h["step"]], rtol=1e-6)
  return history


def test_resume_after_sigkill_matches_straight_run(tmp_path):
  workdir = tmp_path / "w"
  code, out = _interrupted_run(workdir, signal.SIGKILL, min_step=2)
  assert code == -signal.SIGKILL, out
  _resume_and_compare(workdir)


def test_sigterm_saves_then_resume_matches(tmp_path):
  workdir = tmp_path / "w"
  code, out = _interrupted_run(workdir, signal.SIGTERM, min_step=1)
  assert code != 0 and "Preempted: saved step" in out, out
  saved = int(out.split("Preempted: saved step ")[1].split()[0])
  assert saved == max(_finished_steps(workdir)) and saved < N
  _resume_and_compare(workdir)


def test_config_mismatch_is_an_error_and_overwrite_starts_fresh(tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(toy.straight_run()["workdir"], workdir)
  changed = toy.toy_config(N)
  changed.train.lr = 0.5
  with pytest.raises(ckpt_lib.ConfigMismatchError, match=r"train.lr: 0.01 -> 0.5"):
    toy.run(workdir, changed)
  # Harmless differences (logging, checkpoint cadence, mode) still resume.
  same = toy.toy_config(N)
  same.train.log_every, same.checkpoint.every, same.mode = 3, 5, "generate"
  ckpt_lib.prepare_workdir(workdir, same)
  # The refused run left the workdir as it was.
  assert ckpt_lib.read_config(workdir)["train"]["lr"] == 0.01
  assert max(_finished_steps(pathlib.Path(workdir))) == N

  fresh = toy.toy_config(2)
  fresh.overwrite = True
  _, history = toy.run(workdir, fresh)
  assert [h["step"] for h in history] == [1, 2]
  assert _finished_steps(pathlib.Path(workdir)) == [1, 2]
  assert ckpt_lib.read_config(workdir)["train"]["steps"] == 2


def test_load_latest_adapters(tmp_path, caplog):
  assert ckpt_lib.load_latest_adapters(tmp_path / "empty") is None
  ref = toy.straight_run()
  with caplog.at_level(logging.WARNING):
    params, config = ckpt_lib.load_latest_adapters(ref["workdir"])
  # Reading only "trainable" must not warn about the other items (handlers registered).
  assert not [r for r in caplog.records if "could not be restored" in r.getMessage()]
  assert config["train"]["lr"] == 0.01
  assert set(params) == {"q_proj", "v_proj"} and isinstance(params["q_proj"]["a"], np.ndarray)
  np.testing.assert_array_equal(toy.flat(params), ref["params"])
  earlier, _ = ckpt_lib.load_latest_adapters(ref["workdir"], step=N - 2)
  assert not np.array_equal(toy.flat(earlier), ref["params"])


def test_saved_config_is_json_in_workdir():
  ref = toy.straight_run()
  d = json.loads((pathlib.Path(ref["workdir"]) / "config.json").read_text())
  assert d["model"]["name_or_path"] and "train" in d


def test_consecutive_nonfinite_steps_halt_with_checkpoint_intact(tmp_path):
  workdir = tmp_path / "w"
  c = toy.toy_config(N)
  c.train.max_bad_steps = 2
  data = toy.BatchFn(nan_steps=(1, 3, 4))  # 0-based: steps 2, 4, 5 are bad
  with pytest.raises(trainer.NonFiniteError,
                     match="Stopped at step 5: 2 consecutive steps had a non-finite"):
    toy.run(str(workdir), c, data)
  assert max(_finished_steps(workdir)) == 4  # nothing saved after the halting step
  loaded = ckpt_lib.load_latest_adapters(workdir)
  assert loaded is not None and np.all(np.isfinite(toy.flat(loaded[0])))


def test_ctrl_c_saves_then_resume_matches(tmp_path):
  workdir = tmp_path / "w"
  code, out = _interrupted_run(workdir, signal.SIGINT, min_step=1)
  assert code != 0 and "Preempted: saved step" in out, out
  assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
  saved = int(out.split("Preempted: saved step ")[1].split()[0])
  assert saved == max(_finished_steps(workdir)) and saved < N
  _resume_and_compare(workdir)


def _damage(workdir: pathlib.Path, step: int, item: str = "trainable") -> None:
  """Deletes the array data files of one item of a step, as a lost file would."""
  files = [p for p in (workdir / ckpt_lib.CHECKPOINT_DIR / str(step) / item).rglob("*")
           if p.is_file() and p.parent.name == "d"]
  assert files
  for p in files:
    p.unlink()


@pytest.mark.parametrize("item", ["trainable", "train_state"])
def test_damaged_latest_checkpoint_resumes_from_the_previous_step(tmp_path, caplog, item):
  workdir = tmp_path / "w"
  shutil.copytree(toy.straight_run()["workdir"], workdir)
  _damage(workdir, N, item)
  with caplog.at_level(logging.WARNING):
    params, history = toy.run(str(workdir), toy.toy_config(N))
  warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
  assert warned and f"step {N} " in warned[0] and f"{N}.damaged" in warned[0], warned
  assert [h["step"] for h in history] == [N - 1, N]  # resumed at N - 2 (every=2)
  np.testing.assert_allclose(toy.flat(params), toy.straight_run()["params"], atol=1e-6, rtol=0)
  # The damaged step is kept aside for the user, the new step N is saved in its place.
  assert (workdir / ckpt_lib.CHECKPOINT_DIR / f"{N}.damaged").is_dir()
  assert max(_finished_steps(workdir)) == N
  assert ckpt_lib.load_adapters(workdir, fallback=False).step == N


def test_load_adapters_skips_a_damaged_step_with_a_warning(tmp_path, caplog):
  workdir = tmp_path / "w"
  shutil.copytree(toy.straight_run()["workdir"], workdir)
  _damage(workdir, N)
  with caplog.at_level(logging.WARNING):
    got = ckpt_lib.load_adapters(workdir)
  assert got.step == N - 2
  assert any(f"step {N} " in r.getMessage() and "damaged" in r.getMessage()
             for r in caplog.records)
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match=f"step {N} .*damaged"):
    ckpt_lib.load_adapters(workdir, fallback=False)
  with pytest.raises(ckpt_lib.DamagedCheckpointError):
    ckpt_lib.load_adapters(workdir, step=N)
  assert ckpt_lib.available_steps(workdir) == [N - 2, N]
