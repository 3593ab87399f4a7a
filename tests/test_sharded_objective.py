"""The real objective on 8 emulated devices equals 1 device; consistency is monitored.

The main job's loss (the semsafe method: unmerged LoRA with its own backward, the embedding
MLP, L_safety + lam * L_consistency + L_capability) trained by `fit` on batches from the
real `PairBatcher` and `inputs.encode_rows`, on the tiny random model. With 8 harmful
prompts over 8 devices every pair joins prompts held by two devices, so equal losses
and updates prove the pairs are gathered across devices rather than dropped.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging

import test_train_toy as toy
from semsafe_jax import adapters as adapters_lib
from semsafe_jax.data import neighbors
from semsafe_jax.data.batches import PairBatcher
from semsafe_jax.methods import semsafe
from semsafe_jax.methods.base import Pairs, SafetyBatch, Tokens
from semsafe_jax.models.loading import load_pretrained
from semsafe_jax.train import inputs, monitor, sharding, trainer

TAU = 0.7
N_INTENTS, N_PHRASINGS, N_BENIGN = 12, 4, 16
STEPS = 2
METRICS = ("loss", "l_total", "l_safety", "l_consistency", "l_capability", "pairs_valid",
           "grad_norm")


def objective(model_cfg, config):
  """The main job's training objective and its aux (the one place that names them)."""
  spec = semsafe.LossSpec.from_config(config.loss)
  loss_fn = functools.partial(semsafe.loss, spec=spec, model_cfg=model_cfg,
                              adapter_cfg=config.adapters)
  return loss_fn, functools.partial(semsafe.build_aux, spec, config.loss)


def method_batch(safety: SafetyBatch):
  """What the objective reads, around the shared batch (beside `objective` to update together)."""
  return semsafe.SemsafeBatch(safety=safety)


def make_config(steps: int = STEPS):
  c = toy.toy_config(steps)
  c.train.warmup_steps = 0  # the first update at the full lr: a visible change
  c.train.log_every = 1
  c.checkpoint.every = 1000
  c.adapters.lora_rank = 4
  c.adapters.embed_mlp_hidden = 16
  c.data.harmful_per_step = 8
  c.data.benign_per_step = 8
  c.data.pairs_per_step = 8
  # Pooled hidden states ([B, D], gathered across devices): on a random model the
  # refusal probabilities are all ~0 and their pair distances with them.
  c.loss.consistency_repr = "hidden"
  c.loss.lam = 5.0
  c.loss.max_target_tokens = 16
  return c


def _unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def problem():
  """Model, tokenised rows, mined pairs and initial adapters: the same in every process."""
  pre = load_pretrained("tiny-random")
  config = make_config()
  rng = np.random.default_rng(0)
  # Long random-word requests: the chat template's shared system prompt does not dominate
  # the pooled states, so paraphrase pairs are at a clear distance before training.
  words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 5)) for _ in range(300)]
  harm_texts = [" ".join(rng.choice(words, 20)) + "?"
                for _ in range(N_INTENTS * N_PHRASINGS)]
  benign_texts = [f"Write a short poem about topic {i}." for i in range(N_BENIGN)]
  # Paraphrase clusters in embedding space: mined pairs join phrasings of one intent.
  centres = _unit(rng.standard_normal((N_INTENTS, 32)))
  emb = _unit(np.repeat(centres, N_PHRASINGS, axis=0)
              + 0.45 * _unit(rng.standard_normal((N_INTENTS * N_PHRASINGS, 32))))
  emb = np.concatenate([emb, _unit(rng.standard_normal((N_BENIGN, 32)))])
  labels = ["harmful"] * len(harm_texts) + ["benign"] * N_BENIGN
  nb, _ = neighbors.mine_neighbors(emb, 4, TAU, labels=labels)
  n_h = len(harm_texts)
  harm = inputs.encode_rows(pre.tokenizer, harm_texts,
                            ["I can't help with that request."] * n_h, 128, 12)
  benign = inputs.encode_rows(pre.tokenizer, benign_texts,
                              [f"Here is a poem about topic {i}." for i in range(N_BENIGN)], 128,
                              12)
  aux = objective(pre.cfg, config)[1](pre.tokenizer)
  adapters0 = adapters_lib.init_adapters(config.adapters, pre.cfg, pre.params, jax.random.key(1))
  # Off the identity (LoRA b = 0 at init): every adapter leaf then has a gradient.
  noise = np.random.default_rng(2)
  adapters0 = jax.tree.map(
      lambda x: np.asarray(x) + 0.05 * noise.standard_normal(x.shape).astype(np.float32),
      adapters0)
  return pre, config, nb, harm, benign, aux, adapters0


