"""The bfloat16 path: what it keeps in float32, how far its logits are from float32, and
that it trains like float32.

bfloat16 keeps 8 significant bits: one rounding changes a value by at most u = 2^-8
(relative). The bounds below are stated in that unit or against measured figures:

  - RMSNorm computes its statistics in float32 and rounds twice (the normalised value,
    then its product with the scale): within 2u (+u^2) of the exact result; Gemma's form
    (scale applied in float32) rounds once: within u. With the statistics in bfloat16 the
    error measured 2.6u, so the bound tells the two apart.
  - Every exp (the attention softmax), max-reduction (its stabiliser) and rsqrt (the norms)
    of the bfloat16 forward runs on float32 values, and the logits come out float32.
  - Logits, bf16 weights and compute vs float32 compute on the same (bf16-rounded) weights:
      tiny-random (2 layers):   relative RMS error <= 4u (measured 1.1u), KL <= 1e-5 nats.
      SmolLM2-135M (30 layers, 6 chat prompts): relative RMS <= 0.035 (measured 0.022),
        mean KL(f32 || bf16) <= 4e-3 nats (measured 1.9e-3), max KL <= 0.02 (9e-3), the
        same top token at >= 98% of positions (99.6%). Norm statistics in bf16 measured a
        max KL of 0.031, a softmax in bf16 97.0% top-token agreement: both fail these bounds.
  - A bf16 training run of configs/tiny.py (20 steps, the same batches) has every step's
    loss within 0.1% of the float32 run's (measured <= 0.01%), and its loss falls by the
    float32 run's drop (about 4% of the loss) within 5% of that drop (measured 0.1%); the
    adapters and the optimizer state it saves are float32.
"""

from __future__ import annotations

import os
import pathlib
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from semsafe_jax import adapters as adapters_lib
from semsafe_jax.models import forward, load_pretrained, transformer
from semsafe_jax.train import checkpoint as ckpt_lib
from semsafe_jax.train import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
U = 2.0**-8  # bfloat16 unit roundoff
TRAIN_STEPS = 20

PROMPTS = ["How do I bake sourdough bread?", "What is 17 times 23?",
           "Write a haiku about the sea.", "Explain photosynthesis to a child.",
           "Translate 'good morning' into French.", "How can I kill a Python process that hangs?"]


# --- What bf16 keeps in float32. ---------------------------------------------------------


@pytest.mark.parametrize("offset, rounds", [(0.0, 2), (1.0, 1)], ids=["llama", "gemma"])
@pytest.mark.parametrize("scale_x", [1e-3, 1.0, 1e4])
def test_rms_norm_in_bf16_is_within_its_roundings_of_exact(offset, rounds, scale_x):
  rng = np.random.default_rng(0)
  x = scale_x * rng.standard_normal((64, 576))
  x[:, :4] *= 50  # outlier channels, as residual streams have
  x_bf = jnp.asarray(x, jnp.bfloat16)
  s_bf = jnp.asarray(1 + 0.3 * rng.standard_normal(576), jnp.bfloat16)
  out = transformer.rms_norm(x_bf, s_bf, 1e-5, offset)
  assert out.dtype == jnp.bfloat16
  x64, s64 = np.asarray(x_bf, np.float64), np.asarray(s_bf, np.float64)
  exact = (offset + s64) * x64 / np.sqrt(np.mean(x64 * x64, -1, keepdims=True) + 1e-5)
  rel = np.abs(np.asarray(out, np.float64) - exact) / np.abs(exact)
  assert rel.max() <= (1 + U) ** rounds - 1, (rel.max(), rounds)


