"""Launch scripts, pod configs, and the multi-host switch."""

import importlib.util
import os
import pathlib
import subprocess

import jax
import pytest

import test_train_toy as toy
from semsafe_jax.train import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "launch").glob("*.sh"))
POD_CONFIGS = {"llama3_8b_pod.py": "meta-llama/Llama-3.1-8B-Instruct",
               "qwen25_7b_pod.py": "Qwen/Qwen2.5-7B-Instruct"}


def _fake_bin(tmp_path: pathlib.Path, name: str) -> pathlib.Path:
  """A stand-in executable that appends its argv (one per line) to a log."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  exe = bin_dir / name
  exe.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> "{tmp_path}/{name}.log"\n'
                 'echo "----" >> "' + str(tmp_path) + f'/{name}.log"\n')
  exe.chmod(0o755)
  return exe


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_scripts_parse(script):
  subprocess.run(["bash", "-n", str(script)], check=True)


def test_launch_scripts_exist():
  assert {p.name for p in SCRIPTS} >= {"tpu_pod.sh", "gpu_node.sh"}


def test_tpu_pod_runs_same_command_on_all_workers(tmp_path):
  _fake_bin(tmp_path, "gcloud")
  env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
         "TPU_NAME": "pod", "ZONE": "us-east5-a", "WORKDIR": "gs://bucket/run 1"}
  subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), "--config.train.steps=7"],
                 env=env, check=True)
  calls = (tmp_path / "gcloud.log").read_text().split("----\n")[:-1]
  assert len(calls) == 1  # no --setup: only the training command
  argv = calls[0].splitlines()
  assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert "--worker=all" in argv
  cmd = argv[argv.index("--command") + 1]
  assert "python3 -m semsafe_jax.main --config=configs/llama3_8b_pod.py" in cmd
  assert r"--workdir=gs://bucket/run\ 1" in cmd
  assert cmd.endswith("--config.multihost=True --config.train.steps=7")


def test_tpu_pod_requires_its_settings(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE", "WORKDIR")}
  proc = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh")], env=env,
                        capture_output=True, text=True)
  assert proc.returncode != 0 and "TPU_NAME" in proc.stderr


def test_gpu_node_runs_one_process(tmp_path):
  py = _fake_bin(tmp_path, "python")
  env = {**os.environ, "PYTHON": str(py), "WORKDIR": str(tmp_path / "w")}
  subprocess.run(["bash", str(ROOT / "launch" / "gpu_node.sh"), "--config.train.steps=3"],
                 env=env, check=True)
  argv = (tmp_path / "python.log").read_text().split("----\n")[0].splitlines()
  assert argv[:2] == ["-m", "semsafe_jax.main"]
  assert "--config.multihost=False" in argv and argv[-1] == "--config.train.steps=3"


@pytest.mark.parametrize("name", sorted(POD_CONFIGS))
def test_pod_configs(name):
  spec = importlib.util.spec_from_file_location("pod_config", ROOT / "configs" / name)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  assert c.model.name_or_path == POD_CONFIGS[name]
  assert c.multihost and c.model.remat and c.model.dtype == "bfloat16"
  assert c.train.sharding in sharding.RULES
  # Everything else comes from the default config.
  assert set(toy.load_default_config().keys()) == set(c.keys())


def test_multihost_flag_calls_jax_distributed_initialize(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
  c = toy.toy_config(0)
  assert not sharding.initialize_distributed(c) and not calls  # multihost=False
  c.multihost = True
  # The training entry point reads config.multihost before touching devices.
  params, history = toy.run(str(tmp_path / "w"), c)
  assert calls == [((), {})] and history == []
  assert not sharding.initialize_distributed(c)  # idempotent
  assert len(calls) == 1