@functools.lru_cache(maxsize=None)
def batcher(num_shards: int) -> PairBatcher:
  """The batcher as the main job builds it for a mesh with `num_shards` batch shards."""
  _, config, nb, harm, _, _, _ = problem()
  n_h, dc = len(harm.ids), config.data
  return PairBatcher(np.arange(n_h), np.arange(n_h, n_h + N_BENIGN), nb, TAU,
                     harmful_per_step=dc.harmful_per_step, benign_per_step=dc.benign_per_step,
                     pairs_per_step=dc.pairs_per_step, num_shards=num_shards, seed=config.seed)


def batch_fn(num_shards: int, step: int):
  """The main job's batch (methods.context.Context.safety_batch_fn), rows by position."""
  _, _, _, harm, benign, _, _ = problem()
  b = batcher(num_shards).batch(step)
  return method_batch(SafetyBatch(
      harm=Tokens.take(harm, b.harmful_idx),
      benign=Tokens.take(benign, b.benign_idx - len(harm.ids)),
      pairs=Pairs(index=b.pair_index, weight=b.pair_weight, valid=b.pair_valid)))


def train(workdir: str, mesh_shape: dict[str, int] | None = None, rules: str = "replicate"):
  """`fit` on the real objective; (flat final adapters, per-step metrics [STEPS, M])."""
  pre, config, _, _, _, aux, adapters0 = problem()
  c = config.copy_and_resolve_references()
  c.train.sharding = rules
  if mesh_shape:
    c.train.mesh.update(mesh_shape)
  mesh = sharding.make_mesh(dict(c.train.mesh))
  frozen_axes = {f"base/{k}": v for k, v in sharding.model_logical_axes(pre.cfg).items()}
  loss_fn = objective(pre.cfg, c)[0]
  trained, history = trainer.fit(
      loss_fn, adapters0, functools.partial(batch_fn, sharding.batch_size_divisor(mesh)), c,
      workdir, frozen={"base": pre.params, "aux": aux}, frozen_axes=frozen_axes, mesh=mesh)
  metrics = np.array([[h[k] for k in METRICS] for h in history], np.float64)
  return toy.flat(trained), metrics


def pair_grads(mesh_shape: dict[str, int]) -> np.ndarray:
  """Gradient of the consistency term alone on step 0's batch under a mesh (flat).

  In the full objective L_safety's gradient dominates the update; this isolates the one
  that flows back through the cross-device gather of the pair members.
  """
  pre, config, _, _, _, aux, adapters0 = problem()
  c = config.copy_and_resolve_references()
  c.loss.update({"w_safety": 0.0, "w_capability": 0.0, "lam": 1.0})
  mesh = sharding.make_mesh(mesh_shape)
  loss_fn = objective(pre.cfg, c)[0]
  frozen = sharding.place_tree({"base": pre.params, "aux": aux}, mesh)
  batch = sharding.shard_batch(batch_fn(sharding.batch_size_divisor(mesh), 0), mesh)
  grads = jax.jit(jax.grad(lambda a: loss_fn(a, frozen, batch, None)[0]))(
      sharding.place_tree(adapters0, mesh))
  return toy.flat(jax.device_get(grads))


# Runs with 8 emulated CPU devices: pure data parallel (one harmful prompt per device),
# data x fsdp with the frozen model sharded, and the consistency term's gradient alone
# under data parallelism. Results go to the .npz in argv[1].
_ON_8_DEVICES = r"""
import sys
import jax, numpy as np
import test_sharded_objective as t
assert jax.device_count() == 8
out = {}
for name, shape, rules in [("dp", {"data": -1}, "replicate"),
                           ("fsdp", {"data": 2, "fsdp": 4}, "fsdp")]:
  out[name + "_params"], out[name + "_metrics"] = t.train(f"{sys.argv[2]}/{name}", shape, rules)
out["pair_grads"] = t.pair_grads({"data": -1})
np.savez(sys.argv[1], **out)
"""


