"""The main job end to end on a tiny random model: the path tests exercise, in under a minute.

Every stage of default.py runs (data + mining, probe, base answers, training with
checkpoints, before/after evaluation, report), on a 10% slice of the built-in data
(whole intents, chosen by hash: see semsafe_jax/data/loaders.py) and with little work
per stage. Most of what is left is fixed cost: imports, SBERT, XLA compiles.
"""

import importlib.util
import os


def _default():
  spec = importlib.util.spec_from_file_location(
      "semsafe_default_config", os.path.join(os.path.dirname(__file__), "default.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def get_config():
  c = _default()
  c.model.name_or_path = "tiny-random"
  # ~170 prompts (harmful, benign and borderline; 23 harmful intents) instead of 1606:
  # SBERT encoding was most of the run.
  c.data.sources = ("builtin?frac=0.1",)
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
  # XLA at -O0 (jax_disable_most_optimizations, applied by semsafe_jax.main): compiles
  # dominate a tiny run, and the code they would speed up runs for a second or two.
  c.fast_compile = True
  return c
