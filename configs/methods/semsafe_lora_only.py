"""Ablation: ours without the embedding MLP (LoRA only)."""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, "semsafe.py", base)
  c.adapters.embed_mlp = False
  return c
