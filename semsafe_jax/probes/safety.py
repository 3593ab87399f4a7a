"""Safety probe: where in the network does the model separate harmful prompts?

Per layer, the hidden states are mean-pooled over the prompt tokens and a
logistic-regression probe (harmful = 1, benign = 0) is trained on them, all
layers at once (vmap). Held-out accuracy per layer goes to a markdown table and
a plot; the best layer's probe is saved and can
  - weight consistency pairs by the probe's unsafe probability
    (`probe.use = "weight_pairs"`, see `probe_pair_weights`), or
  - flag unlabeled prompts for L_safety (`probe.use = "flag_unlabeled"`, see
    `flag_unlabeled`).

Shape suffixes: L probed layers (model layers + 1), N examples, T tokens, D width.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from semsafe_jax import files
from semsafe_jax.configs import cfg_get
from semsafe_jax.models import generate as gen_lib
from semsafe_jax.models import transformer
from semsafe_jax.models.config import ModelConfig
from semsafe_jax.probes.heads import masked_mean_pool, probe_logit

Params = dict[str, Any]
PROBE_USES = ("off", "weight_pairs", "flag_unlabeled")
PROBE_FILE = "safety_probe.npz"
PROBE_META_FILE = "safety_probe.json"


# ----------------------------------------------------------------------------
# Features.


def encode_prompts(tokenizer: Any, texts: Sequence[str], max_len: int, *, chat: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(ids_NxT int32, mask_NxT bool), chat-formatted, right-padded, truncated on the left
  (so the end of the prompt, where the response starts, is always kept)."""
  if chat:
    try:
      from semsafe_jax.models.chat import format_prompt  # pylint: disable=g-import-not-at-top
    except ImportError:
      def format_prompt(tok, prompt):
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    texts = [format_prompt(tokenizer, t) for t in texts]
  pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
  ids = np.full((len(texts), max_len), pad, np.int32)
  mask = np.zeros((len(texts), max_len), bool)
  for i, t in enumerate(texts):
    tok = list(tokenizer.encode(t, add_special_tokens=False))[-max_len:]
    ids[i, :len(tok)] = tok
    mask[i, :len(tok)] = True
  return ids, mask


def pooled_hidden_states(params: Params, cfg: ModelConfig, ids_NxT: np.ndarray,
                         mask_NxT: np.ndarray, *, pool_mask_NxT: np.ndarray | None = None,
                         batch_size: int = 16, embed_fn: Callable | None = None) -> np.ndarray:
  """[L+1, N, D] float32: every layer's hidden states mean-pooled over pool_mask
  (default: the attention mask, i.e. all prompt tokens)."""
  pool = mask_NxT if pool_mask_NxT is None else pool_mask_NxT
  embed = gen_lib.as_embed_partial(embed_fn)
  N = ids_NxT.shape[0]
  chunks = []
  for s in range(0, N, batch_size):
    sl = slice(s, s + batch_size)
    n = len(ids_NxT[sl])
    pad = lambda x, n=n: np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
    # Padded rows (all-masked) keep one shape, so the step compiles once.
    feats = _pooled_step(params, embed, pad(ids_NxT[sl]), pad(mask_NxT[sl]), pad(pool[sl]),
                         cfg=cfg)
    chunks.append(np.asarray(feats)[:, :n])
  return np.concatenate(chunks, axis=1)


# Module level, so the probe's train and held-out passes and later scoring share one
# compile per shape (a jit made inside the function compiled again on every call).
@functools.partial(jax.jit, static_argnames=("cfg",))
def _pooled_step(params: Params, embed_fn: jax.tree_util.Partial, ids: jax.Array,
                 mask: jax.Array, pmask: jax.Array, *, cfg: ModelConfig) -> jax.Array:
  out = transformer.forward(params, cfg, inputs_embeds_BxTxD=embed_fn(params, cfg, ids),
                            attention_mask_BxS=mask, output_hidden_states=True,
                            compute_logits=False)
  return jax.vmap(masked_mean_pool, in_axes=(0, None))(out.hidden_states, pmask)


# ----------------------------------------------------------------------------
# Logistic probes, one per layer.


def train_layer_probes(feats_LxNxD: np.ndarray, labels_N: np.ndarray, *, steps: int = 300,
                       lr: float = 0.05, l2: float = 1e-3) -> Params:
  """Class-balanced L2-regularised logistic regression per layer (full batch, Adam).

  Features are standardised with the training mean/std, stored in the probe.
  Returns {"w": [L, D], "b": [L], "mu": [L, D], "sd": [L, D]}.
  """
  probes = _fit_layer_probes(jnp.asarray(feats_LxNxD, jnp.float32),
                             jnp.asarray(labels_N, jnp.float32), steps=int(steps),
                             lr=float(lr), l2=float(l2))
  return jax.tree.map(np.asarray, probes)


