"""Training the learned refusal scorers: the embedding classifier and the hidden probe.

Both learn refused (label 1) vs complied (label 0) responses: refusal texts
(e.g. the built-in refusals.jsonl) against the base model's own answers. The
caller tokenises; these functions only see ids and masks.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from semsafe_jax import files
from semsafe_jax.models.config import ModelConfig
from semsafe_jax.probes import safety
from semsafe_jax.probes.heads import classifier_logit, masked_mean_pool

Params = dict[str, Any]


def token_embedding_features(embedding_VxD: Any, ids_NxT: Any, mask_NxT: Any) -> jax.Array:
  """[N, D] mean embedding of the masked tokens: the expected-embedding feature of
  one-hot (observed) text, matching what `classifier_score` computes from logits."""
  x = jnp.take(jnp.asarray(embedding_VxD, jnp.float32), jnp.asarray(ids_NxT), axis=0)
  return masked_mean_pool(x, jnp.asarray(mask_NxT))


def train_classifier_on_features(feats_NxD: Any, labels_N: Any, *, hidden: int = 64,
                                 steps: int = 300, lr: float = 3e-3, weight_decay: float = 1e-4,
                                 seed: int = 0) -> tuple[Params, dict[str, float]]:
  """Class-balanced BCE, full batch, AdamW. Returns (classifier params, metrics)."""
  x = jnp.asarray(feats_NxD, jnp.float32)
  y = jnp.asarray(labels_N, jnp.float32)
  D = x.shape[1]
  pos, neg = jnp.maximum(y.sum(), 1.0), jnp.maximum((1 - y).sum(), 1.0)
  sample_w = jnp.where(y > 0.5, 0.5 / pos, 0.5 / neg)
  k1, k2 = jax.random.split(jax.random.key(seed))
  fixed = {"mu": x.mean(0), "sd": x.std(0) + 1e-6}
  train = {"w1": jax.random.normal(k1, (D, hidden)) * (2.0 / D) ** 0.5,
           "b1": jnp.zeros(hidden), "w2": jax.random.normal(k2, (hidden,)) * hidden ** -0.5,
           "b2": jnp.zeros(())}
  opt = optax.adamw(lr, weight_decay=weight_decay)

  def loss(p):
    logit = classifier_logit({**fixed, **p}, x)
    return (sample_w * optax.sigmoid_binary_cross_entropy(logit, y)).sum()

  @jax.jit
  def fit(p):
    def body(carry, _):
      p, st = carry
      value, g = jax.value_and_grad(loss)(p)
      upd, st = opt.update(g, st, p)
      return (optax.apply_updates(p, upd), st), value
    (p, _), losses = jax.lax.scan(body, (p, opt.init(p)), None, length=steps)
    return p, losses

  train, losses = fit(train)
  clf = jax.tree.map(np.asarray, {**fixed, **train})
  acc = float(((np.asarray(classifier_logit(clf, x)) > 0) == (np.asarray(y) > 0.5)).mean())
  return clf, {"train_acc": acc, "final_loss": float(losses[-1])}


def train_refusal_classifier(embedding_VxD: Any, refusal_ids_NxT: Any, refusal_mask_NxT: Any,
                             comply_ids_MxT: Any, comply_mask_MxT: Any, *, hidden: int = 64,
                             steps: int = 300, lr: float = 3e-3, weight_decay: float = 1e-4,
                             seed: int = 0) -> tuple[Params, dict[str, float]]:
  """Classifier for `scorers.classifier_score`, from response token ids.

  refusal_* are refusal responses (label 1), comply_* the base model's
  compliant answers (label 0); masks select the response tokens. The embedding
  table must be the one the scorer gets (the base model's input embedding).
  """
  f = jnp.concatenate([token_embedding_features(embedding_VxD, refusal_ids_NxT, refusal_mask_NxT),
                       token_embedding_features(embedding_VxD, comply_ids_MxT, comply_mask_MxT)])
  y = np.concatenate([np.ones(len(refusal_ids_NxT)), np.zeros(len(comply_ids_MxT))])
  return train_classifier_on_features(f, y, hidden=hidden, steps=steps, lr=lr,
                                      weight_decay=weight_decay, seed=seed)


def train_refusal_probe(params: Params, cfg: ModelConfig, ids_NxT: np.ndarray,
                        mask_NxT: np.ndarray, pool_mask_NxT: np.ndarray, labels_N: np.ndarray, *,
                        layer: int | None = None, steps: int = 300, lr: float = 0.05,
                        l2: float = 1e-3, batch_size: int = 16,
                        embed_fn: Callable | None = None) -> tuple[Params, np.ndarray]:
  """Hidden-state refusal probe for `scorers.probe_score` (scorer "probe").

  ids are prompt + response (label 1 = refused), pooled over pool_mask (the
  response tokens). layer=None picks the layer with the best training accuracy.
  Returns (probe with "layer", training accuracy per layer [L+1]).
  """
  feats = safety.pooled_hidden_states(params, cfg, ids_NxT, mask_NxT, pool_mask_NxT=pool_mask_NxT,
                                      batch_size=batch_size, embed_fn=embed_fn)
  probes = safety.train_layer_probes(feats, labels_N, steps=steps, lr=lr, l2=l2)
  acc = safety.probe_accuracy(probes, feats, labels_N)
  best = int(np.argmax(acc)) if layer is None else int(layer) % len(acc)
  return safety.layer_probe(probes, best), acc


def save_classifier(path: str, clf: Params) -> None:
  files.save_npz(path, clf)


def load_classifier(path: str) -> Params:
  return files.load_npz(path)
