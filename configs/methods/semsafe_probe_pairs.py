"""Ablation: consistency pairs weighted by the safety probe's unsafe probability."""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, "semsafe.py", base)
  c.probe.use = "weight_pairs"
  return c
