"""Ablation: ours without the consistency term (lambda = 0)."""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, "semsafe.py", base)
  c.loss.lam = 0.0
  return c
