"""Adapters: LoRA target selection and math, embedding MLP, identity at init, counts."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from semsafe_jax import adapters as A
from semsafe_jax.models import transformer
from semsafe_jax.models.config import ModelConfig

TINY = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=96,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
SMOLLM2 = ModelConfig(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                      tie_word_embeddings=True)


def adapter_cfg(**kw):
  c = ml_collections.ConfigDict(dict(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                                     lora_targets=["q_proj", "v_proj"], embed_mlp=True,
                                     embed_mlp_hidden=32))
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def base():
  # One compiled init instead of one eager op per parameter shape.
  return jax.jit(transformer.init_params, static_argnums=0)(TINY, jax.random.key(0))


def ids(B=2, T=7, seed=1):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, TINY.vocab_size)


def perturbed(adapters, seed=3, std=0.05):
  """Trained-looking adapters (numpy noise: no per-shape compiles)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + std * rng.standard_normal(x.shape, np.float32), adapters)


# --- Target selection -------------------------------------------------------


def test_short_names_and_regex(base):
  assert A.resolve_targets(base, ["q_proj", "v_proj"]) == [
      "layers/attn/q_proj/kernel", "layers/attn/v_proj/kernel"]
  assert A.resolve_targets(base, [r"layers/mlp/.*_proj/kernel"]) == [
      "layers/mlp/down_proj/kernel", "layers/mlp/gate_proj/kernel", "layers/mlp/up_proj/kernel"]
  assert A.resolve_targets(base, "k_proj, o_proj") == [
      "layers/attn/k_proj/kernel", "layers/attn/o_proj/kernel"]
  # A CLI override of the tuple field arrives as one comma-separated item.
  qv = A.resolve_targets(base, ["q_proj", "v_proj"])
  assert A.resolve_targets(base, ("q_proj,v_proj",)) == qv
  every = A.resolve_targets(base, list(A.SHORT_TARGETS))
  assert len(every) == 7 and every == A.adaptable_kernels(base)


@pytest.mark.parametrize("bad", ["qproj", "layers/attn/q_proj", "embed/embedding", "(unclosed"])
def test_unmatched_target_is_an_error(base, bad):
  with pytest.raises(ValueError, match="LoRA target"):
    A.init_adapters(adapter_cfg(lora_targets=["q_proj", bad]), TINY, base, jax.random.key(0))


def test_adapter_tree_layout(base):
  ad = A.init_adapters(adapter_cfg(lora_targets=["q_proj", "v_proj", "down_proj"]), TINY, base,
                       jax.random.key(0))
  L, D, r = TINY.num_layers, TINY.hidden_size, 4
  q = ad["lora"]["layers"]["attn"]["q_proj"]
  assert q["a"].shape == (L, D, r) and q["b"].shape == (L, r, 64)
  assert ad["lora"]["layers"]["attn"]["v_proj"]["b"].shape == (L, r, 32)
  assert ad["lora"]["layers"]["mlp"]["down_proj"]["a"].shape == (L, 96, r)
  assert set(ad["embed_mlp"]) == {"w1", "b1", "ln_scale", "ln_bias", "w2", "b2"}
  for leaf in jax.tree.leaves(ad):
    assert leaf.dtype == jnp.float32
  # b and the MLP's last layer start at zero; a is PEFT-like U(-1/sqrt(in), 1/sqrt(in)).
  assert not np.any(q["b"]) and not np.any(ad["embed_mlp"]["w2"])
  assert not np.any(ad["embed_mlp"]["b2"])
  a = np.asarray(q["a"])
  assert np.abs(a).max() <= D ** -0.5 and a.std() > 0.5 * D ** -0.5 / np.sqrt(3)


def test_disabled_parts(base):
  ad = A.init_adapters(adapter_cfg(embed_mlp=False), TINY, base, jax.random.key(0))
  assert set(ad) == {"lora"}
  ad = A.init_adapters(adapter_cfg(lora_rank=0), TINY, base, jax.random.key(0))
  assert set(ad) == {"embed_mlp"}
  assert A.apply_adapters(base, ad, adapter_cfg(lora_rank=0)) is base


# --- Math -------------------------------------------------------------------


