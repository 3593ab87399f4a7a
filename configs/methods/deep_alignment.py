"""deep_alignment: LoRA SFT with safety-recovery examples (Qi et al., 2024).

Half of the harmful rows (prefix_prob) start the answer with the first k tokens of the
base model's own harmful answer, k uniform in [1, max_prefix_tokens], then the refusal;
the loss reads the refusal only. Otherwise lora_sft: same LoRA, no embedding MLP.
"""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, f"../{base or 'default'}.py")
  c.method.name = "deep_alignment"
  c.adapters.embed_mlp = False
  c.method.prefix_prob = 0.5  # the paper's share of augmented harmful examples
  # K: the paper's 100; answers are at most data.max_response_tokens long anyway.
  c.method.max_prefix_tokens = 100
  return c
