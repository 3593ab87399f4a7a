"""dpo: Direct Preference Optimization on LoRA, the frozen base model as the reference.

Harmful prompts prefer their refusal target over the base model's own answer; benign and
borderline prompts prefer the base model's answer over a refusal. Same LoRA placement as
ours (all seven projections, r=8), no embedding MLP, the default optimizer and steps.
"""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, f"../{base or 'default'}.py")
  c.method.name = "dpo"
  c.method.beta = 0.1  # inverse temperature of the implicit reward (the paper's common value)
  c.adapters.embed_mlp = False
  return c
