"""Ablation: the refusal-classifier scorer."""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, "semsafe.py", base)
  c.loss.scorer = "classifier"
  c.data.unlabeled_per_step = 0  # the classifier reads a response; unlabelled prompts have none
  return c
