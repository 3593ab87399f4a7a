"""Generation on a tiny random model: KV-cache decoding, padding, sampling, stops, compiles.

Compiles are counted on the real decoder (`generate.decode`, the jit every caller uses):
each trace of it is recorded by generate.py itself (`generate.traces()`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from semsafe_jax.models import chat
from semsafe_jax.models import generate as gen
from semsafe_jax.models import transformer
from semsafe_jax.models.config import ModelConfig

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
PAD = 0
NO_STOP = np.array([-1], np.int32)
# A large init std gives peaked logits: no near-ties for float reordering to flip.
STD = 0.5


@pytest.fixture(scope="module")
def params():
  return transformer.init_params(CFG, jax.random.key(0), std=STD)


@pytest.fixture(scope="module")
def tokenizer():
  """A word-level tokenizer over CFG's vocab with a ChatML-like template."""
  special = ["<pad>", "<|im_end|>", "<|im_start|>", "<unk>"]
  vocab = {t: i for i, t in enumerate(special + [f"w{i}" for i in range(CFG.vocab_size - 4)])}
  tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
  tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} "
                       "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> w0 "
                       "{% endif %}")
  return tok


@pytest.fixture
def traces():
  """The real decoder's traces (= compilations) from here on: its jit cache is emptied
  first, so shapes compiled by earlier tests count again."""
  gen.decode.clear_cache()
  start = len(gen.traces())
  return lambda: gen.traces()[start:]


def rows_of(lengths, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(4, CFG.vocab_size, n).tolist() for n in lengths]


def run_decode(params, rows, n=8, *, length=32, sampling=gen.Sampling(), stop=NO_STOP, seed=0,
               embed_fn=None, batch=4, cfg=CFG):
  """decode() on left-padded rows; the default shape is shared, so compiled once."""
  ids, mask = chat.left_pad(rows, length=length, rows=batch, pad=PAD)
  out = gen.decode(params, gen.as_embed_partial(embed_fn), ids, mask, np.asarray(stop, np.int32),
                   jax.random.key(seed), np.int32(PAD), cfg=cfg, max_new_tokens=n,
                   sampling=sampling)
  return [np.asarray(x) for x in out]


@jax.jit
def _full_logits(p, embed_fn, ids_1xT):
  return transformer.forward(p, CFG, inputs_embeds_BxTxD=embed_fn(p, CFG, ids_1xT)).logits


def reference_greedy(params, row, n, embed_fn=None):
  """Greedy decoding by re-running the full uncached forward for every token."""
  embed_fn = gen.as_embed_partial(embed_fn)
  seq = list(row)
  for _ in range(n):
    # Right padding to a fixed length: causality keeps the real prefix exact.
    ids = np.array([seq + [PAD] * (48 - len(seq))], np.int32)
    fwd = lambda p, x: _full_logits(p, embed_fn, x)
    seq.append(int(jnp.argmax(fwd(params, ids)[0, len(seq) - 1])))
  return seq[len(row):]


def test_cached_left_padded_batch_matches_uncached_per_row(params):
  rows, n = rows_of([3, 11, 7, 1]), 8
  tokens, lengths, finished, steps = run_decode(params, rows, n)
  assert tokens.shape == (4, n) and lengths.tolist() == [n] * 4 and not finished.any()
  assert int(steps) == n
  for r, row in enumerate(rows):
    assert tokens[r].tolist() == reference_greedy(params, row, n), r


def test_left_padded_batch_matches_unpadded_rows(params):
  rows, n = rows_of([5, 12, 2], seed=1), 8
  batched = run_decode(params, rows, n)[0]
  for r, row in enumerate(rows[:2]):
    alone = run_decode(params, [row], n, length=None, batch=None)[0]  # no padding at all
    np.testing.assert_array_equal(batched[r], alone[0])


