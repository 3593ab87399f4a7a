"""The main job end to end on a tiny random model: the path tests exercise, in under a minute."""

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
  c.data.harmful_per_step = 4
  c.data.benign_per_step = 2
  c.data.pairs_per_step = 4
  c.train.steps = 6
  c.train.warmup_steps = 1
  c.train.log_every = 2
  c.checkpoint.every = 3
  c.adapters.lora_rank = 4
  c.adapters.embed_mlp_hidden = 16
  c.eval.max_new_tokens = 4
  c.eval.max_per_split = 4
  return c