# One compiled program: run eagerly, the standardisation and class weights compiled a
# dozen small ops one by one.
@functools.partial(jax.jit, static_argnames=("steps", "lr", "l2"))
def _fit_layer_probes(x: jax.Array, y: jax.Array, *, steps: int, lr: float, l2: float) -> Params:
  pos = jnp.maximum(y.sum(), 1.0)
  neg = jnp.maximum((1 - y).sum(), 1.0)
  sample_w = jnp.where(y > 0.5, 0.5 / pos, 0.5 / neg)  # each class weighs one half
  mu = x.mean(axis=1)
  sd = x.std(axis=1) + 1e-6
  opt = optax.adam(lr)

  def fit_one(x_NxD, mu_D, sd_D):
    probe0 = {"w": jnp.zeros(x_NxD.shape[1]), "b": jnp.zeros(()), "mu": mu_D, "sd": sd_D}

    def loss(wb):
      logit = probe_logit({**probe0, **wb}, x_NxD)
      return (sample_w * optax.sigmoid_binary_cross_entropy(logit, y)).sum() + l2 * (
          wb["w"] ** 2).sum()

    def body(carry, _):
      wb, st = carry
      g = jax.grad(loss)(wb)
      upd, st = opt.update(g, st, wb)
      return (optax.apply_updates(wb, upd), st), None

    wb = {"w": probe0["w"], "b": probe0["b"]}
    (wb, _), _ = jax.lax.scan(body, (wb, opt.init(wb)), None, length=steps)
    return {**probe0, **wb}

  return jax.vmap(fit_one)(x, mu, sd)


def probe_probs(probes: Params, feats_LxNxD: np.ndarray) -> np.ndarray:
  """[L, N] unsafe probability of every example under every layer's probe."""
  return np.asarray(_probe_probs(jax.tree.map(jnp.asarray, probes), jnp.asarray(feats_LxNxD)))


@jax.jit
def _probe_probs(probes: Params, feats_LxNxD: jax.Array) -> jax.Array:
  return jax.nn.sigmoid(jax.vmap(probe_logit)(probes, feats_LxNxD))


def probe_accuracy(probes: Params, feats_LxNxD: np.ndarray, labels_N: np.ndarray) -> np.ndarray:
  """[L] accuracy at threshold 0.5."""
  pred = probe_probs(probes, feats_LxNxD) > 0.5
  return (pred == (np.asarray(labels_N) > 0.5)[None]).mean(axis=1)


def layer_probe(probes: Params, layer: int) -> Params:
  """One layer's probe as the scorer/aux dict {"w", "b", "mu", "sd", "layer"}."""
  out = {k: np.asarray(v[layer]) for k, v in probes.items() if k != "layer"}
  out["layer"] = np.int32(layer)
  return out


# ----------------------------------------------------------------------------
# Report and persistence.


