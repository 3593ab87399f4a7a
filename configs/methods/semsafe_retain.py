"""semsafe_retain: task fine-tuning of the aligned model with our objective as the regulariser
(config.loss as for ours; L_capability keeps the aligned model's benign answers).

Settings: config.retention.semsafe_retain (configs/retention.py).
"""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, "../retention.py", base)
  c.method.name = "semsafe_retain"
  return c
