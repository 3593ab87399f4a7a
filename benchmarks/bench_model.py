"""Throughput of our JAX model vs transformers (torch) on the embedded default.

  HF_HUB_OFFLINE=1 python benchmarks/bench_model.py [--reps 5] [--model smollm2-135m-instruct]

Measures, in float32 on the local CPU (or whatever device JAX picks):
  (a) forward tokens/s, batch 8 x 128 tokens: jit `transformer.forward` vs
      the torch module under `torch.no_grad()` in eval mode;
  (b) generation tokens/s, batch 8 chat prompts (left-padded), 64 new tokens,
      greedy with end tokens ignored so both produce all 64:
      `generate.decode` (prefill + while_loop decode in one jit) vs
      `transformers` `model.generate(min_new_tokens=64)`;
  (c) our forward's achieved FLOP/s as a fraction of a matmul peak measured
      in the same run (float32 2048x2048 `jnp.dot`, best of several).
The torch side is transformers' LlamaForCausalLM holding the same weights.
Every number is the median of --reps runs after a warm-up, ours and
transformers alternating; torch uses as many threads as there are cores.
Both sides run under the same host allocator (see semsafe_jax/malloc.py;
--malloc system for the C library's).
Run it on an otherwise idle machine: other load slows torch's OpenMP
threads far more than XLA's, which inflates the ratios (the process CPU-time
ratio is printed too, and the load average).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from semsafe_jax import malloc
from semsafe_jax.models import chat as chat_lib
from semsafe_jax.models import generate as gen_lib
from semsafe_jax.models import transformer
from semsafe_jax.models.config import LAYER_LOOPS
from semsafe_jax.models.loading import load_pretrained

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea and the wind.",
    "How do I bake sourdough bread at home?",
    "Explain photosynthesis to a ten-year-old.",
    "Give me three tips for studying for exams.",
    "What is 17 times 23?",
    "Tell me a joke about cats.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
]


class Timing(NamedTuple):
  wall: float  # median seconds
  cpu: float  # median process CPU seconds (all threads); less sensitive to other load


def compare(fn_ours, fn_ref, reps: int) -> tuple[Timing, Timing]:
  """Median timings of two functions, warmed up, then run alternately.

  Alternating keeps a drifting machine load from favouring either side.
  """
  fn_ours()
  fn_ref()
  runs: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
  for _ in range(reps):
    for i, fn in enumerate((fn_ours, fn_ref)):
      t, c = time.perf_counter(), time.process_time()
      fn()
      runs[i].append((time.perf_counter() - t, time.process_time() - c))
  med = lambda r: Timing(statistics.median(x[0] for x in r), statistics.median(x[1] for x in r))
  return med(runs[0]), med(runs[1])


def matmul_peak(reps: int, n: int = 2048) -> float:
  """Best float32 FLOP/s of an n x n matmul (the roofline we compare to)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(max(2 * reps, 10)):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def forward_flops(cfg, batch: int, seq: int) -> float:
  """Matmul FLOPs of one full forward (attention computed as a full T x T block)."""
  D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
  NH, KH = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  per_token_layer = 2 * (D * NH + 2 * D * KH + NH * D + 3 * D * F) + 2 * 2 * seq * NH
  return batch * seq * (L * per_token_layer + 2 * D * V)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--malloc", choices=malloc.CHOICES, default=None,
                  help=f"host allocator for both sides (default: ${malloc.ENV} or auto)")
  ap.add_argument("--layer_loop", choices=LAYER_LOOPS, default="auto",
                  help="ours: model.layer_loop (auto unrolls on CPU)")
  args = ap.parse_args()
  malloc.reexec(args.malloc)  # as the command line does; both sides run in this process

  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)

  pre = load_pretrained(args.model, dtype="float32", param_dtype="float32",
                        layer_loop=args.layer_loop)
  cfg, params, tok = pre.cfg, pre.params, pre.tokenizer
  hf = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta,
      tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=8192)
  if cfg.family != "llama" or cfg.rope_scaling:
    raise SystemExit("This benchmark builds the torch twin as a plain Llama model.")
  model = transformers.LlamaForCausalLM(hf).eval()
  _copy_to_torch(params, cfg, model)
  print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}, jax {jax.__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"allocator {malloc.active()}, "
        f"layers {'unrolled' if transformer.unrolls_layers(cfg) else 'scanned'}; "
        f"load average {os.getloadavg()[0]:.1f} (other processes skew both sides, torch most)")

  # (a) forward.
  B, T = args.batch, args.seq
  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (B, T)).astype(np.int32)
  fwd = jax.jit(lambda p, x: transformer.forward(p, cfg, x).logits)
  ids_j, ids_t = jnp.asarray(ids), torch.from_numpy(ids.astype(np.int64))

  def torch_fwd():
    with torch.no_grad():
      return model(ids_t, use_cache=False).logits

  ours_fwd, hf_fwd = compare(lambda: fwd(params, ids_j).block_until_ready(), torch_fwd, args.reps)
  err = float(np.abs(np.asarray(fwd(params, ids_j)) - torch_fwd().numpy()).max())
  report(f"(a) forward {B}x{T}", B * T, ours_fwd, hf_fwd, 1.3)
  print(f"    max |logit diff| vs transformers: {err:.1e}")

  # (b) generation: same left-padded chat batch for both, all N tokens produced.
  N = args.new_tokens
  prompts = (PROMPTS * (B // len(PROMPTS) + 1))[:B]
  enc = chat_lib.encode(tok, chat_lib.format_prompts(tok, prompts))
  P = gen_lib.prompt_bucket(max(map(len, enc)))
  pid = chat_lib.pad_id(tok)
  ids_BxP, mask_BxP = chat_lib.left_pad(enc, length=P, pad=pid)
  embed, no_stop = gen_lib.as_embed_partial(None), np.full((1,), -1, np.int32)

  def ours_gen():
    return gen_lib.decode(params, embed, ids_BxP, mask_BxP, no_stop, jax.random.key(0),
                          np.int32(pid), cfg=cfg, max_new_tokens=N,
                          sampling=gen_lib.Sampling())[0].block_until_ready()

  # transformers gets the tight left padding (no bucket), its best case.
  hf_ids, hf_mask = (torch.from_numpy(a.astype(np.int64)) for a in chat_lib.left_pad(enc, pad=pid))

  def torch_gen():
    with torch.no_grad():
      return model.generate(hf_ids, attention_mask=hf_mask, do_sample=False, max_new_tokens=N,
                            min_new_tokens=N, pad_token_id=pid)

  ours_g, hf_g = compare(ours_gen, torch_gen, args.reps)
  report(f"(b) generate {B} prompts (padded to {P}) + {N} new tokens", B * N, ours_g, hf_g, 2.0)
  # min_new_tokens bans end tokens on the transformers side, so rows agree up to
  # the first end token ours produces.
  ours_ids, hf_new = np.asarray(ours_gen()), torch_gen()[:, hf_ids.shape[1]:].numpy()
  stops = chat_lib.stop_token_ids(tok)
  same = 0
  for o, h in zip(ours_ids, hf_new):
    end = next((i for i, t in enumerate(o) if t in stops), N)
    same += int(np.array_equal(o[:end], h[:end]))
  print(f"    rows with identical greedy tokens (up to their first end token): {same}/{B}")

  # (c) achieved FLOP/s of (a) vs a matmul peak measured now.
  peak = matmul_peak(args.reps)
  flops = forward_flops(cfg, B, T)
  print(f"(c) forward {flops / ours_fwd.wall / 1e9:,.1f} GFLOP/s = "
        f"{flops / ours_fwd.wall / peak:.1%} of the float32 2048^2 matmul peak "
        f"({peak / 1e9:,.1f} GFLOP/s, best of {max(2 * args.reps, 10)}); "
        f"load average now {os.getloadavg()[0]:.1f}")


def report(name: str, tokens: int, ours: Timing, ref: Timing, target: float) -> None:
  print(f"{name}: ours {tokens / ours.wall:,.0f} tok/s ({ours.wall:.3f} s), transformers "
        f"{tokens / ref.wall:,.0f} tok/s ({ref.wall:.3f} s): ratio {ref.wall / ours.wall:.2f}x "
        f"(target >= {target}x); by CPU time {ref.cpu / ours.cpu:.2f}x "
        f"({ours.cpu:.3f} vs {ref.cpu:.3f} CPU-s)")


def _copy_to_torch(params, cfg, model) -> None:
  """Our params dict -> the torch Llama twin (kernels are [in, out], torch is [out, in])."""
  import torch  # pylint: disable=g-import-not-at-top
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  sd = {"model.embed_tokens.weight": t(params["embed"]["embedding"]),
        "model.norm.weight": t(params["final_norm"]["scale"])}
  if not cfg.tie_word_embeddings:
    sd["lm_head.weight"] = t(params["lm_head"]["kernel"]).T
  lay = params["layers"]
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    sd[pre + "input_layernorm.weight"] = t(lay["pre_attn_norm"]["scale"][i])
    sd[pre + "post_attention_layernorm.weight"] = t(lay["pre_mlp_norm"]["scale"][i])
    for sub, group in (("self_attn", "attn"), ("mlp", "mlp")):
      for name, p in lay[group].items():
        sd[f"{pre}{sub}.{name}.weight"] = t(p["kernel"][i]).T.contiguous()
  missing, unexpected = model.load_state_dict(sd, strict=False)
  if unexpected or [m for m in missing if m != "lm_head.weight"]:
    raise RuntimeError(f"weight copy failed: missing {missing}, unexpected {unexpected}")


if __name__ == "__main__":
  main()