def write_probe_report(out_dir: str, train_acc_L: np.ndarray, heldout_acc_L: np.ndarray,
                       best_layer: int) -> dict[str, str]:
  """Markdown table + PNG plot of accuracy per layer. Returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = ["| layer | train acc | held-out acc |", "|---:|---:|---:|"]
  for layer, (tr, ho) in enumerate(zip(train_acc_L, heldout_acc_L)):
    mark = " **(best)**" if layer == best_layer else ""
    rows.append(f"| {layer}{mark} | {tr:.3f} | {ho:.3f} |")
  md = os.path.join(out_dir, "safety_probe.md")
  files.write_text(md, "# Safety probe accuracy per layer\n\nLayer 0 = embeddings, last = final "
                   "norm output. Harmful vs benign prompts, hidden states mean-pooled over "
                   "prompt tokens.\n\n" + "\n".join(rows) + "\n")
  png = os.path.join(out_dir, "safety_probe.png")
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(train_acc_L, marker="o", label="train")
  ax.plot(heldout_acc_L, marker="s", label="held-out")
  ax.axvline(best_layer, color="gray", ls="--", lw=1, label=f"best = {best_layer}")
  ax.set_xlabel("layer")
  ax.set_ylabel("accuracy")
  ax.set_ylim(0.0, 1.02)
  ax.set_title("Safety probe: harmful vs benign")
  ax.legend()
  fig.tight_layout()
  files.save_figure(fig, png, dpi=100)
  plt.close(fig)
  return {"markdown": md, "plot": png}


def save_probe(out_dir: str, probe: Params, meta: dict[str, Any] | None = None) -> str:
  """Writes probe arrays (npz) and metadata (json). Returns the npz path."""
  path = os.path.join(out_dir, PROBE_FILE)
  files.save_npz(path, probe)
  files.write_text(os.path.join(out_dir, PROBE_META_FILE),
                   json.dumps({"layer": int(probe["layer"]), **(meta or {})}, indent=2))
  return path


def load_probe(out_dir: str) -> Params:
  return files.load_npz(os.path.join(out_dir, PROBE_FILE))


def fit_safety_probe(params: Params, cfg: ModelConfig,
                     train: tuple[np.ndarray, np.ndarray, np.ndarray],
                     heldout: tuple[np.ndarray, np.ndarray, np.ndarray], out_dir: str, *,
                     probe_cfg: Any = None, embed_fn: Callable | None = None,
                     write: bool = True) -> dict[str, Any]:
  """The whole probe step: features, per-layer probes, report, best layer saved (write=False:
  nothing written, as on the other processes of a multi-host job).

  train / heldout: (ids_NxT, mask_NxT, labels_N) with label 1 = harmful.
  Returns {"probe" (best layer, scorer format), "best_layer", "train_acc",
  "heldout_acc", "files"}.
  """
  kw = dict(steps=int(cfg_get(probe_cfg, "steps", 300)), lr=float(cfg_get(probe_cfg, "lr", 0.05)),
            l2=float(cfg_get(probe_cfg, "l2", 1e-3)))
  bs = int(cfg_get(probe_cfg, "batch_size", 16))
  f_tr = pooled_hidden_states(params, cfg, train[0], train[1], batch_size=bs, embed_fn=embed_fn)
  f_ho = pooled_hidden_states(params, cfg, heldout[0], heldout[1], batch_size=bs,
                              embed_fn=embed_fn)
  probes = train_layer_probes(f_tr, train[2], **kw)
  acc_tr = probe_accuracy(probes, f_tr, train[2])
  acc_ho = probe_accuracy(probes, f_ho, heldout[2])
  layer = cfg_get(probe_cfg, "layer", "best")
  # Ties go to the layer with the better training accuracy, then the earliest.
  best = (int(np.lexsort((-acc_tr, -acc_ho))[0]) if layer in ("best", None, "")
          else int(layer) % len(acc_ho))
  probe = layer_probe(probes, best)
  files = {}
  if write:
    files = write_probe_report(out_dir, acc_tr, acc_ho, best)
    meta = {"best_layer": best, "train_acc": acc_tr.tolist(), "heldout_acc": acc_ho.tolist(),
            "n_train": int(len(train[2])), "n_heldout": int(len(heldout[2]))}
    files["probe"] = save_probe(out_dir, probe, meta)
  return {"probe": probe, "best_layer": best, "train_acc": acc_tr, "heldout_acc": acc_ho,
          "files": files}


# ----------------------------------------------------------------------------
# Using the probe in training.


def score_prompts(params: Params, cfg: ModelConfig, probe: Params, ids_NxT: np.ndarray,
                  mask_NxT: np.ndarray, *, batch_size: int = 16,
                  embed_fn: Callable | None = None) -> np.ndarray:
  """[N] unsafe probability of each prompt under the saved probe (at its layer)."""
  feats = pooled_hidden_states(params, cfg, ids_NxT, mask_NxT, batch_size=batch_size,
                               embed_fn=embed_fn)[int(probe["layer"])]
  p = {k: jnp.asarray(v) for k, v in probe.items() if k != "layer"}
  return np.asarray(jax.nn.sigmoid(probe_logit(p, jnp.asarray(feats))))


def probe_pair_weights(unsafe_prob_B: Any, pair_index_Px2: Any, pair_weight_P: Any) -> Any:
  """probe.use == "weight_pairs": pair weight x mean unsafe probability of its members.

  unsafe_prob_B is indexed like the harmful block (pair_index positions). Works
  on numpy (batch building) and jax arrays alike.
  """
  xp = jnp if isinstance(unsafe_prob_B, jax.Array) else np
  p = xp.asarray(unsafe_prob_B, dtype=xp.float32)
  idx = xp.asarray(pair_index_Px2)
  return xp.asarray(pair_weight_P, dtype=xp.float32) * 0.5 * (p[idx[:, 0]] + p[idx[:, 1]])


def flag_unlabeled(unsafe_prob_N: Any, threshold: float = 0.5) -> tuple[Any, Any]:
  """probe.use == "flag_unlabeled": (flags_N bool, harm_weight_N float).

  Flagged prompts (probability >= threshold) join the harmful block for
  L_safety with their probability as harm_weight; the rest get weight 0.
  """
  xp = jnp if isinstance(unsafe_prob_N, jax.Array) else np
  p = xp.asarray(unsafe_prob_N, dtype=xp.float32)
  flags = p >= threshold
  return flags, xp.where(flags, p, 0.0).astype(xp.float32)
