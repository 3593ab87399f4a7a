"""Qwen2.5 7B Instruct on a TPU pod slice (e.g. v5p-32 / v4-32), all hosts.

  CONFIG=configs/qwen25_7b_pod.py bash launch/tpu_pod.sh
"""

import importlib.util
import pathlib


def _llama_pod():
  # Same pod recipe as the Llama 8B config (configs/ is not a package, so load
  # it by path); only the model differs.
  path = pathlib.Path(__file__).with_name("llama3_8b_pod.py")
  spec = importlib.util.spec_from_file_location("semsafe_llama3_8b_pod_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def get_config():
  c = _llama_pod()
  c.model.name_or_path = "Qwen/Qwen2.5-7B-Instruct"
  # 15 GB of bf16 weights (152k vocab): the Llama config's FSDP over one
  # host's 4 chips fits as is.
  return c