def test_embed_fn_is_used_for_prompt_and_generated_tokens(params):
  rows, n = rows_of([4, 9], seed=2), 8
  scaled = lambda p, cfg, ids: 3.0 * transformer.embed(p, cfg, ids)
  tokens = run_decode(params, rows, n, embed_fn=scaled)[0]
  plain = run_decode(params, rows, n)[0]
  assert not np.array_equal(tokens, plain)
  for r, row in enumerate(rows):
    assert tokens[r].tolist() == reference_greedy(params, row, n, embed_fn=scaled)


def test_embed_fn_partial_arrays_are_traced(params, traces):
  """A Partial's bound arrays are jit inputs: new values, same executable."""
  rows, n = rows_of([4, 9], seed=3), 8
  fn = lambda scale, p, cfg, ids: scale * transformer.embed(p, cfg, ids)
  a = run_decode(params, rows, n, embed_fn=jax.tree_util.Partial(fn, jnp.float32(1.0)))[0]
  b = run_decode(params, rows, n, embed_fn=jax.tree_util.Partial(fn, jnp.float32(3.0)))[0]
  assert len(traces()) == 1
  np.testing.assert_array_equal(a, run_decode(params, rows, n)[0])  # scale 1 == plain embed
  assert not np.array_equal(a, b)


def test_sampling_is_deterministic_by_seed(params):
  rows, n = rows_of([3, 6, 9]), 8
  s = gen.Sampling(temperature=1.0)
  a = run_decode(params, rows, n, sampling=s, seed=1)[0]
  b = run_decode(params, rows, n, sampling=s, seed=1)[0]
  c = run_decode(params, rows, n, sampling=s, seed=2)[0]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a, run_decode(params, rows, n)[0])  # sampling is not greedy here


@pytest.mark.parametrize("sampling", [gen.Sampling(temperature=0.8, top_k=1),
                                      gen.Sampling(temperature=5.0, top_k=4, top_p=1e-6)])
def test_top_k_1_and_tiny_top_p_are_greedy(params, sampling):
  rows, n = rows_of([3, 6, 9]), 8
  greedy = run_decode(params, rows, n)[0]
  np.testing.assert_array_equal(run_decode(params, rows, n, sampling=sampling, seed=7)[0], greedy)


def test_top_k_keeps_sampled_tokens_among_the_k_best():
  logits = jnp.asarray(np.random.RandomState(0).randn(4, 50), jnp.float32)
  top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
  for i in range(20):
    tok = np.asarray(gen._sample(logits, jax.random.key(i), gen.Sampling(2.0, top_k=3)))
    assert all(t in top3[r] for r, t in enumerate(tok))


def test_top_p_keeps_the_smallest_prefix_reaching_p():
  probs = np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)
  logits = jnp.log(jnp.asarray(probs))
  seen = {int(gen._sample(logits, jax.random.key(i), gen.Sampling(1.0, top_p=0.7))[0])
          for i in range(200)}
  assert seen == {0, 1}


def test_eos_stops_a_row_and_all_done_exits_early(params):
  rows, n = rows_of([3, 6, 9]), 8
  free = run_decode(params, rows, n)[0]
  stop = int(free[0, 2])  # row 0's third token becomes an end token
  tokens, lengths, finished, steps = run_decode(params, rows, n, stop=[stop])
  for r in range(len(rows)):
    hits = np.flatnonzero(free[r] == stop)
    end = int(hits[0]) + 1 if hits.size else n
    assert lengths[r] == end and finished[r] == bool(hits.size)
    np.testing.assert_array_equal(tokens[r, :end], free[r, :end])
    assert (tokens[r, end:] == PAD).all()  # a finished row produces nothing more
  # Identical rows that all end on their first token: the loop stops after one step.
  first = run_decode(params, rows[:1] * 4, n)[0][0, 0]
  _, lengths, finished, steps = run_decode(params, rows[:1] * 4, n, stop=[first])
  assert lengths.tolist() == [1] * 4 and finished.all() and int(steps) == 1


