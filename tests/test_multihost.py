"""Multi-host without a pod: two CPU processes run the tiny main job as one JAX job.

Each process gets 4 emulated CPU devices; `jax.distributed` joins them through a
localhost coordinator (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
read by `train.sharding.initialize_distributed`), and the 8 devices form one mesh
(data 4 x fsdp 2, the frozen model FSDP-sharded), which is what a TPU pod launch runs,
minus the TPUs. Checked against the same job in one process with 8 devices:

  - both processes finish;
  - only process 0 writes outside checkpoints/ (an audit hook in each process logs
    every file it opens for writing, renames or creates under the workdir);
  - the trained adapters equal the single-process run's within 1e-5;
  - killing one process mid-run, then restarting both, ends with identical adapters.

Four runs of the tiny job (two of them with two processes): about 3-4 minutes on two
free cores. `SEMSAFE_SKIP_MULTIHOST_RESTART=1` skips the kill-and-restart run (the
slowest part) for a faster pass.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from semsafe_jax.train import checkpoint as ckpt_lib
from semsafe_jax.train import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS, EVERY = 8, 2
# Batch blocks must split evenly over the 8 devices (data 4 x fsdp 2).
FLAGS = ("--config=configs/tiny.py", f"--config.train.steps={STEPS}",
         f"--config.checkpoint.every={EVERY}", "--config.data.harmful_per_step=8",
         "--config.data.benign_per_step=8", "--config.data.pairs_per_step=8",
         "--config.train.mesh.fsdp=2", "--config.train.sharding=fsdp")
TIMEOUT = 600  # seconds per run; a process whose peer died waits on collectives

# Imported first thing by every Python process that has it on PYTHONPATH (the
# command line's allocator re-exec included): logs each write under the workdir.
AUDIT_HOOK = '''
import os, sys
_ROOT = os.path.join(os.path.realpath(os.environ["WRITE_AUDIT_ROOT"]), "")
_LOG = os.environ["WRITE_AUDIT_LOG"]
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _hook(event, args):
  if event == "open":
    path, mode, flags = args
    if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE):
      return
  elif event in ("os.rename", "os.replace"):
    path = args[1]
  elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
    path = args[0]
  else:
    return
  if isinstance(path, int) or path is None:
    return
  p = os.path.realpath(os.fsdecode(path))
  if p.startswith(_ROOT):
    with open(_LOG, "a") as f:  # the log lies outside the workdir: no recursion
      f.write(f"{event} {p[len(_ROOT):]}\\n")

sys.addaudithook(_hook)
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir: pathlib.Path, logs: pathlib.Path, *, processes: int, hook_dir: pathlib.Path
           ) -> list[subprocess.Popen]:
  """Starts the tiny main job as `processes` cooperating processes (1: a plain 8-device run).

  Every run shares one SBERT cache beside the hook (the same config value in all of them),
  so only the first encodes the prompts."""
  port = _free_port()
  procs = []
  for i in range(processes):
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}",
           "PYTHONPATH": os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")]),
           "WRITE_AUDIT_ROOT": str(workdir), "WRITE_AUDIT_LOG": str(logs / f"writes{i}.txt")}
    multihost = processes > 1
    if multihost:
      env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
                 JAX_PROCESS_ID=str(i))
    cmd = [sys.executable, "-m", "semsafe_jax.main", f"--workdir={workdir}", *FLAGS,
           f"--config.data.cache_dir={hook_dir / 'sbert_cache'}",
           f"--config.multihost={multihost}"]
    with open(logs / f"out{i}.txt", "ab") as out:  # the child keeps its own descriptor
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True))
  return procs


def _kill(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def _wait(procs: list[subprocess.Popen], logs: pathlib.Path) -> None:
  """Waits for every process; on a failure or timeout kills the rest (a process whose
  peer died would wait on it for minutes) and shows each one's log tail."""
  deadline = time.time() + TIMEOUT
  try:
    while any(p.poll() is None for p in procs):
      failed = [p for p in procs if p.poll() not in (None, 0)]
      assert not failed and time.time() < deadline, "a process failed or timed out"
      time.sleep(0.2)
  except AssertionError:
    _kill(procs)
    tails = "\n".join(f"--- process {i} (exit {p.returncode}):\n"
                      + (logs / f"out{i}.txt").read_text(errors="replace")[-4000:]
                      for i, p in enumerate(procs))
    raise AssertionError(f"multi-process run failed:\n{tails}") from None


def _run(workdir: pathlib.Path, processes: int, hook_dir: pathlib.Path) -> pathlib.Path:
  logs = workdir.with_name(workdir.name + "_logs")
  logs.mkdir()
  _wait(_start(workdir, logs, processes=processes, hook_dir=hook_dir), logs)
  return logs


