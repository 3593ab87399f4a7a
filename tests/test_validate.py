"""Config validation: each bad value fails with one line naming field, value and what is allowed."""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from semsafe_jax import validate
from semsafe_jax.errors import ConfigError, UserError
from semsafe_jax.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name: str = "default.py"):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _set(config, field: str, value) -> None:
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  with node.ignore_type():  # e.g. a string where the config holds a bool
    node[leaf] = value


def test_committed_configs_are_valid(monkeypatch, tmp_path):
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # pod configs name hub ids
  # The retention methods start from a safety run's checkpoints: a workdir that has them.
  aligned = tmp_path / "safety_run"
  (aligned / ckpt_lib.CHECKPOINT_DIR).mkdir(parents=True)
  paths = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True))
  assert paths
  for path in paths:
    rel = os.path.relpath(path, os.path.join(ROOT, "configs"))
    config = _config(rel)
    if "retention" in config:
      config.retention.aligned_workdir = str(aligned)
    validate.validate(config)


BAD = [
    # (field, value, text the message must carry besides field and value)
    ("train.steps", -5, ">= 1"),
    ("train.steps", 0, ">= 1"),
    ("train.lr", -1.0, "> 0"),
    ("train.lr", 0.0, "> 0"),
    ("train.lr", float("nan"), "> 0"),
    ("train.warmup_steps", -1, ">= 0"),
    ("train.grad_accum", 0, ">= 1"),
    ("train.end_lr_frac", 1.5, "[0, 1]"),
    ("train.sharding", "zero3", "replicate"),
    ("train.overlap_steps", "sometimes", "auto, on, off"),
    ("adapters.lora_rank", 0, "lora_targets"),
    ("adapters.lora_targets", ("q_prj",), "q_proj"),
    ("adapters.lora_targets", ("layers/attn/(q_proj",), "regex"),
    ("adapters.lora_alpha", 0.0, "> 0"),
    ("adapters.lora_dropout", 1.0, "[0, 1)"),
    ("data.tau", 1.5, "(-1, 1)"),
    ("data.tau", -1.0, "(-1, 1)"),
    ("data.k", 0, ">= 1"),
    ("data.eval_only_sources", ("jsonl:mine.jsonl",), "source names"),
    ("data.heldout_intent_frac", 1.0, "[0, 1)"),
    ("data.heldout_phrasing_frac", -0.1, "[0, 1)"),
    ("data.eval_frac", 1.2, "[0, 1)"),
    ("data.pairable_anchor_frac", 2.0, "[0, 1]"),
    ("data.borderline_share", 1.5, "<= 1"),
    ("data.harmful_per_step", 0, ">= 1"),
    ("data.benign_per_step", -2, ">= 0"),
    ("data.index", "annoy", "hnsw"),
    ("data.on_bad_rows", "skip", "warn"),
    ("data.sources", ("advbench",), "expected advbench:PATH"),
    ("data.sources", ("nosuchkind:x.csv",), "kind must be one of"),
    ("data.sources", ("csv:/nonexistent/prompts.csv",), "no such file"),
    ("data.refusals", "/nonexistent/refusals.txt", "builtin"),
    ("model.name_or_path", "smolm9", "alias"),
    ("model.name_or_path", "tiny-random:gpt2", "family"),
    ("model.name_or_path", "./no/such/model", "alias"),
    ("model.dtype", "float8", "bfloat16"),
    ("model.remat", "some", "dots"),
    ("model.layer_loop", "while", "unroll"),
    ("loss.scorer", "foo", "first_token"),
    ("loss.consistency_repr", "logits", "refusal_prob"),
    ("loss.lam", -1.0, ">= 0"),
    ("loss.divergence", "kl", "js"),
    ("probe.use", "always", "flag_unlabeled"),
    ("probe.threshold", 1.5, "[0, 1]"),
    ("probe.layer", "last", "integer"),
    ("checkpoint.every", 0, ">= 1"),
    ("checkpoint.keep", 0, ">= 1"),
    ("generate.top_p", 0.0, "(0, 1]"),
    ("generate.temperature", -0.5, ">= 0"),
    ("generate.batch_size", 0, ">= 1"),
    ("export.format", "gguf", "peft"),
    ("export.dtype", "int8", "float32"),
    ("export.save_base", "maybe", "auto"),
    ("export.step", -2, ">= -1"),
    ("eval.batch_size", 0, ">= 1"),
    ("mode", "bogus", "train"),
    ("method.name", "nosuch", "semsafe"),
]


