"""Ablation: the soft-pattern refusal scorer (likelihood of refusal phrases)."""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, "semsafe.py", base)
  c.loss.scorer = "soft_pattern"
  return c