def test_padding_rows_are_inert(params):
  rows, n = rows_of([3, 6]), 8
  half = run_decode(params, rows, n)
  assert half[1].tolist() == [n, n, 0, 0] and not half[2].any()
  full = run_decode(params, rows + rows_of([9, 2], seed=5), n)[0]
  np.testing.assert_array_equal(half[0][:2], full[:2])


def test_buckets():
  assert [gen.prompt_bucket(n) for n in (1, 32, 33, 64, 65, 1000, 1025, 3000)] == [
      32, 32, 64, 64, 128, 1024, 2048, 3072]
  assert [gen.batch_rows(n, 8) for n in (1, 2, 3, 5, 8, 9, 100)] == [1, 2, 4, 8, 8, 8, 8]


def test_compiles_once_per_shape_bucket(params, tokenizer, traces):
  """Batches of different sizes and prompt lengths within one bucket: one trace."""
  words = [" ".join(f"w{(i * 7 + j) % 60}" for j in range(k)) for i, k in
           enumerate([1, 3, 5, 2, 9, 4, 6, 2, 7, 3, 8])]  # 11 prompts: 3 batches of 4, last partial
  kw = dict(max_new_tokens=5, batch_size=4)
  first = gen.generate_batch(params, CFG, tokenizer, words, **kw)
  gen.generate_batch(params, CFG, tokenizer, words[:9], **kw)
  gen.generate_batch(params, CFG, tokenizer, words[4:], **kw)
  assert [(t.rows, t.prompt_len, t.max_new_tokens) for t in traces()] == [(4, 32, 5)]
  assert gen.decode._cache_size() == 1  # jax's own count of compiled executables
  gen.generate_batch(params, CFG, tokenizer, words, max_new_tokens=6, batch_size=4)
  assert len(traces()) == 2  # max_new_tokens is part of the key...
  again = gen.generate_batch(params, CFG, tokenizer, words, **kw)
  assert len(traces()) == 2 and again == first  # ...and compiled shapes are reused
  # Sampling settings and a longer prompt bucket each compile once more, then are reused.
  sample = dict(kw, temperature=0.7, top_k=5, top_p=0.9)
  for seed in (0, 1):
    gen.generate_batch(params, CFG, tokenizer, words, seed=seed, **sample)
    gen.generate_batch(params, CFG, tokenizer, [" ".join(["w5"] * 40)] + words[1:], **kw)
  got = traces()
  assert [(t.rows, t.prompt_len) for t in got[2:]] == [(4, 32), (4, 64)]
  assert got[2].sampling == gen.Sampling(0.7, 5, 0.9)
  assert len(set(got)) == len(got) == gen.decode._cache_size()


def test_max_batch_tokens_gives_long_prompts_fewer_rows(params, tokenizer, traces):
  """rows x (prompt bucket + new tokens) stays within the cap: short prompts keep the full
  batch, long ones are split into halves or quarters, and every answer is unchanged."""
  short = [" ".join(f"w{(i + j) % 60}" for j in range(3)) for i in range(8)]
  long = [" ".join(f"w{(i * 3 + j) % 60}" for j in range(50)) for i in range(8)]
  kw = dict(max_new_tokens=8, batch_size=8)
  plain = gen.generate_batch(params, CFG, tokenizer, short + long, **kw)
  # 8 x (32 + 8) = 320 fits; 8 x (64 + 8) = 576 does not, 4 x 72 = 288 does.
  capped = gen.generate_batch(params, CFG, tokenizer, short + long, max_batch_tokens=320, **kw)
  assert capped.token_ids == plain.token_ids
  got = [(t.rows, t.prompt_len) for t in traces()]
  assert got == [(8, 32), (8, 64), (4, 64)]
  assert gen._rows_within(8, 72, 10) == 1  # a cap below one row: one row at a time
  assert gen._rows_within(8, 72, 0) == 8  # 0 = no cap


