"""safedpo: SafeDPO (Kim et al., 2025) on LoRA: DPO on safety-reordered pairs plus a margin.

Helpfulness pairs (the base model's answer over a refusal) are reordered by safety labels
(a compliant answer to a harmful prompt is unsafe) and safe-vs-unsafe pairs get the margin
delta. Same LoRA placement as ours, no embedding MLP, the default optimizer and steps.
"""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, f"../{base or 'default'}.py")
  c.method.name = "safedpo"
  c.method.beta = 0.1
  # Delta >= 0, in units of beta * d (d: the log-ratio difference); 0 is plain DPO on the
  # reordered pairs.
  c.method.delta = 2.0
  c.adapters.embed_mlp = False
  return c
