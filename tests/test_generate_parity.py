"""Greedy generation on the embedded default is token-identical to transformers.

Ours: one left-padded batch of chat prompts through the KV-cache decoder.
transformers: `model.generate(do_sample=False)` per prompt, unpadded, with
the model transformers itself loads from the same GGUF file, in float32.
"""

import pytest
import torch
import transformers

from semsafe_jax.models import chat
from semsafe_jax.models import generate as gen
from semsafe_jax.models import registry
from semsafe_jax.models.loading import load_pretrained

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How do I bake bread?",
    "Explain photosynthesis in one paragraph.",
    "Give me three tips for studying.",
    "What is 17 times 23?",
    "Tell me a joke about cats.",
    "Translate 'good morning' into Spanish.",
    "hi",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def ours():
  return load_pretrained("smollm2-135m-instruct", dtype="float32", param_dtype="float32")


@pytest.fixture(scope="module")
def hf_model():
  """transformers' own model, dequantised by transformers from the same GGUF file."""
  path, _ = registry.embedded_gguf_path("smollm2-135m-instruct")
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_greedy_matches_transformers(ours, hf_model):
  assert ours.cfg.family == "llama" and ours.cfg.dtype == "float32"
  tok = ours.tokenizer
  stop = chat.stop_token_ids(tok)
  assert tok.convert_tokens_to_ids("<|im_end|>") in stop
  # Batches of 8: the second holds one prompt and 7 padding rows.
  got = gen.generate_batch(ours.params, ours.cfg, tok, PROMPTS, max_new_tokens=NEW_TOKENS,
                           batch_size=8)
  ids = chat.encode(tok, chat.format_prompts(tok, PROMPTS))
  # transformers' own left padding (tight, no bucket); per-prompt unpadded runs give the
  # same tokens here, 8x slower.
  ids_BxP, mask_BxP = chat.left_pad(ids, pad=chat.pad_id(tok))
  with torch.no_grad():
    out = hf_model.generate(torch.from_numpy(ids_BxP).long(),
                            attention_mask=torch.from_numpy(mask_BxP).long(), do_sample=False,
                            max_new_tokens=NEW_TOKENS, eos_token_id=stop,
                            pad_token_id=chat.pad_id(tok))
  mismatches = []
  for i in range(len(PROMPTS)):
    new = out[i, ids_BxP.shape[1]:].tolist()
    end = next((j for j, t in enumerate(new) if t in stop), None)
    expected = new if end is None else new[:end]
    if got.token_ids[i] != expected or got.finished[i] != (end is not None):
      mismatches.append((PROMPTS[i], expected, got.token_ids[i]))
    assert got.texts[i] == tok.decode(expected, skip_special_tokens=True)
  assert not mismatches, mismatches
  assert sum(len(t) for t in got.token_ids) > 4 * NEW_TOKENS  # real, mostly full-length answers
  assert "Paris" in got.texts[0]