def test_generate_text_api(params, tokenizer):
  prompts = ["w1 w2 w3", "w5", "w7 w8 w9 w10 w11 w12", "w3 w3", "w40 w41 w42"]
  out = gen.generate_batch(params, CFG, tokenizer, prompts, max_new_tokens=6, batch_size=2)
  assert len(out.texts) == len(out.token_ids) == len(prompts)
  for p, text, ids in zip(prompts, out.texts, out.token_ids):
    one = gen.generate_batch(params, CFG, tokenizer, [p], max_new_tokens=6)
    assert one.token_ids[0] == ids and one.texts[0] == text
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert "<|im_end|>" not in text and "<pad>" not in text
  assert gen.generate(params, CFG, tokenizer, prompts, max_new_tokens=6, batch_size=2) == out.texts
  # The prompt went through the chat template: same ids as formatting by hand.
  by_hand = chat.format_prompt(tokenizer, prompts[0])
  assert by_hand.startswith("<|im_start|> user w1 w2 w3 <|im_end|>")
  ids, _ = chat.left_pad(chat.encode(tokenizer, [by_hand]), pad=PAD)
  expected = run_decode(params, [ids[0].tolist()], 6, stop=chat.stop_token_ids(tokenizer))
  n = int(expected[1][0]) - int(expected[2][0])
  assert out.token_ids[0] == expected[0][0, :n].tolist()


def test_generate_stops_at_eos_and_strips_it(params, tokenizer):
  prompts = ["w1 w2", "w9 w8 w7"]
  free = gen.generate_batch(params, CFG, tokenizer, prompts, max_new_tokens=6, stop_ids=[-1])
  end_id = free.token_ids[1][3]
  out = gen.generate_batch(params, CFG, tokenizer, prompts, max_new_tokens=6, stop_ids=[end_id])
  cut = free.token_ids[1].index(end_id)
  assert out.token_ids[1] == free.token_ids[1][:cut] and out.finished[1]


def test_stop_strings_truncate_text(params, tokenizer):
  prompts = ["w1 w2", "w9 w8 w7"]
  free = gen.generate_batch(params, CFG, tokenizer, prompts, max_new_tokens=6, stop_ids=[-1])
  word = free.texts[0].split()[2]
  out = gen.generate_batch(params, CFG, tokenizer, prompts, max_new_tokens=6, stop_ids=[-1],
                           stop_strings=["zzz", word])
  assert out.texts[0] == free.texts[0][:free.texts[0].index(word)] and out.finished[0]
  assert gen.truncate_at_stop("abc STOP def END", ["END", "STOP"]) == ("abc ", True)
  assert gen.truncate_at_stop("abc", ["x", ""]) == ("abc", False)


def test_generate_plain_text_without_chat(params, tokenizer):
  out = gen.generate_batch(params, CFG, tokenizer, ["w1 w2"], max_new_tokens=6, chat=False)
  ids = tokenizer(["w1 w2"])["input_ids"][0]
  expected = run_decode(params, [ids], 6, stop=chat.stop_token_ids(tokenizer))
  n = int(expected[1][0]) - int(expected[2][0])
  assert out.token_ids[0] == expected[0][0, :n].tolist()


def test_chat_helpers(tokenizer):
  assert chat.format_prompt(tokenizer, "w1") == "<|im_start|> user w1 <|im_end|> <|im_start|> w0 "
  assert chat.format_prompts(tokenizer, ["w1"], chat=False) == ["w1"]
  ids, mask = chat.tokenize_batch(tokenizer, ["w1", "w2 w3"], length=12, rows=3)
  assert ids.shape == mask.shape == (3, 12) and ids.dtype == np.int32
  assert mask.sum(1).tolist() == [6, 7, 0]
  assert mask[1, -7:].all() and not mask[1, :-7].any()  # left padding
  assert (ids[~mask] == tokenizer.pad_token_id).all()
  assert chat.stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
  with pytest.raises(ValueError, match="do not fit"):
    chat.left_pad([[1, 2, 3]], length=2)


def test_chat_falls_back_to_plain_text_without_template(tokenizer):
  class NoTemplate:
    chat_template = None
  assert chat.format_prompt(NoTemplate(), "hello there") == "hello there"
  assert not chat.has_chat_template(NoTemplate())


