"""A toy LoRA problem for the trainer tests (+ a CLI for their subprocesses).

Tiny random Llama, LoRA deltas on q/v, next-token CE on a learnable
synthetic sequence. Data is a pure function of (seed, step). Run as a script
it trains with `fit` (the checkpoint tests kill it mid-run).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from semsafe_jax.models import transformer
from semsafe_jax.models.config import ModelConfig
from semsafe_jax.train import step as step_lib
from semsafe_jax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
RANK, SCALE = 4, 2.0


def load_default_config():
  spec = importlib.util.spec_from_file_location("default_config", ROOT / "configs" / "default.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def toy_config(steps: int = 6, **train):
  """Default config with a short, quiet run."""
  c = load_default_config()
  c.train.steps = steps
  c.train.lr = 1e-2
  c.train.warmup_steps = 2
  c.train.log_every = 2
  c.train.progress = False
  c.checkpoint.every = 2
  c.checkpoint.keep = 2
  for k, v in train.items():
    c.train[k] = v
  return c


def init_trainable(seed: int = 0) -> dict:
  k = jax.random.split(jax.random.key(seed), 2)
  L, D = CFG.num_layers, CFG.hidden_size
  out = {}
  for i, (name, width) in enumerate([("q_proj", CFG.num_heads * CFG.head_dim),
                                     ("v_proj", CFG.num_kv_heads * CFG.head_dim)]):
    out[name] = {"a": 0.1 * jax.random.normal(k[i], (L, D, RANK)),
                 "b": jnp.zeros((L, RANK, width))}
  return out


def frozen_params(seed: int = 1) -> dict:
  return transformer.init_params(CFG, jax.random.key(seed), std=0.1)


def loss_fn(trainable, frozen, batch, rng):
  """Per-example CE mean, weighted by batch["weight"] (NaN there -> NaN loss)."""
  del rng
  attn = dict(frozen["layers"]["attn"])
  for name, p in trainable.items():
    delta = SCALE * jnp.einsum("lir,lro->lio", p["a"], p["b"])
    attn[name] = {**attn[name], "kernel": attn[name]["kernel"] + delta}
  params = {**frozen, "layers": {**frozen["layers"], "attn": attn}}
  ids = batch["ids"]
  logits = transformer.forward(params, CFG, ids[:, :-1]).logits
  logp = jax.nn.log_softmax(logits)
  nll_BxT = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  per_ex = nll_BxT.mean(axis=1) * batch["weight"]
  loss = per_ex.mean()
  return loss, {"l_ce": loss, "l_max": per_ex.max()}


class BatchFn:
  """Step -> batch, a pure function of (seed, step): x[t+1] = (3 x[t] + 1) mod V."""

  def __init__(self, seed: int = 0, batch: int = 8, length: int = 12,
               nan_steps: tuple[int, ...] = (), sleep: float = 0.0):
    self.seed, self.batch, self.length = seed, batch, length
    self.nan_steps, self.sleep = set(nan_steps), sleep

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    if self.sleep:
      time.sleep(self.sleep)
    rng = np.random.default_rng((self.seed, step))
    x = rng.integers(0, CFG.vocab_size, (self.batch, 1))
    cols = [x]
    for _ in range(self.length - 1):
      cols.append((3 * cols[-1] + 1) % CFG.vocab_size)
    weight = np.ones((self.batch,), np.float32)
    if step in self.nan_steps:
      weight[0] = np.nan
    return {"ids": np.concatenate(cols, axis=1).astype(np.int32), "weight": weight}


# XLA:CPU spends seconds compiling even this model; runs with the same HLO (in
# this process and in the subprocesses) share compiled steps through a
# persistent cache that is switched on only around these runs.
_CACHE_DIR = os.environ.get("SEMSAFE_TEST_XLA_CACHE", "")
if not _CACHE_DIR:  # the pytest process owns the cache; its subprocesses inherit it
  _CACHE_DIR = tempfile.mkdtemp(prefix="semsafe_train_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)


@contextlib.contextmanager
def compile_cache():
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = [getattr(jax.config, n) for n in names]
  jax.config.update(names[0], _CACHE_DIR)
  jax.config.update(names[1], 0.0)
  try:
    yield
  finally:
    for n, v in zip(names, old):
      jax.config.update(n, v)


def run(workdir: str, config, batch_fn=None, **kw):
  with compile_cache():
    return trainer.fit(loss_fn, init_trainable(), batch_fn or BatchFn(), config, workdir,
                       frozen=frozen_params(), **kw)


def flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


@contextlib.contextmanager
def record_train_steps():
  """Collects every TrainStep that fit builds (to count its traces)."""
  made = []
  orig = step_lib.TrainStep

  class Recording(orig):
    def __init__(self, *a, **kw):
      super().__init__(*a, **kw)
      made.append(self)

  step_lib.TrainStep = Recording
  try:
    yield made
  finally:
    step_lib.TrainStep = orig


STRAIGHT_STEPS = 6


@functools.lru_cache(maxsize=None)
def straight_run():
  """The reference: an uninterrupted STRAIGHT_STEPS-step run on this process's
  devices (one CPU device under pytest). Shared by several test files."""
  workdir = tempfile.mkdtemp(prefix="semsafe_straight_") + "/w"
  with record_train_steps() as made:
    params, history = run(workdir, toy_config(STRAIGHT_STEPS))
  return {"workdir": workdir, "params": flat(params), "history": history,
          "traces": [m.trace_count for m in made],
          "cache_sizes": [m._jitted._cache_size() for m in made]}


def subprocess_env(devices: int = 1) -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT)] +
                                      ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["HF_HUB_OFFLINE"] = "1"
  env["SEMSAFE_TEST_XLA_CACHE"] = _CACHE_DIR
  return env


def start_cli(args: list[str], devices: int = 1) -> subprocess.Popen:
  """Runs this file's main() in a fresh Python process."""
  return subprocess.Popen([sys.executable, str(pathlib.Path(__file__)), *args],
                          env=subprocess_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def test_toy_run_trains_and_compiles_once():
  ref = straight_run()
  history = ref["history"]
  assert [h["step"] for h in history] == list(range(1, STRAIGHT_STEPS + 1))
  assert history[-1]["loss"] < history[0]["loss"]
  assert all(h["skipped"] == 0 for h in history)
  assert ref["traces"] == [1] and ref["cache_sizes"] == [1]


def main():
  """Trains the toy problem (the checkpoint tests interrupt this process)."""
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--steps", type=int, default=STRAIGHT_STEPS)
  ap.add_argument("--every", type=int, default=2)
  ap.add_argument("--sleep", type=float, default=0.0)  # seconds per batch: a slow run
  args = ap.parse_args()
  c = toy_config(args.steps)
  c.checkpoint.every = args.every
  run(args.workdir, c, BatchFn(sleep=args.sleep))


if __name__ == "__main__":
  main()
