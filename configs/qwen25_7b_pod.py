"""Qwen2.5 7B Instruct on a TPU pod slice (e.g. v5p-32 / v4-32), all hosts.

  CONFIG=configs/qwen25_7b_pod.py bash launch/tpu_pod.sh
"""

import importlib.util
import pathlib


def _default():
  path = pathlib.Path(__file__).with_name("default.py")
  spec = importlib.util.spec_from_file_location("semsafe_default_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def get_config():
  c = _default()
  c.multihost = True
  c.model.name_or_path = "Qwen/Qwen2.5-7B-Instruct"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.remat = True
  c.data.harmful_per_step = 64
  c.data.benign_per_step = 64
  c.data.pairs_per_step = 128
  c.train.steps = 1000
  c.train.lr = 2e-4
  c.train.warmup_steps = 50
  c.train.log_every = 10
  # 15 GB of bf16 weights (152k vocab): FSDP over one host's 4 chips.
  c.train.mesh.data = -1
  c.train.mesh.fsdp = 4
  c.train.sharding = "fsdp"
  c.checkpoint.every = 100
  c.generate.batch_size = 64
  return c