@pytest.mark.parametrize("family_kw", [
    {},
    dict(family="gemma3", norm_offset=1.0, qk_norm=True, sandwich_norm=True, act="gelu_tanh",
         embed_scale=4.0, sliding_window=3, layer_is_sliding=(True, False), rope_local_theta=1e4),
])
def test_layer_loops_match(family_kw):
  """forward() gives the same outputs and cache with the layers scanned, unrolled over the
  stacked params, or run over per-layer params (as decoding passes them)."""
  scan = CFG.replace(**family_kw, layer_loop="scan")
  unroll = scan.replace(layer_loop="unroll")
  p = transformer.init_params(scan, jax.random.key(1), std=STD)
  per_layer = transformer.unstack_layers(p, scan.num_layers)
  ids = jnp.asarray(rows_of([7])[0])[None].repeat(2, 0)
  mask = jnp.ones((2, 7), bool).at[0, :2].set(False)
  want = transformer.forward(p, scan, ids, attention_mask_BxS=mask, output_hidden_states=True)
  for params, cfg in ((p, unroll), (per_layer, scan)):
    got = transformer.forward(params, cfg, ids, attention_mask_BxS=mask,
                              output_hidden_states=True)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    # Hidden states reach |80| here; the layouts fuse differently, so allow float32
    # rounding at that scale.
    np.testing.assert_allclose(got.hidden_states, want.hidden_states, rtol=1e-5, atol=1e-4)
  # With a cache: prefill 5 tokens, then 2 more. A stacked cache stays stacked when unrolled.
  full = jnp.zeros((2, 9), bool).at[:, :7].set(mask)
  scanned = unrolled = transformer.init_cache(scan, 2, 9)
  lists = {k: [c[i] for i in range(scan.num_layers)] for k, c in scanned.items()}
  for start, stop in ((0, 5), (5, 7)):
    m = full.at[:, stop:].set(False)
    run = lambda params, cfg, cache: transformer.forward(
        params, cfg, ids[:, start:stop], attention_mask_BxS=m, cache=cache, cache_index=start)
    a, b, c = run(p, scan, scanned), run(p, unroll, unrolled), run(per_layer, scan, lists)
    scanned, unrolled, lists = a.cache, b.cache, c.cache
    for out in (b, c):
      np.testing.assert_allclose(out.logits, a.logits, rtol=1e-5, atol=1e-5)
  assert unrolled["k"].shape == scanned["k"].shape
  for k in ("k", "v"):
    np.testing.assert_allclose(unrolled[k], scanned[k], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.stack(lists[k]), scanned[k], rtol=1e-5, atol=1e-5)


def test_layer_loop_is_checked():
  with pytest.raises(ValueError, match="layer_loop"):
    CFG.replace(layer_loop="sometimes")
  cpu = jax.default_backend() == "cpu"
  assert transformer.unrolls_layers(CFG) == cpu  # auto
  # Under remat a differentiated forward scans (XLA:CPU undoes remat in unrolled code);
  # decoding, which remat does not touch, keeps the unrolled loop on CPU.
  for remat in ("full", "dots", True):
    assert not transformer.unrolls_layers(CFG.replace(remat=remat))
    assert transformer.unrolls_layers(CFG.replace(remat=remat), differentiated=False) == cpu
  assert transformer.unrolls_layers(CFG.replace(remat="off")) == cpu
  assert transformer.unrolls_layers(CFG.replace(remat="full", layer_loop="unroll"))


def test_scanned_decoding_matches_unrolled(params, traces):
  """Decoding with the layers scanned (the default off CPU) gives the same tokens."""
  rows = rows_of([3, 11, 7, 1])
  scanned = run_decode(params, rows, cfg=CFG.replace(layer_loop="scan"))[0]
  unrolled = run_decode(params, rows, cfg=CFG.replace(layer_loop="unroll"))[0]
  assert len(traces()) == 2  # the two loops compile separately
  np.testing.assert_array_equal(scanned, unrolled)
