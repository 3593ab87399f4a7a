"""full_ft: the lora_sft loss with every weight trainable; exports the merged model only.

Adam state for every weight: 3x the model's float32 size on top of it (1.6 GB for the
135M default). A lower learning rate than LoRA's, as full fine-tuning usually needs.
"""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, "lora_sft.py", base)
  c.method.name = "full_ft"
  c.adapters.lora_targets = ()  # no LoRA on top of the trained weights
  c.train.lr = 2e-5
  c.export.format = "merged"
  return c