def test_real_objective_8_devices_match_1_device(tmp_path):
  assert jax.device_count() == 1
  adapters0 = problem()[-1]
  # With B_h = 8 on 8 devices every valid pair joins prompts held by two devices.
  batches = [batcher(1).batch(s) for s in range(STEPS)]
  assert all(b.pair_valid.sum() >= 2 for b in batches)
  for s, b in enumerate(batches):
    np.testing.assert_array_equal(batcher(8).batch(s).pair_index, b.pair_index)

  ref_params, ref_metrics = train(str(tmp_path / "one"))
  ref_pair_grads = pair_grads({"data": -1})
  out = tmp_path / "out.npz"
  proc = toy.subprocess.run([sys.executable, "-c", _ON_8_DEVICES, str(out), str(tmp_path)],
                            env=toy.subprocess_env(8), capture_output=True, text=True,
                            timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  got = np.load(out)
  col = {k: i for i, k in enumerate(METRICS)}
  # Not vacuous: pairs are valid, consistency is a real part of the loss, adapters move.
  assert (ref_metrics[:, col["pairs_valid"]] >= 2).all()
  assert (ref_metrics[:, col["l_consistency"]] > 1e-4).all()
  assert np.abs(ref_params - toy.flat(adapters0)).max() > 1e-3
  scale = np.abs(ref_pair_grads).max()
  assert scale > 1e-6 and (ref_pair_grads != 0).mean() > 0.5  # reaches most adapter weights
  np.testing.assert_array_equal(ref_metrics[:, col["pairs_valid"]],
                                [b.pair_valid.sum() for b in batches])
  for name in ("dp", "fsdp"):
    metrics = got[f"{name}_metrics"]
    np.testing.assert_array_equal(metrics[:, col["pairs_valid"]],
                                  ref_metrics[:, col["pairs_valid"]], err_msg=name)
    np.testing.assert_allclose(metrics, ref_metrics, atol=1e-5, rtol=0,
                               err_msg=f"{name}: {METRICS}")
    # The consistency value is small on a random model: also to 1e-4 of itself.
    np.testing.assert_allclose(metrics[:, col["l_consistency"]],
                               ref_metrics[:, col["l_consistency"]], rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(got[f"{name}_params"], ref_params, atol=1e-5, rtol=0,
                               err_msg=name)
  # The pair term's own gradient, to 1e-5 of its largest entry.
  np.testing.assert_allclose(got["pair_grads"], ref_pair_grads, atol=1e-5 * scale, rtol=0)


# --- The consistency monitor ---------------------------------------------------


def test_consistency_summary():
  history = [{"pairs_valid": 4.0, "l_consistency_weighted": 1.0, "l_total": 4.0, "loss": 4.0},
             {"pairs_valid": 2.0, "l_consistency_weighted": 3.0, "l_total": 6.0, "loss": 6.0}]
  s = monitor.consistency_summary(history)
  assert s == {"pairs_valid_mean": 3.0, "consistency_share_mean": 0.375, "steps": 2}
  # Without the weighted metric, lam * l_consistency stands in for it.
  plain = [{"pairs_valid": 1.0, "l_consistency": 0.5, "l_total": 2.0}]
  assert monitor.consistency_summary(plain, lam=2.0)["consistency_share_mean"] == 0.5
  assert monitor.consistency_summary(plain)["consistency_share_mean"] is None
  # Steps with a zero or non-finite total are left out of the share.
  odd = plain + [{"pairs_valid": 3.0, "l_consistency": 1.0, "l_total": 0.0},
                 {"pairs_valid": 2.0, "l_consistency": np.nan, "l_total": 1.0}]
  s = monitor.consistency_summary(odd, lam=2.0)
  assert s["pairs_valid_mean"] == 2.0 and s["consistency_share_mean"] == 0.5
  # A loss without pairs (the toy loss) or no step at all: nothing to say.
  assert monitor.consistency_summary([{"loss": 1.0}]) == {
      "pairs_valid_mean": None, "consistency_share_mean": None, "steps": 0}
  assert monitor.consistency_summary([])["pairs_valid_mean"] is None


@pytest.mark.parametrize("pairs, warns", [(0.0, True), (0.9, True), (1.0, False), (5.0, False)])
def test_few_pairs_warns_loudly(pairs, warns, monkeypatch):
  seen = []
  monkeypatch.setattr(logging, "warning", lambda fmt, *a: seen.append(fmt % a))
  monitor.log_summary({"pairs_valid_mean": pairs, "consistency_share_mean": 0.1, "steps": 10})
  assert bool(seen) == warns
  if warns:
    assert f"{pairs:.2f} valid pairs per step" in seen[0]
    assert "config.data.pairs_per_step" in seen[0] and "config.data.tau" in seen[0]
  seen.clear()
  monitor.log_summary({"pairs_valid_mean": None, "consistency_share_mean": None, "steps": 0})
  assert not seen


def test_fit_warns_when_a_run_has_no_pairs(tmp_path, monkeypatch):
  """A loss reporting 0 valid pairs: fit warns at the first log and again at the end."""
  def loss_fn(trainable, frozen, batch, rng):
    loss, m = toy.loss_fn(trainable, frozen, batch, rng)
    return loss, {**m, "pairs_valid": jnp.zeros(()), "l_consistency_weighted": jnp.zeros(()),
                  "l_total": loss}
  seen = []
  monkeypatch.setattr(monitor.logging, "warning", lambda fmt, *a: seen.append(fmt % a))
  with toy.compile_cache():
    _, history = trainer.fit(loss_fn, toy.init_trainable(), toy.BatchFn(), toy.toy_config(4),
                             str(tmp_path / "w"), frozen=toy.frozen_params())
  assert [h["pairs_valid"] for h in history] == [0.0] * 4
  few = [w for w in seen if "0.00 valid pairs per step" in w]
  assert len(few) == 2 and "the first 2 steps" in few[0], seen
  assert all("config.data.pairs_per_step" in w for w in few)
