"""Ablation: ours with every weight trainable (full fine-tuning with consistency)."""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, "semsafe.py", base)
  c.method.full_weights = True
  c.adapters.lora_targets = ()
  c.adapters.embed_mlp = False
  c.train.lr = 2e-5  # as full_ft
  c.export.format = "merged"
  return c
