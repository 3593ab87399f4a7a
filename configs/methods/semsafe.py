"""semsafe (ours): LoRA + embedding MLP, L_safety + lambda·L_consistency + L_capability.

The default config as it is; the other files in this folder change only what their method
changes, so every method runs on the same data, model, steps and batch. Every file takes
the base config as an argument: `--config=configs/methods/lora_sft.py:tiny` runs the
method on configs/tiny.py (the default is configs/default.py).
"""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, f"../{base or 'default'}.py")
  c.method.name = "semsafe"
  return c