def _walk(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it (jit, scan, remat, vjp)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else (v,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _walk(inner)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("decode", [False, True], ids=["forward", "decode"])
def test_softmax_and_norm_statistics_run_in_float32(family, decode):
  pre = load_pretrained(f"tiny-random:{family}", dtype="bfloat16", param_dtype="bfloat16",
                        tokenizer=False)
  cfg = pre.cfg
  ids = jnp.zeros((2, 8), jnp.int32)
  kw = {}
  if decode:  # one cached token step, as generation runs it
    kw = dict(cache=transformer.init_cache(cfg, 2, 16), cache_index=8,
              attention_mask_BxS=jnp.ones((2, 16), bool))
    ids = ids[:, :1]
  fn = lambda p: forward(p, cfg, ids, **kw).logits
  jaxpr = jax.make_jaxpr(fn)(pre.params).jaxpr
  seen: dict[str, set[str]] = {}
  for eqn in _walk(jaxpr):
    name = eqn.primitive.name
    if name in ("exp", "rsqrt", "reduce_max"):
      seen.setdefault(name, set()).update(str(v.aval.dtype) for v in eqn.invars)
  assert set(seen) == {"exp", "rsqrt", "reduce_max"}, seen
  assert all(d == {"float32"} for d in seen.values()), seen
  assert jax.eval_shape(fn, pre.params).dtype == jnp.float32
  # ... while the matmuls run in bf16 (the point of the path).
  dots = {str(e.invars[0].aval.dtype) for e in _walk(jaxpr) if e.primitive.name == "dot_general"}
  assert "bfloat16" in dots, dots


# --- Logits: bf16 against float32. -------------------------------------------------------


def _chat_batch(tok) -> tuple[np.ndarray, np.ndarray]:
  rows = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"] for p in PROMPTS]
  T = max(map(len, rows))
  ids, mask = np.zeros((len(rows), T), np.int32), np.zeros((len(rows), T), bool)
  for i, r in enumerate(rows):  # left padding, as generation pads
    ids[i, T - len(r):], mask[i, T - len(r):] = r, True
  return ids, mask


def _logit_errors(name: str) -> dict[str, float]:
  """bf16 weights + compute vs float32 compute on the same bf16-rounded weights (so the
  figures measure the compute path; rounding the weights is the loader's, tested apart)."""
  bf = load_pretrained(name, dtype="bfloat16", param_dtype="bfloat16")
  assert bf.params["embed"]["embedding"].dtype == jnp.bfloat16
  ids, mask = _chat_batch(bf.tokenizer)
  f32_params = jax.tree.map(lambda x: x.astype(jnp.float32), bf.params)
  f32_cfg = bf.cfg.replace(dtype="float32", param_dtype="float32")
  run = lambda p, c: np.asarray(jax.jit(
      lambda p: forward(p, c, ids, attention_mask_BxS=mask).logits)(p))
  got, ref = run(bf.params, bf.cfg)[mask], run(f32_params, f32_cfg)[mask]
  assert got.dtype == np.float32 and np.isfinite(got).all()
  logp, logq = jax.nn.log_softmax(ref, -1), jax.nn.log_softmax(got, -1)
  kl = np.asarray(jnp.sum(jnp.exp(logp) * (logp - logq), -1))
  out = {"rel_rms": float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2))),
         "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
         "top1": float(np.mean(got.argmax(-1) == ref.argmax(-1)))}
  print(name, {k: f"{v:.3g}" for k, v in out.items()})
  return out


def test_tiny_bf16_logits_match_float32():
  e = _logit_errors("tiny-random")
  assert e["rel_rms"] <= 4 * U and e["kl_max"] <= 1e-5, e


def test_smollm2_bf16_logits_match_float32():
  e = _logit_errors("smollm2-135m-instruct")
  assert e["rel_rms"] <= 0.035, e
  assert e["kl_mean"] <= 4e-3 and e["kl_max"] <= 0.02, e
  # XLA:CPU compiles bf16 dots for the host CPU: top-token agreement measured 99.6% on one
  # 2-core machine and 97.0% on another (AMD EPYC with AVX512-BF16); the KL bounds hold on both.
  assert e["top1"] >= 0.96, e


# --- Training in bf16. -------------------------------------------------------------------