def _finished_steps(workdir: pathlib.Path) -> list[int]:
  d = workdir / ckpt_lib.CHECKPOINT_DIR
  # Orbax writes into a temporary name and renames when done: digits = finalised.
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _adapters(workdir: pathlib.Path) -> dict[str, np.ndarray]:
  loaded = ckpt_lib.load_latest_adapters(workdir, step=STEPS)
  assert loaded is not None, f"no checkpoint at step {STEPS} in {workdir}"
  from jax.tree_util import keystr, tree_flatten_with_path  # pylint: disable=g-import-not-at-top
  leaves, _ = tree_flatten_with_path(loaded[0])
  return {keystr(k): np.asarray(v) for k, v in leaves}


def _writes(logs: pathlib.Path, i: int) -> list[str]:
  f = logs / f"writes{i}.txt"
  return sorted(set(f.read_text().splitlines())) if f.exists() else []


def test_distributed_settings_from_the_environment():
  assert sharding.distributed_args({}) == {}  # JAX's cluster detection fills everything in
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert sharding.distributed_args(env) == {"coordinator_address": "10.0.0.1:1234",
                                            "num_processes": 4, "process_id": 3}
  bad = [({**env, "JAX_PROCESS_ID": "4"}, "JAX_PROCESS_ID=4"),
         ({**env, "JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two'"),
         ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"}, "together"),
         ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS")]
  for environ, message in bad:
    with pytest.raises(ValueError, match=message) as e:
      sharding.distributed_args(environ)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory) -> pathlib.Path:
  d = tmp_path_factory.mktemp("audit_hook")
  (d / "sitecustomize.py").write_text(AUDIT_HOOK)
  return d


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, hook_dir) -> tuple[pathlib.Path, pathlib.Path]:
  workdir = tmp_path_factory.mktemp("multihost") / "w"
  return workdir, _run(workdir, 2, hook_dir)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, hook_dir) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("singlehost") / "w"
  _run(workdir, 1, hook_dir)
  return workdir


def test_both_processes_finish_as_one_job(two_process_run):
  workdir, logs = two_process_run
  for i in range(2):
    out = (logs / f"out{i}.txt").read_text(errors="replace")
    assert f"process {i} of 2, 8 global devices" in out, out[-3000:]
    assert f"Trained steps 0..{STEPS}" in out, out[-3000:]
  assert (workdir / "report.json").exists() and (workdir / "answers_after.jsonl").exists()
  assert _finished_steps(workdir)[-1] == STEPS


def test_only_process_0_writes_outside_checkpoints(two_process_run):
  _, logs = two_process_run
  ours = _writes(logs, 0)
  # The audit hook sees the writes: process 0 wrote the reports.
  for name in ("report.json", "report.md", "answers_after.jsonl", "config.json"):
    assert any(w.endswith(" " + name) for w in ours), (name, ours)
  theirs = [w for w in _writes(logs, 1)
            if not w.split(" ", 1)[1].startswith(ckpt_lib.CHECKPOINT_DIR + "/")]
  assert not theirs, f"process 1 wrote outside {ckpt_lib.CHECKPOINT_DIR}/: {theirs}"


def test_adapters_equal_single_process_8_device_run(two_process_run, one_process_run):
  multi, single = _adapters(two_process_run[0]), _adapters(one_process_run)
  assert multi.keys() == single.keys() and multi
  for k in multi:
    assert multi[k].dtype == np.float32, k
    np.testing.assert_allclose(multi[k], single[k], atol=1e-5, rtol=0, err_msg=k)
  # Training moved the adapters (so the comparison is not between two identities).
  assert any(np.abs(v).max() > 0 for k, v in multi.items() if k.endswith("['b']"))


@pytest.mark.skipif(os.environ.get("SEMSAFE_SKIP_MULTIHOST_RESTART") == "1",
                    reason="SEMSAFE_SKIP_MULTIHOST_RESTART=1 (the slow kill-and-restart run)")
def test_kill_one_process_then_restart_both_gives_identical_adapters(two_process_run, hook_dir,
                                                                    tmp_path):
  workdir = tmp_path / "w"
  logs = tmp_path / "w_logs"
  logs.mkdir()
  procs = _start(workdir, logs, processes=2, hook_dir=hook_dir)
  deadline = time.time() + TIMEOUT
  try:
    while not _finished_steps(workdir):
      assert all(p.poll() is None for p in procs), "a process exited before its first checkpoint"
      assert time.time() < deadline, "no checkpoint in time"
      time.sleep(0.05)
    os.killpg(procs[1].pid, signal.SIGKILL)  # one host lost mid-run ...
    killed_at = _finished_steps(workdir)
  finally:
    _kill(procs)  # ... takes the job down: its peer would wait on collectives
  assert procs[1].returncode == -signal.SIGKILL
  assert killed_at[-1] < STEPS, f"the run finished before the kill: {killed_at}"

  _wait(_start(workdir, logs, processes=2, hook_dir=hook_dir), logs)
  resumed = _finished_steps(workdir)
  out = (logs / "out0.txt").read_text(errors="replace")
  assert "Resumed" in out and resumed[-1] == STEPS, out[-3000:]
  got, want = _adapters(workdir), _adapters(two_process_run[0])
  assert got.keys() == want.keys()
  for k in got:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
