"""The safety-preserving regularisers of the retention methods, as pure functions.

Convention: a LoRA module adapts a stacked kernel K [L, in, out] (y = x @ K) by
ΔK = scale · a @ b, a [L, in, r], b [L, r, out]. The papers write W = Kᵀ [out, in] and
ΔW = B A; an output-space matrix P acting as P @ ΔW there is ΔK @ Pᵀ here.

- SaLoRA (Li et al., ICLR 2025): the LoRA output passes through the fixed C = I - U Uᵀ,
  U [out, s] orthonormal (the top principal directions of the aligned layer's outputs on
  harmful prompts): y += x a (b C). `project_out` is b C; `salora_init` the paper's
  initialisation (the principal part of K, projected on the task's output subspace).
- AsFT (Yang et al., 2025): λ Σ ||(I - Ĉ) ΔW||²_F with Ĉ = V Vᵀ / ||V||_F, V = W_aligned -
  W_base (the reference code's alignment matrix). Ĉ = F Fᵀ with F [out, k] (`asft_factor`),
  so the penalty never forms a kernel-sized matrix.
- AlignGuard-LoRA (Das et al., 2025): Σ F ⊙ ΔK² with a diagonal Fisher F
  (`weighted_sq_penalty`); `fisher_weights` splits the Fisher of the safety loss and that of
  the task loss into the alignment-critical and the task part.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from semsafe_jax.adapters.lora import lora_delta


# --- SaLoRA.


def project_out(b_LxRxO: jax.Array, u_LxOxS: jax.Array) -> jax.Array:
  """b C with C = I - u uᵀ: each row of b without its component in span(u)."""
  return b_LxRxO - jnp.einsum("lrs,los->lro", jnp.einsum("lro,los->lrs", b_LxRxO, u_LxOxS),
                              u_LxOxS)


def salora_factors(a_LxIxR: jax.Array, b_LxRxO: jax.Array, init: dict[str, jax.Array]
                   ) -> tuple[jax.Array, jax.Array]:
  """(a', b') of rank 2r with scale · a' b' = scale · (a b - a0 b0) C: the trainable part
  through the safety module, minus the fixed initial part (the paper's W_res = W - C A0 B0,
  kept as an offset so the frozen kernels stay the aligned model's)."""
  return (jnp.concatenate([a_LxIxR, init["a0"]], axis=-1),
          jnp.concatenate([project_out(b_LxRxO, init["u"]), -init["b0c"]], axis=1))


def top_eigvecs(matvec: Callable[[jax.Array], jax.Array], dim: int, k: int, key: jax.Array,
                iters: int = 8, oversample: int = 8) -> tuple[jax.Array, jax.Array]:
  """(eigenvalues [k], eigenvectors [dim, k]), largest first, of a symmetric PSD operator
  given as Q -> S Q: subspace iteration, then Rayleigh-Ritz (Halko et al., 2011). Only
  matrix products: no dense eigensolver on [dim, dim]."""
  p = min(k + oversample, dim)
  q, _ = jnp.linalg.qr(jax.random.normal(key, (dim, p), jnp.float32))
  for _ in range(iters):
    q, _ = jnp.linalg.qr(matvec(q))
  t = q.T @ matvec(q)
  w, v = jnp.linalg.eigh(0.5 * (t + t.T))
  order = jnp.argsort(-w)[:k]
  return w[order], q @ v[:, order]


def salora_layer(k_IxO: jax.Array, gram_harm_IxI: jax.Array, gram_task_IxI: jax.Array,
                 key: jax.Array, *, rank: int, safety_rank: int, task_rank: int, scale: float,
                 iters: int = 8) -> dict[str, jax.Array]:
  """One layer of SaLoRA's fixed module and initialisation.

  u:  the top `safety_rank` principal directions of the outputs x K on harmful prompts
      (eigenvectors of Kᵀ G K, G = Σ x xᵀ over their tokens); C = I - u uᵀ.
  a0, b0: the paper's task-specific initialisation, ΔW0 = U_t U_tᵀ Ū_r S̄_r V̄_rᵀ (top-r
      SVD of W, its output side projected on the top `task_rank` output directions on task
      prompts), split as sqrt(S̄) on either side; here a0 = V̄_r sqrt(S̄)/sqrt(scale),
      b0 = sqrt(S̄) Ū_rᵀ U_t U_tᵀ / sqrt(scale).
  b0c: b0 C, the fixed offset that makes the initial model the aligned one.
  """
  k1, k2, k3 = jax.random.split(key, 3)
  _, out_dim = k_IxO.shape
  quad = lambda g: (lambda q: k_IxO.T @ (g @ (k_IxO @ q)))
  _, u = top_eigvecs(quad(gram_harm_IxI), out_dim, safety_rank, k1, iters)
  _, ut = top_eigvecs(quad(gram_task_IxI), out_dim, task_rank, k2, iters)
  s2, q_r = top_eigvecs(lambda q: k_IxO.T @ (k_IxO @ q), out_dim, rank, k3, iters)
  sv = jnp.sqrt(jnp.maximum(s2, 0.0))  # singular values of K
  p_r = (k_IxO @ q_r) / jnp.maximum(sv, 1e-12)
  root = jnp.sqrt(sv / scale)
  a0 = p_r * root
  b0 = root[:, None] * ((q_r.T @ ut) @ ut.T)
  b0c = b0 - (b0 @ u) @ u.T
  return {"u": u, "a0": a0, "b0": b0, "b0c": b0c}


# --- AsFT.


def asft_penalty(a_LxIxR: jax.Array, b_LxRxO: jax.Array, f_LxOxK: jax.Array,
                 scale: float) -> jax.Array:
  """Σ_l ||(I - Ĉ_l) ΔW_l||²_F, Ĉ_l = F_l F_lᵀ, ΔW_l = (scale · a_l b_l)ᵀ.

  = scale² Σ_l tr(a_lᵀ a_l · b̃_l b̃_lᵀ) with b̃ = b - (b F) Fᵀ: [r, r] products only.
  """
  bt = b_LxRxO - jnp.einsum("lrk,lok->lro", jnp.einsum("lro,lok->lrk", b_LxRxO, f_LxOxK),
                            f_LxOxK)
  ata = jnp.einsum("lir,lis->lrs", a_LxIxR, a_LxIxR)
  btb = jnp.einsum("lro,lso->lrs", bt, bt)
  return scale ** 2 * jnp.sum(ata * btb)


def asft_factor(x_LxIxR: np.ndarray, y_LxRxO: np.ndarray) -> np.ndarray:
  """F [L, out, r] with F Fᵀ = Vᵀ V / ||V||_F per layer, for V = x @ y [L, in, out]
  (a LoRA delta, or a dense one with y = None: F = Vᵀ / sqrt(||V||_F)). A layer with V = 0
  gets F = 0 (every update there is off the alignment direction)."""
  if y_LxRxO is None:
    v = np.asarray(x_LxIxR, np.float64)
    norm = np.sqrt((v ** 2).sum(axis=(1, 2)))
    f = np.swapaxes(v, 1, 2)
  else:
    x, y = np.asarray(x_LxIxR, np.float64), np.asarray(y_LxRxO, np.float64)
    r = np.linalg.qr(x, mode="r")  # V = Q R y and Vᵀ V = yᵀ Rᵀ R y
    ry = np.einsum("lsr,lro->lso", r, y)
    norm = np.sqrt((ry ** 2).sum(axis=(1, 2)))
    f = np.swapaxes(ry, 1, 2)
  scale = np.where(norm > 0, 1.0 / np.sqrt(np.maximum(norm, 1e-30)), 0.0)
  return (f * scale[:, None, None]).astype(np.float32)


# --- AlignGuard-LoRA.


def weighted_sq_penalty(a_LxIxR: jax.Array, b_LxRxO: jax.Array, w_LxIxO: jax.Array,
                        scale: float) -> jax.Array:
  """Σ w ⊙ ΔK², ΔK = scale · a b: ||F^½ ΔW||² for a diagonal F."""
  d = lora_delta(a_LxIxR, b_LxRxO, scale)
  return jnp.sum(w_LxIxO * d * d)


def fisher_weights(safety: dict[str, np.ndarray], task: dict[str, np.ndarray],
                   critical_frac: float) -> dict[str, dict[str, np.ndarray]]:
  """Per module {"align": F_A, "task": H_T}: each Fisher scaled to mean 1 over every
  adapted weight (so the lambdas read as weights of an L2 penalty), F_A the safety Fisher
  on its top `critical_frac` coordinates per module (the alignment-critical part of the
  update), H_T the task Fisher on the rest (the task part).

  With a diagonal Fisher the split is by coordinates: the two parts never overlap, so
  the paper's collision terms (their overlap and angle) are identically zero here.
  """
  mean = lambda fs: float(np.mean(np.concatenate([np.ravel(v) for v in fs.values()])))
  fs, ft = mean(safety), mean(task)
  out = {}
  for m, f in safety.items():
    f = np.asarray(f, np.float32) / max(fs, 1e-30)
    h = np.asarray(task[m], np.float32) / max(ft, 1e-30)
    if critical_frac >= 1.0:
      crit = np.ones(f.shape, bool)
    elif critical_frac <= 0.0:
      crit = np.zeros(f.shape, bool)
    else:
      crit = f >= np.quantile(f, 1.0 - critical_frac)
    out[m] = {"align": np.where(crit, f, 0.0).astype(np.float32),
              "task": np.where(crit, 0.0, h).astype(np.float32)}
  return out
