"""Qwen2.5 7B Instruct on a TPU pod slice (e.g. v5p-32 / v4-32), all hosts.

  CONFIG=configs/qwen25_7b_pod.py bash launch/tpu_pod.sh
"""

from semsafe_jax.configs import load_sibling


def get_config():
  # Same pod recipe as the Llama 8B config; only the model differs.
  c = load_sibling(__file__, "llama3_8b_pod.py")
  c.model.name_or_path = "Qwen/Qwen2.5-7B-Instruct"
  # 15 GB of bf16 weights (152k vocab): the Llama config's FSDP over one
  # host's 4 chips fits as is.
  return c