@pytest.mark.parametrize("field,value,allowed", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_value_is_one_line_naming_field_value_and_allowed(field, value, allowed):
  config = _config()
  if field.split(".")[0] not in config:
    pytest.skip(f"this config has no {field.split('.')[0]} section")
  _set(config, field, value)
  with pytest.raises(ConfigError) as info:
    validate.validate(config)
  message = str(info.value)
  assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
  assert "\n" not in message
  assert info.value.field == field or field.startswith(info.value.field), message
  assert message.startswith(f"config.{info.value.field}="), message
  assert allowed in message, message


@pytest.mark.parametrize("value", ["off", "full", "dots"])
def test_every_remat_policy_can_be_chosen_on_the_command_line(value):
  """The documented choices parse as --config.model.remat=... (a bool default would not)."""
  from semsafe_jax.experiments import grid  # pylint: disable=g-import-not-at-top
  config = grid.parse_config(os.path.join(ROOT, "configs", "default.py"),
                             [f"--config.model.remat={value}"])
  assert config.model.remat == value
  validate.validate(config)


def test_lora_rank_zero_is_fine_without_targets():
  config = _config()
  config.adapters.lora_targets = ("",)  # what --config.adapters.lora_targets='' gives
  config.adapters.lora_rank = 0
  validate.validate(config)


def test_lora_target_regex_and_comma_list_are_accepted():
  config = _config()
  config.adapters.lora_targets = ("q_proj,v_proj", "layers/mlp/.*_proj/kernel")
  validate.validate(config)


def test_model_paths(tmp_path):
  config = _config()
  (tmp_path / "m.gguf").write_bytes(b"")
  config.model.name_or_path = str(tmp_path / "m.gguf")
  validate.validate(config)
  (tmp_path / "hf").mkdir()
  config.model.name_or_path = str(tmp_path / "hf")
  with pytest.raises(ConfigError, match="neither config.json"):
    validate.validate(config)
  (tmp_path / "hf" / "config.json").write_text("{}")
  validate.validate(config)
  (tmp_path / "weights.bin").write_bytes(b"")
  config.model.name_or_path = str(tmp_path / "weights.bin")
  with pytest.raises(ConfigError, match=".gguf"):
    validate.validate(config)


def test_hub_id_offline_needs_the_cache(monkeypatch, tmp_path):
  config = _config()
  config.model.name_or_path = "no-such-org/no-such-model"
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
  with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
    validate.validate(config)
  monkeypatch.delenv("HF_HUB_OFFLINE")
  validate.validate(config)  # online: the loader downloads it


def test_generate_mode_needs_prompts(tmp_path):
  config = _config()
  config.mode = "generate"
  with pytest.raises(ConfigError, match="nothing to generate"):
    validate.validate(config)
  config.generate.prompts_file = str(tmp_path / "missing.txt")
  with pytest.raises(ConfigError, match="no such file"):
    validate.validate(config)
  (tmp_path / "p.txt").write_text("hello\n")
  config.generate.prompts_file = str(tmp_path / "p.txt")
  validate.validate(config)


def test_mine_mode_does_not_check_the_model():
  config = _config()
  config.mode = "mine"
  config.model.name_or_path = "smolm9"
  validate.validate(config)


def test_more_checks_can_be_registered():
  def no_odd_seeds(config):
    if config.seed % 2:
      validate.fail("seed", config.seed, "expected an even seed")

  validate.register(no_odd_seeds)
  try:
    config = _config()
    config.seed = 3
    with pytest.raises(ConfigError, match=r"config.seed=3: expected an even seed"):
      validate.validate(config)
  finally:
    validate.CHECKS.remove(no_odd_seeds)


def test_mine_mode_validation_imports_no_model_code():
  code = ("import sys, importlib.util;"
          "spec = importlib.util.spec_from_file_location('c', 'configs/default.py');"
          "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m);"
          "c = m.get_config(); c.mode = 'mine';"
          "from semsafe_jax import main, validate; validate.validate(c);"
          "main.outside_workdir_note(loads_model=False); main.user_errors();"
          "heavy = ('semsafe_jax.models', 'semsafe_jax.train', 'semsafe_jax.adapters',"
          " 'semsafe_jax.losses', 'semsafe_jax.methods', 'jax');"
          "bad = sorted(x for x in sys.modules if x == 'jax' or x.startswith(heavy));"
          "print(bad); sys.exit(bool(bad))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr[-2000:]
