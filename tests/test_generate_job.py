"""The generate mode end to end: CLI subprocesses, prompt files, a workdir's trained adapters."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from semsafe_jax.jobs import generate as job
from semsafe_jax.models import generate as gen_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(workdir, *flags, timeout=600):
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "semsafe_jax.main", "--config=configs/default.py",
         f"--workdir={workdir}", "--config.mode=generate", *flags]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def default_config():
  spec = importlib.util.spec_from_file_location("default_config", os.path.join(ROOT, "configs",
                                                                              "default.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_cli_tiny_random(tmp_path):
  prompts = ["How do I boil an egg?", "Name a colour.", "Write one word."]
  f = tmp_path / "prompts.txt"
  f.write_text("\n".join(prompts) + "\n\n")
  w = tmp_path / "w"
  proc = run_cli(w, f"--config.generate.prompts_file={f}", "--config.generate.max_new_tokens=8",
                 "--config.model.name_or_path=tiny-random")
  rows = read_jsonl(w / "generations.jsonl")
  assert [r["prompt"] for r in rows] == prompts
  for r in rows:
    assert isinstance(r["completion"], str) and 0 <= r["num_tokens"] <= 8
    assert r["adapters"] is False and r["model"] == "tiny-random"
    assert f"### prompt {r['index']}: {r['prompt']}" in proc.stdout


def test_cli_default_model(tmp_path):
  f = tmp_path / "prompts.jsonl"
  f.write_text('{"prompt": "What is the capital of France?"}\n{"prompt": "Say hello."}\n')
  proc = run_cli(tmp_path / "w", f"--config.generate.prompts_file={f}",
                 "--config.generate.max_new_tokens=6")
  rows = read_jsonl(tmp_path / "w" / "generations.jsonl")
  assert [r["prompt"] for r in rows] == ["What is the capital of France?", "Say hello."]
  assert "Paris" in rows[0]["completion"], proc.stdout  # the real model, greedy, chat template
  assert all(r["completion"].strip() and r["num_tokens"] <= 6 for r in rows)


def test_prompt_files(tmp_path):
  txt = tmp_path / "p.txt"
  txt.write_text("first prompt\n\nsecond {not json}\n")
  assert job.read_prompts_file(str(txt)) == ["first prompt", "second {not json}"]
  jl = tmp_path / "p.jsonl"
  jl.write_text('{"prompt": "a", "id": 1}\n\n{"prompt": "b\\nc"}\n')
  assert job.read_prompts_file(str(jl)) == ["a", "b\nc"]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": 1}\n')
  with pytest.raises(ValueError, match="prompt"):
    job.read_prompts_file(str(bad))
  empty = tmp_path / "empty.txt"
  empty.write_text("\n \n")
  with pytest.raises(ValueError, match="empty"):
    job.read_prompts_file(str(empty))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    job.read_prompts_file(str(tmp_path / "missing.txt"))


def test_no_prompts_is_a_clear_error(tmp_path):
  config = default_config()
  with pytest.raises(ValueError, match="prompts_file"):
    job.run(config, str(tmp_path))


def test_trained_adapters_are_applied(tmp_path):
  """A checkpoint's adapters (LoRA merged + embedding MLP), saved by the trainer's own
  Checkpointer and read back by the job, change the generations as applying them by hand does."""
  import optax  # pylint: disable=g-import-not-at-top
  from semsafe_jax import adapters as adapters_lib  # pylint: disable=g-import-not-at-top
  from semsafe_jax.models.loading import load_pretrained  # pylint: disable=g-import-not-at-top
  from semsafe_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  from semsafe_jax.train.step import TrainState  # pylint: disable=g-import-not-at-top

  config = default_config()
  config.model.name_or_path = "tiny-random"
  config.generate.prompts = ["Tell me a story.", "What is two plus two?"]
  config.generate.max_new_tokens = 6
  pre = load_pretrained("tiny-random")
  adapters = adapters_lib.init_adapters(config.adapters, pre.cfg, pre.params, jax.random.key(1))
  # Trained adapters are not the identity: give both parts non-zero weights.
  adapters = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.key(2), x.shape),
                          adapters)
  workdir = str(tmp_path / "run")
  checkpoint.prepare_workdir(workdir, config)
  ckpt = checkpoint.Checkpointer(workdir, every=1, keep=2, async_save=False)
  state = TrainState(trainable=adapters, opt_state=optax.adam(1e-3).init(adapters),
                     step=np.int32(3), rng=np.zeros((2,), np.uint32), bad_total=np.int32(0),
                     bad_consecutive=np.int32(0))
  ckpt.save(3, state, {"next_step": 3}, force=True)
  ckpt.close()

  trained = job.run(config, workdir)
  assert all(r["adapters"] for r in trained)
  config.generate.adapters = False
  plain = job.run(config, workdir)
  assert not any(r["adapters"] for r in plain)
  params = adapters_lib.apply_adapters(pre.params, adapters, config.adapters)
  expected = gen_lib.generate(params, pre.cfg, pre.tokenizer, config.generate.prompts,
                              max_new_tokens=6, embed_fn=adapters_lib.adapted_embed_fn(adapters))
  base = gen_lib.generate(pre.params, pre.cfg, pre.tokenizer, config.generate.prompts,
                          max_new_tokens=6)
  assert [r["completion"] for r in trained] == expected
  assert [r["completion"] for r in plain] == base != expected
  assert read_jsonl(os.path.join(workdir, "generations.jsonl"))[1]["completion"] == base[1]


def test_missing_checkpoint_falls_back_to_base(tmp_path):
  assert job.load_trained_adapters(str(tmp_path)) is None


def test_non_utf8_prompts_file_names_the_file(tmp_path):
  from semsafe_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  f = tmp_path / "latin1.txt"
  f.write_bytes("Wie schön ist das?\n".encode("latin-1"))
  with pytest.raises(ValueError, match=r"latin1.txt.*not UTF-8.*0xf6") as info:
    job.read_prompts_file(str(f))
  assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_step(tmp_path, caplog):
  import logging  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from semsafe_jax import adapters as adapters_lib  # pylint: disable=g-import-not-at-top
  from semsafe_jax.models.config import from_hf_dict  # pylint: disable=g-import-not-at-top
  from semsafe_jax.models.registry import tiny_hf_config  # pylint: disable=g-import-not-at-top
  from semsafe_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  from semsafe_jax.train.step import TrainState  # pylint: disable=g-import-not-at-top

  config = default_config()
  workdir = str(tmp_path / "run")
  cfg = from_hf_dict(tiny_hf_config("llama", 512))
  checkpoint.prepare_workdir(workdir, config)
  ckpt = checkpoint.Checkpointer(workdir, every=1, keep=5, async_save=False)
  saved = {}
  for step in (2, 4):
    ad = adapters_lib.init_adapters(config.adapters, cfg, None, jax.random.key(step))
    saved[step] = ad
    state = TrainState(trainable=ad, opt_state=optax.adam(1e-3).init(ad), step=np.int32(step),
                       rng=np.zeros((2,), np.uint32), bad_total=np.int32(0),
                       bad_consecutive=np.int32(0))
    ckpt.save(step, state, {"next_step": step}, force=True)
  ckpt.close()
  item = os.path.join(workdir, "checkpoints", "4", "trainable")
  for folder, _, files in os.walk(item):
    if os.path.basename(folder) == "d":
      for name in files:
        os.remove(os.path.join(folder, name))
  with caplog.at_level(logging.WARNING):
    adapters, _ = job.load_trained_adapters(workdir)
  assert any("step 4 " in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
  got = jax.tree.leaves(adapters["lora"])
  want = jax.tree.leaves(saved[2]["lora"])
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, np.asarray(b))
