"""paraphrase_aug: LoRA SFT on the training prompts plus generated variants of them.

Each source prompt gets `rule_rewrites` style rewrites and `paraphrases_per_prompt` greedy
paraphrases by the model itself (`paraphraser`: "" = the embedded model, or any model
path/alias); kept at SBERT cosine >= paraphrase_min_cos to the source, deduplicated, never
within tau of an evaluation prompt. A variant trains with its source's target; aug_share of
each block's rows are replaced by variants. Otherwise lora_sft: same LoRA, no embedding MLP.
"""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, f"../{base or 'default'}.py")
  c.method.name = "paraphrase_aug"
  c.adapters.embed_mlp = False
  c.method.rule_rewrites = 2
  c.method.paraphrases_per_prompt = 1
  # Variants of benign/borderline prompts too, with the source's base answer: the same extra
  # prompts ours gets as unlabelled partners, here with pseudo-labels.
  c.method.augment_safe = True
  c.method.aug_share = 0.5  # of each block's rows, replaced by a variant of their prompt
  return c
