"""Export round trips: our adapted logits == transformers / PEFT logits after export.

Tiny random transformers models are saved, loaded with our loader, given
random non-zero adapters, exported, and reloaded in torch.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from semsafe_jax import adapters as adapters_lib
from semsafe_jax import export
from semsafe_jax.models.config import from_hf_dict
from semsafe_jax.models.loading import load_pretrained

ATOL = 1e-3
_SMALL = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_config(family: str, tied: bool):
  if family == "llama":
    return transformers.LlamaConfig(**_SMALL, head_dim=8, tie_word_embeddings=tied)
  if family == "qwen2":  # q/k/v biases
    return transformers.Qwen2Config(**_SMALL, tie_word_embeddings=tied)
  if family == "gemma3":  # sqrt(D)-scaled embeddings, sandwich norms, qk norms
    return transformers.Gemma3TextConfig(
        **_SMALL, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=tied)
  raise ValueError(family)


def _save_tiny(family: str, tied: bool, path: str, seed: int = 0) -> None:
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(_hf_config(family, tied)).eval()
  with torch.no_grad():  # non-trivial norms and biases, so a misplaced tensor shows
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)


def _random_adapters(cfg, params, targets, embed_mlp: bool, seed: int = 0):
  adapter_cfg = dict(lora_rank=4, lora_alpha=8.0, lora_targets=targets, embed_mlp=embed_mlp,
                     embed_mlp_hidden=16)
  ad = adapters_lib.init_adapters(adapter_cfg, cfg, params, jax.random.PRNGKey(seed))
  leaves, tree = jax.tree.flatten(ad)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  # b and w2/b2 start at zero (identity adapters): make every factor non-zero.
  leaves = [x + 0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(tree, leaves), adapter_cfg


def _inputs():
  ids = np.random.RandomState(0).randint(0, _SMALL["vocab_size"], (2, 7))
  mask = np.ones((2, 7), np.int64)
  mask[0, :2] = 0  # left padding
  return ids, mask


def _ours(params, cfg, ad, adapter_cfg):
  ids, mask = _inputs()
  out = adapters_lib.adapted_forward(params, ad, cfg, adapter_cfg, jnp.asarray(ids),
                                     attention_mask_BxS=jnp.asarray(mask))
  return np.asarray(out.logits)


def _torch_logits(model) -> np.ndarray:
  ids, mask = _inputs()
  pos = np.maximum(mask.cumsum(1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(pos))
  return out.logits.float().numpy()


def _max_diff(a, b) -> float:
  valid = _inputs()[1].astype(bool)
  return float(np.abs(a - b)[valid].max())


CASES = [  # family, tied, LoRA targets, embedding MLP
    ("llama", True, ["q_proj", "v_proj"], True),
    ("llama", False, ALL_TARGETS, True),
    ("llama", True, ["q_proj", "v_proj"], False),
    ("qwen2", True, ALL_TARGETS, True),
    ("gemma3", True, ["q_proj", "v_proj"], True),
    ("llama", True, [], True),  # embedding MLP alone
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{'tied' if c[1] else 'untied'}"
                f"-{len(c[2])}targets{'-mlp' if c[3] else ''}")
def case(request, tmp_path_factory):
  family, tied, targets, embed_mlp = request.param
  root = tmp_path_factory.mktemp(f"{family}")
  base_dir = str(root / "base")
  _save_tiny(family, tied, base_dir)
  pre = load_pretrained(base_dir, tokenizer=False)
  assert pre.cfg.tie_word_embeddings == tied
  ad, adapter_cfg = _random_adapters(pre.cfg, pre.params, targets, embed_mlp)
  base_logits = np.asarray(
      adapters_lib.adapted_forward(pre.params, {}, pre.cfg, adapter_cfg,
                                   jnp.asarray(_inputs()[0]),
                                   attention_mask_BxS=jnp.asarray(_inputs()[1])).logits)
  logits = _ours(pre.params, pre.cfg, ad, adapter_cfg)
  assert _max_diff(logits, base_logits) > 1e-2  # the adapters do change the model
  return dict(root=root, base_dir=base_dir, pre=pre, adapters=ad, adapter_cfg=adapter_cfg,
              logits=logits, tied=tied, embed_mlp=embed_mlp, targets=targets)


def test_peft_round_trip(case):
  pre, out_dir = case["pre"], str(case["root"] / "peft")
  export.save_peft(out_dir, pre.params, pre.cfg, case["adapters"],
                   lora_alpha=case["adapter_cfg"]["lora_alpha"],
                   base_model_name_or_path=case["base_dir"])
  with open(os.path.join(out_dir, "adapter_config.json")) as f:
    conf = json.load(f)
  assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM"
  if case["targets"]:
    assert conf["r"] == 4 and conf["lora_alpha"] == 8
    assert sorted(conf["target_modules"]) == sorted(case["targets"])
  else:  # PEFT needs a target: an exactly-zero LoRA on q_proj
    assert conf["target_modules"] == ["q_proj"]
  assert conf["base_model_name_or_path"] == case["base_dir"]

  base = transformers.AutoModelForCausalLM.from_pretrained(case["base_dir"]).eval()
  original_table = base.get_input_embeddings().weight.detach().clone()
  model = peft.PeftModel.from_pretrained(base, out_dir).eval()
  assert _max_diff(_torch_logits(model), case["logits"]) < ATOL

  inner = model.get_base_model()
  if case["tied"]:  # the LM head keeps the original table
    assert torch.equal(inner.get_output_embeddings().weight, original_table)
  if case["embed_mlp"]:
    assert conf["modules_to_save"] == ["embed_tokens"]
    new_table = inner.model.embed_tokens.modules_to_save["default"].weight
    assert not torch.allclose(new_table, original_table)
  else:
    assert not conf["modules_to_save"]


def test_peft_merge_and_unload_matches(case):
  """PEFT's own merge of our adapter (the route torch users take) stays exact."""
  pre, out_dir = case["pre"], str(case["root"] / "peft_merge")
  export.save_peft(out_dir, pre.params, pre.cfg, case["adapters"],
                   lora_alpha=case["adapter_cfg"]["lora_alpha"],
                   base_model_name_or_path=case["base_dir"])
  base = transformers.AutoModelForCausalLM.from_pretrained(case["base_dir"]).eval()
  merged = peft.PeftModel.from_pretrained(base, out_dir).merge_and_unload().eval()
  assert _max_diff(_torch_logits(merged), case["logits"]) < ATOL
  merged.save_pretrained(str(case["root"] / "peft_merged"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(case["root"] / "peft_merged"))
  assert _max_diff(_torch_logits(reloaded.eval()), case["logits"]) < ATOL


def test_merged_round_trip(case):
  pre, out_dir = case["pre"], str(case["root"] / "merged")
  export.save_merged(out_dir, pre.params, pre.cfg, case["adapters"],
                     lora_alpha=case["adapter_cfg"]["lora_alpha"])
  with open(os.path.join(out_dir, "config.json")) as f:
    conf = json.load(f)
  # A folded input table unties a tied model; the head keeps the original table.
  assert conf["tie_word_embeddings"] == (case["tied"] and not case["embed_mlp"])
  model = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
  assert _max_diff(_torch_logits(model), case["logits"]) < ATOL
  # Our own loader reads the export back to the same adapted model.
  again = load_pretrained(out_dir, tokenizer=False)
  ours = _ours(again.params, again.cfg, {}, case["adapter_cfg"])
  assert _max_diff(ours, case["logits"]) < ATOL


def test_merged_params_equal_adapted_forward(case):
  pre = case["pre"]
  params, cfg = export.merged_params(pre.params, pre.cfg, case["adapters"],
                                     lora_alpha=case["adapter_cfg"]["lora_alpha"])
  ours = _ours(params, cfg, {}, case["adapter_cfg"])
  assert _max_diff(ours, case["logits"]) < 1e-4


def test_sharded_bf16_merged(tmp_path):
  base_dir = str(tmp_path / "base")
  _save_tiny("llama", True, base_dir)
  pre = load_pretrained(base_dir, tokenizer=False)
  ad, adapter_cfg = _random_adapters(pre.cfg, pre.params, ["q_proj", "v_proj"], True)
  out_dir = str(tmp_path / "merged")
  export.save_merged(out_dir, pre.params, pre.cfg, ad, lora_alpha=8.0, dtype="bfloat16",
                     max_shard_bytes=20_000)
  files = sorted(os.listdir(out_dir))
  assert "model.safetensors.index.json" in files
  assert sum(f.startswith("model-") for f in files) > 2
  model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
  assert model.model.embed_tokens.weight.shape == (101, 32)
  # bfloat16 weights: loose tolerance, but far tighter than the adapters' effect.
  assert _max_diff(_torch_logits(model), _ours(pre.params, pre.cfg, ad, adapter_cfg)) < 5e-2


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_hf_config_round_trip(family):
  from semsafe_jax.models import registry  # pylint: disable=g-import-not-at-top
  variants = [registry.tiny_hf_config(family, 101)]
  if family == "llama":
    variants.append({**variants[0], "tie_word_embeddings": False, "attention_bias": True,
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64}})
  if family == "qwen2":
    variants.append({**variants[0], "use_sliding_window": True, "sliding_window": 16,
                     "max_window_layers": 1})
  if family == "gemma3":
    variants.append({**variants[0], "final_logit_softcapping": 30.0, "rope_theta": 5e5})
  for d in variants:
    cfg = from_hf_dict(d)
    out = export.hf_config_dict(cfg)
    assert from_hf_dict(out) == cfg
    # ... and transformers builds the same model config from it.
    hf_cfg = transformers.AutoConfig.for_model(
        out["model_type"], **{k: v for k, v in out.items() if k != "model_type"})
    assert from_hf_dict(hf_cfg.to_dict()) == cfg


def test_orbax_round_trip(tmp_path):
  cfg = from_hf_dict(_hf_config("llama", True).to_dict())
  ad, _ = _random_adapters(cfg, None, ["q_proj", "v_proj"], True)
  out_dir = str(tmp_path / "orbax")
  export.save_orbax(out_dir, ad, adapter_config={"lora_alpha": 8.0})
  export.save_orbax(out_dir, ad, adapter_config={"lora_alpha": 8.0})  # overwrites
  restored, conf = export.load_orbax(out_dir)
  assert conf == {"lora_alpha": 8.0}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               ad, restored)
