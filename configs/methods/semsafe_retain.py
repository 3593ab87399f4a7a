"""semsafe_retain: task fine-tuning of the aligned model with our safety and consistency
terms as the regulariser (config.loss as for ours, without L_capability).

Settings: config.retention.semsafe_retain (configs/retention.py).
"""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, "../retention.py", base)
  c.method.name = "semsafe_retain"
  c.loss.w_capability = 0.0  # the task loss is the benign signal
  return c
