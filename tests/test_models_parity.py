"""Numerical parity with transformers: tiny random checkpoints of every family, real GGUFs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

from semsafe_jax.models import forward, load_pretrained, registry
from semsafe_jax.models.transformer import embed

_KW = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=2)


def _hf_model(family: str):
  """A tiny transformers model of `family` with every weight (norms too) random."""
  if family == "llama":  # llama3 rope scaling, untied head, attention + MLP biases
    cfg = tf.LlamaConfig(**_KW, head_dim=8, attention_bias=True, mlp_bias=True,
                         tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                          "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8})
    cls = tf.LlamaForCausalLM
  elif family == "mistral":  # window 3 < sequence length, so the window matters
    cfg = tf.MistralConfig(**_KW, sliding_window=3, tie_word_embeddings=False)
    cls = tf.MistralForCausalLM
  elif family == "qwen2":  # q/k/v biases; layers >= 1 use a sliding window
    cfg = tf.Qwen2Config(**_KW, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                         tie_word_embeddings=True)
    cls = tf.Qwen2ForCausalLM
  elif family == "qwen3":
    cfg = tf.Qwen3Config(**_KW, head_dim=8, tie_word_embeddings=True)
    cls = tf.Qwen3ForCausalLM
  elif family == "gemma3":  # sliding / global interleave with separate rope bases
    cfg = tf.Gemma3TextConfig(**_KW, head_dim=16, sliding_window=3, query_pre_attn_scalar=16,
                              layer_types=["sliding_attention", "full_attention",
                                           "sliding_attention"])
    cls = tf.Gemma3ForCausalLM
  else:
    raise ValueError(family)
  cfg._attn_implementation = "eager"
  torch.manual_seed(0)
  model = cls(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
  model = _hf_model(request.param)
  d = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(d)
  assert any(d.glob("*.safetensors"))
  return model, load_pretrained(d), d


def _batch():
  """Rows: left-padded, right-padded, unpadded, left-padded by one."""
  rng = np.random.RandomState(0)
  ids_BxT = rng.randint(0, 101, (4, 9))
  mask_BxT = np.ones((4, 9), np.int64)
  mask_BxT[0, :3] = 0
  mask_BxT[1, -5:] = 0
  mask_BxT[3, :1] = 0
  return ids_BxT, mask_BxT


def _torch_out(model, ids_BxT, mask_BxT):
  pos_BxT = np.maximum(mask_BxT.cumsum(1) - 1, 0)
  with torch.no_grad():
    return model(torch.tensor(ids_BxT), attention_mask=torch.tensor(mask_BxT),
                 position_ids=torch.tensor(pos_BxT), output_hidden_states=True)


@pytest.mark.parametrize("use_jit", [False, True])
def test_logits_and_hidden_states_match(pair, use_jit):
  model, pre, _ = pair
  assert pre.tokenizer is None  # the saved dir has no tokenizer files
  ids_BxT, mask_BxT = _batch()
  ref = _torch_out(model, ids_BxT, mask_BxT)
  fn = lambda p, i, m: forward(p, pre.cfg, i, attention_mask_BxS=m, output_hidden_states=True)
  out = (jax.jit(fn) if use_jit else fn)(pre.params, jnp.asarray(ids_BxT), jnp.asarray(mask_BxT))
  valid = mask_BxT.astype(bool)
  err = np.abs(np.asarray(out.logits) - ref.logits.numpy())[valid].max()
  assert err < 1e-4, err
  assert out.hidden_states.shape[0] == len(ref.hidden_states) == pre.cfg.num_layers + 1
  for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states)):
    err = np.abs(np.asarray(ours) - theirs.numpy())[valid].max()
    assert err < 1e-4, (i, err)


def test_inputs_embeds_path_equals_ids_path(pair):
  _, pre, _ = pair
  ids_BxT, mask_BxT = _batch()
  ids, mask = jnp.asarray(ids_BxT), jnp.asarray(mask_BxT)
  a = forward(pre.params, pre.cfg, ids, attention_mask_BxS=mask).logits
  x_BxTxD = embed(pre.params, pre.cfg, ids)
  b = forward(pre.params, pre.cfg, inputs_embeds_BxTxD=x_BxTxD, attention_mask_BxS=mask).logits
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_compute_is_close(pair):
  """bf16 weights and compute against float32 compute on the same bf16-rounded weights, so
  the bound is on the compute path alone: relative RMS error within 4 roundings of bf16
  (u = 2^-8; these 3-layer models measure 1.2-2.6u), logits float32. Loading in bf16 rounds
  each weight to nearest (checked exactly), and transformers' float32 logits stay within
  what the two roundings allow (weights and compute: 8u)."""
  model, pre, d = pair
  bf = load_pretrained(d, dtype="bfloat16", param_dtype="bfloat16")
  u = 2.0**-8
  for a, b in zip(jax.tree.leaves(bf.params), jax.tree.leaves(pre.params)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)))
  ids_BxT, mask_BxT = _batch()
  valid = mask_BxT.astype(bool)
  run = lambda params, cfg: forward(params, cfg, jnp.asarray(ids_BxT),
                                    attention_mask_BxS=jnp.asarray(mask_BxT)).logits
  got = run(bf.params, bf.cfg)
  assert got.dtype == jnp.float32
  f32_cfg = bf.cfg.replace(dtype="float32", param_dtype="float32")
  same_weights = run(jax.tree.map(lambda x: x.astype(jnp.float32), bf.params), f32_cfg)
  rel_rms = lambda x, ref: float(np.sqrt(np.mean((np.asarray(x)[valid] - ref[valid]) ** 2)
                                         / np.mean(ref[valid] ** 2)))
  err = rel_rms(got, np.asarray(same_weights))
  torch_err = rel_rms(got, _torch_out(model, ids_BxT, mask_BxT).logits.numpy())
  print(f"bf16 logits: relative RMS {err / u:.2f}u (compute), {torch_err / u:.2f}u (vs torch f32)")
  assert np.isfinite(err) and err <= 4 * u, err / u
  assert torch_err <= 8 * u, torch_err / u


# --- Real embedded models: our GGUF loader vs transformers' GGUF loader. ----------------------

PROMPTS = ["How do I bake sourdough bread?", "What is 17 times 23?",
           "Write a haiku about the sea.", "Explain photosynthesis to a child.",
           "Translate 'good morning' into French."]


def _gguf_parity(alias: str) -> tuple[float, float]:
  """(max |logit diff|, max |logit|) over chat-formatted PROMPTS."""
  ours = load_pretrained(alias)
  path, _ = registry.embedded_gguf_path(registry.canonical_alias(alias))
  ref = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()
  tok = ours.tokenizer
  assert tok.chat_template, "the tokenizer must carry a chat template"
  worst, scale = 0.0, 0.0
  for prompt in PROMPTS:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                  add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    ids_1xT = np.asarray(ids)[None]
    with torch.no_grad():
      want = ref(torch.tensor(ids_1xT)).logits.numpy()
    got = np.asarray(forward(ours.params, ours.cfg, jnp.asarray(ids_1xT)).logits)
    worst = max(worst, float(np.abs(got - want).max()))
    scale = max(scale, float(np.abs(want).max()))
  return worst, scale


def test_smollm2_gguf_matches_transformers():
  err, scale = _gguf_parity("smollm2-135m-instruct")
  print(f"SmolLM2-135M-Instruct GGUF: max |dlogit| = {err:.2e} (max |logit| {scale:.1f})")
  assert err <= 1e-3, err


def test_gemma3_270m_gguf_matches_transformers():
  err, scale = _gguf_parity("gemma3-270m")
  print(f"Gemma 3 270M GGUF: max |dlogit| = {err:.2e} (max |logit| {scale:.1f})")
  assert err <= 1e-3, err
