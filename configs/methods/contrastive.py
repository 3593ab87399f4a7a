"""contrastive: LoRA SFT plus InfoNCE on pooled hidden states.

The mined neighbour pairs of the harmful block (cosine > data.tau) are positives, every
other prompt of the step (harmful and benign) a negative; the representation is the final
hidden state averaged over the prompt tokens, unit-normalised. Otherwise lora_sft: same
LoRA, no embedding MLP. temperature and w_contrastive are common choices, not tuned.
"""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, f"../{base or 'default'}.py")
  c.method.name = "contrastive"
  c.adapters.embed_mlp = False
  c.method.temperature = 0.1
  c.method.w_contrastive = 0.5  # loss = lora_sft's token mean + w_contrastive * InfoNCE
  return c
