"""Ablation: consistency on pooled final hidden states instead of refusal scores."""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, "semsafe.py", base)
  c.loss.consistency_repr = "hidden"
  return c
