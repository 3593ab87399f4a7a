"""lora_sft, the primary baseline: LoRA + cross-entropy on refusals and base answers.

Same LoRA placement as ours (all seven projections, r=8); no consistency, no KL, no
embedding MLP. `lora_sft_qv.py` is the common literal recipe (q,v at r=16).
"""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, f"../{base or 'default'}.py")
  c.method.name = "lora_sft"
  c.adapters.embed_mlp = False
  return c
