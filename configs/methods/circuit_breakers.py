"""circuit_breakers: representation rerouting (Zou et al., 2024) with LoRA where ours sits.

Harmful prompts + the base model's harmful answers are rerouted (ReLU of the cosine to
the frozen model's hidden states at the target layers); benign/borderline prompts + the
base answers are retained (L2 to the frozen states at every layer). The coefficients
follow the reference schedule: alpha (1 - t/2T) and alpha t/2T.
"""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, f"../{base or 'default'}.py")
  c.method.name = "circuit_breakers"
  c.adapters.embed_mlp = False
  c.method.alpha = 10.0  # the reference's lorra_alpha for Llama-3-8B (5 for Mistral-7B)
  # Hidden-state indices (transformers convention, negatives from the end); empty: use
  # target_depths, the reference's layers 10 and 20 of 32 as fractions of the depth.
  c.method.target_layers = ()
  c.method.target_depths = (10 / 32, 20 / 32)
  c.method.reroute_tokens = "all"  # all: prompt + answer (the reference) | response
  return c
