"""Ablation: consistency on first-token distributions (Jensen-Shannon)."""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, "semsafe.py", base)
  c.loss.consistency_repr = "next_token"
  return c