def test_apply_lora_formula_and_purity(base):
  cfg = adapter_cfg()
  ad = perturbed(A.init_adapters(cfg, TINY, base, jax.random.key(0)))
  merged = A.apply_adapters(base, ad, cfg)
  ab = ad["lora"]["layers"]["attn"]["q_proj"]
  want = np.asarray(base["layers"]["attn"]["q_proj"]["kernel"]) + (8.0 / 4) * np.einsum(
      "lir,lro->lio", ab["a"], ab["b"])
  np.testing.assert_allclose(merged["layers"]["attn"]["q_proj"]["kernel"], want, rtol=1e-5,
                             atol=1e-6)
  # Untargeted kernels are the same arrays; the caller's dict is not mutated.
  assert merged["layers"]["attn"]["k_proj"]["kernel"] is base["layers"]["attn"]["k_proj"]["kernel"]
  assert not np.array_equal(base["layers"]["attn"]["q_proj"]["kernel"], want)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_unmerged_lora_equals_merged(base, dropout):
  """merge=False (training's form) computes the same function and gradients."""
  cfg = adapter_cfg(lora_targets=list(A.SHORT_TARGETS), lora_dropout=dropout)
  ad = perturbed(A.init_adapters(cfg, TINY, base, jax.random.key(0)))
  p = A.apply_adapters(base, ad, cfg, merge=False)
  q = p["layers"]["attn"]["q_proj"]
  assert q["kernel"] is base["layers"]["attn"]["q_proj"]["kernel"] and "lora_a" in q
  x, key = ids(), jax.random.key(7)

  def f(a, merge):
    out = A.adapted_forward(base, a, TINY, cfg, x, rng=key, merge=merge)
    return jnp.sum(out.logits[:, -1] ** 2) / 1e3, out.logits
  (l1, z1), g1 = jax.jit(jax.value_and_grad(f, has_aux=True), static_argnums=1)(ad, True)
  (l2, z2), g2 = jax.jit(jax.value_and_grad(f, has_aux=True), static_argnums=1)(ad, False)
  np.testing.assert_allclose(z1, z2, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-3, atol=1e-6), g1, g2)


