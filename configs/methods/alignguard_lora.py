"""alignguard_lora: AlignGuard-LoRA (Das et al., 2025) task fine-tuning of the aligned model.

Settings: config.retention.alignguard (configs/retention.py).
"""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, "../retention.py", base)
  c.method.name = "alignguard_lora"
  return c