def test_train_step_keeps_adapters_and_optimizer_state_float32():
  pre = load_pretrained("tiny-random", dtype="bfloat16", param_dtype="bfloat16",
                        tokenizer=False, remat=True)
  acfg = dict(lora_rank=4, lora_alpha=8.0, lora_targets=("q_proj", "v_proj", "down_proj"),
              embed_mlp=True, embed_mlp_hidden=16)
  trainable = adapters_lib.init_adapters(acfg, pre.cfg, pre.params, jax.random.key(0))
  ids = np.random.default_rng(0).integers(0, pre.cfg.vocab_size, (2, 12)).astype(np.int32)

  def loss_fn(t, frozen, batch, rng):
    del rng
    out = adapters_lib.adapted_forward(frozen, t, pre.cfg, acfg, batch, merge=False)
    assert out.logits.dtype == jnp.float32 and out.hidden.dtype == jnp.bfloat16
    logp = jax.nn.log_softmax(out.logits[:, :-1], -1)
    loss = -jnp.take_along_axis(logp, batch[:, 1:, None], -1).mean()
    return loss, {}

  tc = ml_collections.ConfigDict(dict(steps=3, lr=1e-2, warmup_steps=0, weight_decay=0.0,
                                      clip_norm=1.0))
  optimizer, schedule = step_lib.make_optimizer(tc)
  state = step_lib.init_state(trainable, optimizer, seed=0)
  step = step_lib.TrainStep(loss_fn, optimizer, schedule)
  losses = []
  for _ in range(3):
    state, m = step(state, pre.params, jnp.asarray(ids))
    losses.append(float(m["loss"]))
  floats = [x for x in jax.tree.leaves((state.trainable, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(pre.params))  # frozen: as loaded


def _scalars(workdir: pathlib.Path, tag: str) -> dict[int, float]:
  """step -> value of one TensorBoard scalar (the TFRecord event files tensorboardX writes)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = {}
  for f in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
    data = f.read_bytes()
    i = 0
    while i + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4  # length, its crc, the record, its crc
      for v in event.summary.value:
        if v.tag == tag:
          out[event.step] = v.simple_value
  return out


def _tiny_run(workdir: pathlib.Path, dtype: str) -> dict[int, float]:
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  cmd = [sys.executable, "-m", "semsafe_jax.main", "--config=configs/tiny.py",
         f"--workdir={workdir}", f"--config.train.steps={TRAIN_STEPS}",
         "--config.train.log_every=1",
         f"--config.model.dtype={dtype}", f"--config.model.param_dtype={dtype}"]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
                       check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  return _scalars(workdir, "train/loss")


def test_bf16_tiny_training_reaches_the_float32_loss(tmp_path):
  f32 = _tiny_run(tmp_path / "f32", "float32")
  bf16 = _tiny_run(tmp_path / "bf16", "bfloat16")
  n = TRAIN_STEPS
  assert sorted(f32) == sorted(bf16) == list(range(1, n + 1))
  drop_f32, drop_bf16 = f32[1] - f32[n], bf16[1] - bf16[n]
  worst = max(abs(bf16[s] - f32[s]) / f32[s] for s in f32)
  print(f"loss float32 {f32[1]:.4f} -> {f32[n]:.4f}, bfloat16 {bf16[1]:.4f} -> {bf16[n]:.4f}; "
        f"largest step difference {worst:.2e} of the loss")
  assert drop_f32 > 0.02 * f32[1]  # the run trains, so the comparison means something
  assert worst <= 1e-3
  assert abs(drop_bf16 - drop_f32) <= 0.05 * drop_f32
  loaded = ckpt_lib.load_latest_adapters(tmp_path / "bf16")
  assert loaded is not None
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(loaded[0]))
  # The optimizer state as saved: read the checkpoint's metadata, no restore needed.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step_dir = tmp_path / "bf16" / ckpt_lib.CHECKPOINT_DIR / str(n) / "train_state"
  meta = ocp.StandardCheckpointer().metadata(step_dir)
  meta = getattr(meta, "item_metadata", meta)
  tree = getattr(meta, "tree", meta)
  leaves = [m for m in jax.tree.leaves(tree, is_leaf=lambda m: hasattr(m, "dtype"))
            if hasattr(m, "dtype") and np.issubdtype(np.dtype(m.dtype), np.floating)]
  assert leaves and all(np.dtype(m.dtype) == np.float32 for m in leaves), leaves