def test_lora_term_gradient_matches_autodiff():
  """The hand-written backward of (x @ a) @ b equals JAX's own."""
  r = np.random.default_rng(0)
  x, a, b, w = (jnp.asarray(r.standard_normal(s), jnp.float32)
                for s in [(6, 5), (5, 3), (3, 4), (6, 4)])
  f = lambda *xab: jnp.sum(transformer.lora_term(*xab) * w)
  ref = lambda x, a, b: jnp.sum((x @ a) @ b * w)
  np.testing.assert_allclose(f(x, a, b), ref(x, a, b), rtol=1e-6)
  for got, want in zip(jax.grad(f, (0, 1, 2))(x, a, b), jax.grad(ref, (0, 1, 2))(x, a, b)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_embed_mlp_formula():
  p = perturbed(A.init_embed_mlp(8, 5, jax.random.key(0)), std=0.3)
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 3, 8)))
  h = x @ np.asarray(p["w1"]) + np.asarray(p["b1"])
  h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
  h = np.maximum(h * np.asarray(p["ln_scale"]) + np.asarray(p["ln_bias"]), 0.0)
  want = x + h @ np.asarray(p["w2"]) + np.asarray(p["b2"])
  np.testing.assert_allclose(A.apply_embed_mlp(p, jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("kw", [{}, {"embed_mlp": False},
                                {"lora_targets": list(A.SHORT_TARGETS), "lora_rank": 8}])
@pytest.mark.parametrize("merge", [True, False])
def test_identity_at_init_is_bitwise(base, use_jit, kw, merge):
  cfg = adapter_cfg(**kw)
  ad = A.init_adapters(cfg, TINY, base, jax.random.key(5))
  x, mask = ids(), jnp.array([[1] * 7, [0, 0] + [1] * 5], bool)  # left padding too
  f_base = lambda p, i: transformer.forward(p, TINY, i, attention_mask_BxS=mask).logits
  f_ad = lambda a, p, i: A.adapted_forward(p, a, TINY, cfg, i, attention_mask_BxS=mask,
                                           merge=merge).logits
  if use_jit:
    f_base, f_ad = jax.jit(f_base), jax.jit(f_ad)
  want = np.asarray(f_base(base, x))
  got = np.asarray(f_ad(ad, base, x))
  assert want.dtype == got.dtype == np.float32
  assert np.array_equal(want, got)  # bitwise, not allclose
  # The generation hook gives the same embeddings as the model's own.
  emb = A.adapted_embed_fn(ad)(base, TINY, x)
  assert np.array_equal(emb, transformer.embed(base, TINY, x))


def test_identity_bfloat16_params():
  cfg16 = TINY.replace(dtype="bfloat16", param_dtype="bfloat16")
  p = transformer.init_params(cfg16, jax.random.key(0))
  cfg = adapter_cfg()
  ad = A.init_adapters(cfg, cfg16, p, jax.random.key(1))
  merged = A.apply_adapters(p, ad, cfg)
  assert merged["layers"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
  assert np.array_equal(A.adapted_forward(p, ad, cfg16, cfg, ids()).logits,
                        transformer.forward(p, cfg16, ids()).logits)


def test_trained_adapters_change_the_model_and_gradients_reach_them(base):
  cfg = adapter_cfg()
  ad = perturbed(A.init_adapters(cfg, TINY, base, jax.random.key(0)))
  x = ids()
  assert not np.allclose(A.adapted_forward(base, ad, TINY, cfg, x).logits,
                         transformer.forward(base, TINY, x).logits)
  # Fresh adapters: b = 0 and w2 = 0, so only b, w2, b2 get gradient at first.
  fresh = A.init_adapters(cfg, TINY, base, jax.random.key(0))
  logit = lambda a: A.adapted_forward(base, a, TINY, cfg, x).logits[:, -1, 3].sum()
  grad = jax.jit(jax.grad(logit))
  g = grad(fresh)
  assert jax.tree.structure(g) == jax.tree.structure(fresh)  # only adapters are trainable
  assert np.abs(g["lora"]["layers"]["attn"]["q_proj"]["b"]).sum() > 0
  assert np.abs(g["embed_mlp"]["w2"]).sum() > 0
  g = grad(ad)
  for leaf in jax.tree.leaves(g):
    assert np.all(np.isfinite(leaf)) and np.abs(leaf).sum() > 0


def test_lora_dropout(base):
  cfg = adapter_cfg(lora_dropout=0.5)
  ad = perturbed(A.init_adapters(cfg, TINY, base, jax.random.key(0)))
  k = lambda p: np.asarray(p["layers"]["attn"]["q_proj"]["kernel"])
  no_rng = k(A.apply_adapters(base, ad, cfg))
  assert np.array_equal(no_rng, k(A.apply_adapters(base, ad, adapter_cfg())))  # eval: no dropout
  d1 = k(A.apply_adapters(base, ad, cfg, rng=jax.random.key(1)))
  d2 = k(A.apply_adapters(base, ad, cfg, rng=jax.random.key(1)))
  d3 = k(A.apply_adapters(base, ad, cfg, rng=jax.random.key(2)))
  assert np.array_equal(d1, d2) and not np.array_equal(d1, d3) and not np.array_equal(d1, no_rng)
  # Dropped input features leave exactly the base kernel's rows.
  w = np.asarray(base["layers"]["attn"]["q_proj"]["kernel"])
  dropped_rows = np.all(d1 == w, axis=-1)
  assert 0.2 < dropped_rows.mean() < 0.8
  out = A.adapted_forward(base, ad, TINY, cfg, ids(), rng=jax.random.key(1))
  assert np.all(np.isfinite(out.logits))


# --- Counts -----------------------------------------------------------------


def test_smollm2_parameter_count():
  shapes = jax.eval_shape(lambda k: transformer.init_params(SMOLLM2, k), jax.random.key(0))
  cfg = adapter_cfg(lora_rank=16, lora_alpha=32.0, embed_mlp_hidden=256)
  ad = jax.eval_shape(lambda k: A.init_adapters(cfg, SMOLLM2, shapes, k), jax.random.key(0))
  s = A.param_summary(ad, shapes)
  assert s["model"] == 134_515_008
  assert s["lora"] == 921_600 == A.count_params(ad["lora"])
  assert abs(s["lora_pct"] - 0.6851) < 1e-4  # 921,600 / 134,515,008
  assert s["embed_mlp"] == 2 * 576 * 256 + 3 * 256 + 576
  assert s["trainable"] == s["lora"] + s["embed_mlp"]
  # Shapes from the model config alone (params=None) agree.
  ad2 = jax.eval_shape(lambda k: A.init_adapters(cfg, SMOLLM2, None, k), jax.random.key(0))
  assert A.count_params(ad2) == s["trainable"]


def test_unstack_shared_keeps_one_copy_of_the_base_and_the_same_function():
  """The main job's evaluation holds the base model and the unmerged adapted model per layer
  (the unrolled decoder then reads weights in place): the kernels they share stay shared."""
  from semsafe_jax.models import transformer  # pylint: disable=g-import-not-at-top
  from semsafe_jax.models.loading import load_pretrained  # pylint: disable=g-import-not-at-top
  pre = load_pretrained("tiny-random", tokenizer=False)
  cfg = ml_collections.ConfigDict({"lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.0,
                                   "lora_targets": ("q_proj", "down_proj"),
                                   "embed_mlp": False, "full_weights": False})
  ad = A.init_adapters(cfg, pre.cfg, pre.params, jax.random.key(0))
  ad = jax.tree.map(lambda x: x + 0.05, ad)  # nonzero B: the adapters change the function
  adapted = A.apply_adapters(pre.params, ad, cfg, merge=False)
  base_l, adapted_l = transformer.unstack_shared(pre.cfg.num_layers, pre.params, adapted)
  for i in range(pre.cfg.num_layers):
    b, a = base_l["layers"][i]["attn"]["q_proj"], adapted_l["layers"][i]["attn"]["q_proj"]
    assert a["kernel"] is b["kernel"] and "lora_a" in a and "lora_a" not in b
  ids = jnp.asarray([[5, 9, 13, 2, 7]])
  for stacked, layered in ((pre.params, base_l), (adapted, adapted_l)):
    np.testing.assert_allclose(transformer.forward(layered, pre.cfg, ids).logits,
                               transformer.forward(stacked, pre.cfg, ids).logits, atol=1e-5)
  assert transformer.unstack_shared(pre.cfg.num_layers, base_l)[0] is base_l  # already per layer
