"""Llama 3.1 8B Instruct on a TPU pod slice (e.g. v5p-32 / v4-32), all hosts.

  bash launch/tpu_pod.sh   # runs semsafe_jax.main with this config on every worker
"""

from semsafe_jax.configs import load_sibling


def get_config():
  c = load_sibling(__file__, "default.py")
  c.multihost = True  # jax.distributed.initialize() on every host
  c.model.name_or_path = "meta-llama/Llama-3.1-8B-Instruct"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"  # frozen weights; adapters stay float32
  c.model.remat = "full"
  # Global batch (split over all chips): keep it divisible by data * fsdp.
  c.data.harmful_per_step = 64
  c.data.benign_per_step = 64
  c.data.pairs_per_step = 128
  c.train.steps = 1000
  c.train.lr = 2e-4
  c.train.warmup_steps = 50
  c.train.log_every = 10
  # 16 GB of bf16 weights: shard them over 4 chips (one host's) and run data
  # parallel across hosts.
  c.train.mesh.data = -1
  c.train.mesh.fsdp = 4
  c.train.sharding = "fsdp"
  c.checkpoint.every = 100
  c.generate.batch_size = 64
  return c
