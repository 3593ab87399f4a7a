"""lora_sft with the common literal LoRA recipe: q_proj and v_proj at r=16, alpha 32."""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, "lora_sft.py", base)
  c.adapters.lora_targets = ("q_proj", "v_proj")
  c.adapters.lora_rank = 16
  c.adapters.lora_alpha = 32.0
  return c
