"""Ablation: ours without LoRA (the embedding MLP only)."""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, "semsafe.py", base)
  c.adapters.lora_targets = ()
  return c
