"""Ablation: the safety-probe scorer."""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, "semsafe.py", base)
  c.loss.scorer = "probe"
  return c
