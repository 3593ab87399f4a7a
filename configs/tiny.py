"""The main job end to end on a tiny random model: the path tests exercise, in under a minute.

Every stage of default.py runs (data + mining, probe, base answers, training with
checkpoints, before/after evaluation, report), on a 10% slice of the built-in data
(whole intents, chosen by hash: see semsafe_jax/data/loaders.py) and with little work
per stage. Most of what is left is fixed cost: imports, SBERT, XLA compiles.
"""

from semsafe_jax.configs import load_sibling


def get_config():
  c = load_sibling(__file__, "default.py")
  c.model.name_or_path = "tiny-random"
  # ~170 prompts (harmful, benign and borderline; 23 harmful intents) instead of 1606:
  # SBERT encoding was most of the run.
  c.data.sources = ("builtin?frac=0.1",)
  c.data.unlabeled_sources = ("builtin:unlabeled?frac=0.1",)
  c.data.harmful_per_step = 4
  c.data.benign_per_step = 2
  c.data.pairs_per_step = 4
  c.train.steps = 6
  c.train.warmup_steps = 1
  c.train.log_every = 2
  c.checkpoint.every = 3
  c.adapters.lora_rank = 4
  c.adapters.embed_mlp_hidden = 16
  c.probe.max_prompts = 16
  c.probe.steps = 50
  c.eval.max_new_tokens = 4
  c.eval.max_per_split = 4
  # Same length and batch rows as the before-evaluation: base answers reuse its compile.
  c.eval.base_answer_tokens = 4
  c.eval.batch_size = 16
  # Every evaluation runs, on a handful of prompts each.
  c.evals.attacks.max_prompts = 2
  c.evals.attacks.attacks = ("roleplay", "past_tense")
  c.evals.prefill.max_prompts = 2
  c.evals.prefill.k = (2,)
  c.evals.capability.max_prompts = 4
  c.evals.capability.answer_tokens = 4
  c.evals.capability.agree_tokens = 4
  c.evals.capability.prompt_set_tokens = 4
  c.evals.consistency.max_groups = 2
  c.judge.classifier_prompts = 16
  c.data.unlabeled_per_step = 4
  c.data.contrast_per_step = 4
  # XLA at -O0 (jax_disable_most_optimizations, applied by semsafe_jax.main): compiles
  # dominate a tiny run, and the code they would speed up runs for a second or two.
  c.fast_compile = True
  return c
