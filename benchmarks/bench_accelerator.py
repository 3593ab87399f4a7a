"""Accelerator figures at real shapes: our train step, KV-cache generation, forward-only.

  python benchmarks/bench_accelerator.py            # on whatever accelerator JAX sees
  python benchmarks/bench_accelerator.py --toy      # the same code at toy shapes (CPU, < 2 min)

Models are random-initialised at the shapes of Llama-3-8B and Llama-3.2-1B (their
config.json values below): nothing is downloaded, and only jax, numpy and this repo
(flax, optax, orbax as it imports them) are needed. Everything runs in bfloat16 with
float32 adapters and optimizer state, as configs/llama3_8b_pod.py trains.

Rows, one table per run:

  train      one step of our objective (`objective` below: LoRA r=8 on all seven
             projections + the embedding MLP, and the combined loss w_s·L_safety +
             lambda·L_consistency + w_c·L_capability with its frozen-base forward), full
             remat, AdamW, at the pod config's batch per device: its global 64 harmful +
             64 benign rows (128 pairs) over the 8 GPUs of one node (launch/gpu_node.sh;
             --pod_devices 16 for a v4-32 / v5p-32 slice), sequence 512 (480 prompt + 32
             response tokens). tokens/s counts the rows the adapted model runs (harmful +
             benign) x 512. Peak device memory from `device.memory_stats()`.
  forward    the frozen model's forward with logits on every position, same rows x 512.
  generate   greedy decoding with the KV cache: batch 64, a 128-token prompt, 256 new
             tokens (no early stop), prefill included; beside it the memory-bandwidth bound
             B * HBM bandwidth / (bytes of the weights one token step reads: every block,
             the final norm and the LM head; the KV cache is not counted).

FLOPs (model FLOPs, for MFU against the chip's dense bf16 peak from the table below):
  N = non-embedding parameters (the blocks' projections; norms are negligible).
  train    = 6·N·T_adapted + 2·N·T_base   (the standard count; T_base = benign rows x 512)
           + attention 12·L·S·(heads·head_dim)·T_adapted + 4·L·S·(heads·head_dim)·T_base
             (full S x S score and value matmuls, not halved for causality, as PaLM counts)
           + the LM head, 6·D·V (2·D·V frozen) per position the loss reads (48 target
             positions per row, + 1 first-token position per harmful row).
  forward  = 2·N·T + 4·L·S·(heads·head_dim)·T + 2·D·V·T.
Recomputation under remat is not counted (MFU, not hardware FLOP utilisation). The
frozen kernels get no weight gradient with LoRA, so the step needs about 4·N per adapted
token, not 6·N: `useful` shows that count's share of the peak beside the MFU.

Each model runs in its own process (a clean peak-memory count, and an out-of-memory or a
stuck compile costs one model, not the table); an error in a row (out of memory included)
is printed in its place, and rows that would start after the time limit (--time_limit,
default 480 s in all) are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from a plain checkout, without `pip install -e .`
  sys.path.insert(0, str(REPO))

# config.json values of the real models (only the fields our ModelConfig reads).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                      rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False),
    "llama3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048,
                        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                        rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, "factor": 32.0},
                        tie_word_embeddings=True),
    # --toy: the same code on CPU in seconds (an untied and a tied model, as above).
    "toy-untied": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, rms_norm_eps=1e-5, rope_theta=500000.0,
                       rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False),
    "toy-tied": dict(model_type="llama", vocab_size=384, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                     tie_word_embeddings=True),
}

# configs/llama3_8b_pod.py (its global batch; model and training settings) and the
# configs/default.py fields it inherits. Spelled out because the accelerator machine
# may lack ml_collections; tests/test_bench_accelerator.py checks them against the files.
POD = dict(harmful_per_step=64, benign_per_step=64, pairs_per_step=128, dtype="bfloat16",
           param_dtype="bfloat16", remat="full", max_response_tokens=32)
ADAPTERS = dict(lora_rank=8, lora_alpha=16.0, lora_dropout=0.0, embed_mlp=True,
                embed_mlp_hidden=256, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"))
LOSS = dict(w_safety=1.0, lam=1.0, w_capability=5.0, consistency_repr="refusal_prob",
            scorer="first_token", capability="kl", kl_direction="forward",
            max_target_tokens=48, capability_first_token_weight=20.0,
            safety_first_token_weight=5.0)
TRAIN = dict(lr=2e-4, warmup_steps=50, steps=1000, weight_decay=0.0, clip_norm=1.0,
             end_lr_frac=0.0)
REFUSAL_OPENERS = 16  # first-token scorer: how many refusal opener ids (random here)

# Dense bfloat16 matmul peak (FLOP/s) and HBM bandwidth (B/s) by device kind, from the
# vendors' data sheets; the first key contained in device_kind wins. Unlisted devices
# (the CPU) get both measured: a large matmul and a device-to-device copy.
DEVICES = [("H200", 989e12, 4.8e12), ("H100 PCIe", 756e12, 2.0e12), ("H100 NVL", 835e12, 3.9e12),
           ("H100", 989e12, 3.35e12), ("A100-SXM4-80GB", 312e12, 2.039e12),
           ("A100 80GB PCIe", 312e12, 1.935e12), ("A100", 312e12, 1.555e12),
           ("L40S", 362e12, 0.864e12), ("TPU v6", 918e12, 1.64e12),
           ("TPU v5p", 459e12, 2.765e12), ("TPU v5", 197e12, 0.819e12),
           ("TPU v4", 275e12, 1.2e12)]


class Cfg(dict):
  """Attribute access over a dict: what train.step reads from config.train."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None


# ----------------------------------------------------------------------------
# The objective. One place to change when the loss moves.


def objective(trainable, frozen, batch, rng, *, model_cfg):
  """Our training loss: the semsafe method's combined objective on LoRA + embedding MLP."""
  from semsafe_jax.methods import semsafe
  spec = semsafe.LossSpec(**LOSS)
  return semsafe.loss(trainable, frozen, semsafe.SemsafeBatch(safety=batch), rng, spec=spec,
                      model_cfg=model_cfg, adapter_cfg=ADAPTERS)


def make_batch(rng, cfg, rows_h: int, rows_b: int, pairs: int, seq: int, response: int):
  """A SafetyBatch of random tokens: each row a (seq - response)-token prompt, then the
  response the loss reads; pairs link harmful rows in disjoint couples."""
  from semsafe_jax.methods.base import Pairs, SafetyBatch, Tokens

  def tokens(rows):
    ids = rng.integers(0, cfg.vocab_size, (rows, seq), dtype=np.int32)
    target = np.zeros((rows, seq), bool)
    target[:, seq - response:] = True
    return Tokens(ids=ids, mask=np.ones((rows, seq), bool), target_mask=target,
                  prompt_end=np.full((rows,), seq - response - 1, np.int32),
                  weight=np.ones((rows,), np.float32))
  idx = np.arange(2 * pairs, dtype=np.int32).reshape(pairs, 2) % max(rows_h, 1)
  return SafetyBatch(harm=tokens(rows_h), benign=tokens(rows_b),
                     pairs=Pairs(index=idx, weight=np.full((pairs,), 0.8, np.float32),
                                 valid=np.ones((pairs,), bool)))


# ----------------------------------------------------------------------------
# FLOP counts (see the module docstring).


def non_embedding_params(cfg) -> int:
  D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  NH, KH = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return L * (D * NH + 2 * D * KH + NH * D + 3 * D * F)


def train_flops(cfg, rows_h: int, rows_b: int, seq: int, per_adapted_token: int = 6) -> float:
  N, L, NH = non_embedding_params(cfg), cfg.num_layers, cfg.num_heads * cfg.head_dim
  head = 2 * cfg.hidden_size * cfg.vocab_size
  n = max(1, min(LOSS["max_target_tokens"], seq - 1))
  t_adapted, t_base = (rows_h + rows_b) * seq, rows_b * seq
  blocks = per_adapted_token * N * t_adapted + 2 * N * t_base
  attn = 12 * L * seq * NH * t_adapted + 4 * L * seq * NH * t_base
  lm = 3 * head * (rows_h * (n + 1) + rows_b * n) + head * rows_b * n
  return float(blocks + attn + lm)


def forward_flops(cfg, rows: int, seq: int) -> float:
  t = rows * seq
  NH = cfg.num_heads * cfg.head_dim
  return float(2 * non_embedding_params(cfg) * t + 4 * cfg.num_layers * seq * NH * t
               + 2 * cfg.hidden_size * cfg.vocab_size * t)


def decode_weight_bytes(cfg) -> int:
  """Bytes one decode step reads from the weights: blocks, norms, final norm, LM head."""
  from semsafe_jax.models import transformer
  itemsize = np.dtype(cfg.param_dtype).itemsize
  total = 0
  for path, (shape, _) in transformer.param_specs(cfg).items():
    if path == "embed/embedding" and not cfg.tie_word_embeddings:
      continue  # the lookup reads B rows; the untied head is counted as lm_head/kernel
    total += math.prod(shape)
  return total * itemsize


# ----------------------------------------------------------------------------
# Measurement helpers.


def device_figures(dtype) -> tuple[float, float, str]:
  """(peak FLOP/s, HBM bytes/s, where they came from) for device 0."""
  import jax
  import jax.numpy as jnp
  kind = jax.devices()[0].device_kind
  for key, flops, bw in DEVICES:
    if key.lower() in kind.lower():
      return flops, bw, f"data sheet ({key})"
  # Measured: a square matmul in the compute dtype, and a copy (read + write).
  n = 1024 if jax.default_backend() == "cpu" else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  mm = jax.jit(lambda x: x @ x)
  flops = 2 * n**3 / _best_time(lambda: mm(a))
  x = jnp.ones((64 << 20) // 4 if jax.default_backend() == "cpu" else (1 << 30) // 4, jnp.float32)
  cp = jax.jit(lambda v: v + 1)
  bw = 2 * x.nbytes / _best_time(lambda: cp(x))
  return flops, bw, "measured (matmul, copy)"


def _best_time(fn, reps: int = 5) -> float:
  fn().block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    fn().block_until_ready()
    best = min(best, time.perf_counter() - t)
  return best


def _timed(fn, reps: int, deadline: float) -> tuple[float, int]:
  """(median seconds of fn() over up to `reps` calls, calls made), after one warm-up call
  (the compile). Stops early at the deadline, after at least one timed call."""
  import jax
  jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
    if time.time() > deadline:
      break
  times.sort()
  return times[len(times) // 2], len(times)


def _peak_bytes() -> int | None:
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _error_text(e: BaseException) -> str:
  msg = str(e)
  if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
    return "out of memory: " + next((l for l in msg.splitlines() if l.strip()), "")[:160]
  return f"{type(e).__name__}: " + next((l for l in msg.splitlines() if l.strip()), "")[:160]


# ----------------------------------------------------------------------------
# One model, in its own process: prints one JSON line per row.


def init_params(cfg, seed: int = 0):
  """Random params of cfg's shapes, made on the device in param_dtype (no host copy)."""
  import jax
  import jax.numpy as jnp

  from semsafe_jax.models import transformer
  specs = sorted(transformer.param_specs(cfg).items())

  def make(key):
    out: dict[str, Any] = {}
    for k, (path, (shape, _)) in zip(jax.random.split(key, len(specs)), specs):
      if path.endswith("scale"):
        v = jnp.ones(shape, cfg.param_dtype)
      else:
        # Drawn in param_dtype: no float32 copy of an 8B model's largest tensors.
        v = 0.02 * jax.random.normal(k, shape, cfg.param_dtype)
      node = out
      *parents, leaf = path.split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = v
    return out
  return jax.jit(make)(jax.random.key(seed))


def run_model(name: str, args) -> None:
  import jax
  import jax.numpy as jnp

  from semsafe_jax import adapters as adapters_lib
  from semsafe_jax.models import config as config_lib
  from semsafe_jax.models import generate as gen_lib
  from semsafe_jax.models import transformer
  from semsafe_jax.train import step as step_lib

  deadline = args.deadline
  cfg = config_lib.from_hf_dict(SHAPES[name], dtype=POD["dtype"],
                                param_dtype=POD["param_dtype"], remat=POD["remat"])
  peak_flops, bw, source = device_figures(jnp.dtype(cfg.dtype))
  emit = lambda **row: print(json.dumps({"model": name, **row}), flush=True)
  emit(row="device", kind=jax.devices()[0].device_kind, backend=jax.default_backend(),
       peak_flops=peak_flops, bandwidth=bw, source=source, jax=jax.__version__,
       params=int(sum(math.prod(s) for s, _ in transformer.param_specs(cfg).values())),
       non_embedding=non_embedding_params(cfg))
  rows_h = POD["harmful_per_step"] // args.pod_devices if not args.toy else 2
  rows_b = POD["benign_per_step"] // args.pod_devices if not args.toy else 2
  pairs = POD["pairs_per_step"] // args.pod_devices if not args.toy else 2
  seq, response = args.seq, POD["max_response_tokens"] if not args.toy else 8
  rng = np.random.default_rng(0)
  params = init_params(cfg)
  jax.block_until_ready(params)
  key = jax.random.key(0)

  def row(kind: str, fn) -> None:
    if time.time() > deadline:
      emit(row=kind, error="skipped: past the time limit")
      return
    t0 = time.time()
    try:
      emit(row=kind, **fn(), wall_s=round(time.time() - t0, 1))
    except Exception as e:  # noqa: BLE001  (out of memory and friends: a table cell)
      emit(row=kind, error=_error_text(e), wall_s=round(time.time() - t0, 1))

  def train():
    trainable = adapters_lib.init_adapters(ADAPTERS, cfg, params, key)
    optimizer, schedule = step_lib.make_optimizer(Cfg(TRAIN))
    state = step_lib.init_state(trainable, optimizer, seed=0)
    aux = {"refusal_token_ids": rng.choice(cfg.vocab_size, REFUSAL_OPENERS,
                                           replace=False).astype(np.int32),
           "refusal_token_weights": np.ones((REFUSAL_OPENERS,), np.float32)}
    frozen = {"base": params, "aux": jax.device_put(aux)}
    batch = jax.device_put(make_batch(rng, cfg, rows_h, rows_b, pairs, seq, response))
    loss_fn = lambda t, f, b, r: objective(t, f, b, r, model_cfg=cfg)
    step = step_lib.TrainStep(loss_fn, optimizer, schedule, donate=True)
    holder = {"state": state}

    def once():
      holder["state"], m = step(holder["state"], frozen, batch)
      return m["loss"]
    sec, n = _timed(once, args.reps, deadline)
    loss = float(once())
    # bfloat16 compute; the adapters and the optimizer state stay float32.
    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(
        (holder["state"].trainable, holder["state"].opt_state))
                     if jnp.issubdtype(x.dtype, jnp.floating)})
    flops = train_flops(cfg, rows_h, rows_b, seq)
    useful = train_flops(cfg, rows_h, rows_b, seq, per_adapted_token=4)
    return dict(batch=f"{rows_h}+{rows_b} x {seq}", tokens_s=(rows_h + rows_b) * seq / sec,
                step_ms=sec * 1e3, mfu=flops / sec / peak_flops,
                useful=useful / sec / peak_flops, peak_bytes=_peak_bytes(), reps=n,
                loss=loss, trainable_dtypes=dtypes, tflop=flops / 1e12,
                tflop_useful=useful / 1e12)

  def forward():
    rows = rows_h + rows_b
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (rows, seq), dtype=np.int32))
    fwd = jax.jit(lambda p, i: transformer.forward(p, cfg, i).logits)
    sec, n = _timed(lambda: fwd(params, ids), args.reps, deadline)
    return dict(batch=f"{rows} x {seq}", tokens_s=rows * seq / sec, step_ms=sec * 1e3,
                mfu=forward_flops(cfg, rows, seq) / sec / peak_flops, reps=n)

  def generate():
    B, P, N = args.gen_batch, args.gen_prompt, args.gen_tokens
    ids = rng.integers(0, cfg.vocab_size, (B, P), dtype=np.int32)
    mask = np.ones((B, P), bool)
    embed = gen_lib.as_embed_partial(adapters_lib.adapted_embed_fn(
        adapters_lib.init_adapters(ADAPTERS, cfg, params, key)))
    stop = np.full((1,), -1, np.int32)  # never matches: all N tokens are decoded
    call = lambda: gen_lib.decode(params, embed, ids, mask, stop, key, np.int32(0), cfg=cfg,
                                  max_new_tokens=N, sampling=gen_lib.Sampling())
    sec, n = _timed(call, max(1, args.reps // 2), deadline)
    steps = int(call()[3])
    wbytes = decode_weight_bytes(cfg)
    bound = B * bw / wbytes  # tokens/s if each step only streamed the weights once
    return dict(batch=f"{B} x ({P} + {N})", tokens_s=B * N / sec, step_ms=sec * 1e3 / N,
                bound_tokens_s=bound, weight_bytes=wbytes, decode_steps=steps, reps=n)

  # The train row first: the peak-memory count is the process's high-water mark.
  for kind, fn in (("train", train), ("forward", forward), ("generate", generate)):
    if kind in args.rows:
      row(kind, fn)


# ----------------------------------------------------------------------------
# The driver: one process per model, one table.


def _si(x: float, unit: str = "") -> str:
  """'26 GFLOP/s', '214 kB', '8.03G': figures that span toy and real shapes."""
  for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0)):
    if abs(x) >= scale or not prefix:
      return f"{x / scale:.3g} {prefix}{unit}" if unit else f"{x / scale:.3g}{prefix}"
  return str(x)


def _fmt_row(r: dict[str, Any]) -> str:
  head = f"{r['model']:<12} {r['row']:<9}"
  if "error" in r:
    return f"{head} {r['error']}"
  line = f"{head} {r['batch']:<18} {r['tokens_s']:>11,.0f} {r['step_ms']:>10.1f}"
  if r["row"] == "generate":
    ratio = r["bound_tokens_s"] / r["tokens_s"]
    return (line + f"   bandwidth bound {r['bound_tokens_s']:,.0f} tok/s "
            f"({_si(r['weight_bytes'], 'B')} of weights per step); {ratio:.2f}x its time "
            "(target <= 2x)")
  line += f" {100 * r['mfu']:>6.1f}%"
  if r["row"] == "train":
    peak = r.get("peak_bytes")  # None where the backend keeps no count (the CPU)
    line += (f" {100 * r['useful']:>6.1f}% {f'{peak / 2**30:.2f}' if peak else '-':>8}"
             f"   loss {r['loss']:.3f}; adapters + optimizer {'/'.join(r['trainable_dtypes'])}")
  return line


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--toy", action="store_true", help="toy shapes (CPU, under 2 minutes)")
  ap.add_argument("--models", default="", help="comma-separated; default: the two real "
                  "shapes, or the toy ones with --toy. Known: " + ", ".join(SHAPES))
  ap.add_argument("--rows", default="train,forward,generate")
  ap.add_argument("--time_limit", type=float, default=480.0, help="seconds, all models")
  ap.add_argument("--pod_devices", type=int, default=8,
                  help="devices the pod config's global batch is split over")
  ap.add_argument("--seq", type=int, default=None, help="default 512 (--toy: 32)")
  ap.add_argument("--reps", type=int, default=None, help="timed calls per row")
  ap.add_argument("--gen_batch", type=int, default=None, help="default 64 (--toy: 4)")
  ap.add_argument("--gen_prompt", type=int, default=None, help="default 128 (--toy: 8)")
  ap.add_argument("--gen_tokens", type=int, default=None, help="default 256 (--toy: 8)")
  ap.add_argument("--json", default="", help="also write the rows to this JSON file")
  ap.add_argument("--model_worker", default="", help=argparse.SUPPRESS)  # internal
  ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)  # internal
  args = ap.parse_args(argv)
  toy = args.toy
  defaults = dict(seq=(32, 512), reps=(2, 5), gen_batch=(4, 64), gen_prompt=(8, 128),
                  gen_tokens=(8, 256))
  for k, (t, real) in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, t if toy else real)
  args.rows = [r for r in args.rows.split(",") if r]
  bad = [r for r in args.rows if r not in ("train", "forward", "generate")]
  models = [m for m in args.models.split(",") if m] or (
      ["toy-untied", "toy-tied"] if toy else ["llama3.2-1b", "llama3-8b"])
  unknown = [m for m in models if m not in SHAPES]
  if bad or unknown:
    ap.error(f"unknown rows {bad} (allowed: train, forward, generate)" if bad else
             f"unknown models {unknown} (allowed: {', '.join(SHAPES)})")
  if args.pod_devices < 1 or POD["harmful_per_step"] % args.pod_devices:
    ap.error(f"--pod_devices={args.pod_devices} must divide the pod batch "
             f"({POD['harmful_per_step']} rows)")

  if args.model_worker:
    run_model(args.model_worker, args)
    return 0

  start = time.time()
  deadline = start + args.time_limit
  results: list[dict[str, Any]] = []
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  if toy:  # CPU, and XLA's optimisation passes off: compiles dominate toy shapes
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  for i, name in enumerate(models):
    # Each model may use what the ones before left of the time, but leaves the models after
    # it a fair share of the rest.
    left = deadline - time.time()
    model_deadline = time.time() + left / (len(models) - i) * (1.0 if i == len(models) - 1
                                                                 else 0.8)
    cmd = [sys.executable, __file__, "--model_worker", name, "--deadline", str(model_deadline),
           "--rows", ",".join(args.rows), "--pod_devices", str(args.pod_devices),
           "--seq", str(args.seq), "--reps", str(args.reps), "--gen_batch", str(args.gen_batch),
           "--gen_prompt", str(args.gen_prompt), "--gen_tokens", str(args.gen_tokens)]
    if toy:
      cmd.append("--toy")
    seen = set()
    try:
      # A row can overrun its deadline (a compile, a slow step): the process gets 60 s more.
      proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False,
                            timeout=max(model_deadline - time.time(), 1) + 60)
      out, err, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
      out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
      err, code = "timed out", "timeout"
    for line in out.splitlines():
      if line.startswith("{"):
        r = json.loads(line)
        results.append(r)
        seen.add(r["row"])
    for kind in args.rows:
      if kind not in seen:
        tail = (err or "").strip().splitlines()[-1:] or [""]
        results.append({"model": name, "row": kind,
                        "error": f"process ended ({code}) before this row: {tail[0][:160]}"})

  dev = next((r for r in results if r["row"] == "device"), None)
  print(f"bench_accelerator: {'toy shapes' if toy else 'real shapes'}, "
        f"{time.time() - start:.0f} s of {args.time_limit:.0f} s")
  if dev:
    print(f"device: {dev['kind']} ({dev['backend']}), jax {dev['jax']}; peak "
          f"{_si(dev['peak_flops'], 'FLOP/s')}, memory bandwidth {_si(dev['bandwidth'], 'B/s')} "
          f"({dev['source']})")
  print(f"compute {POD['dtype']}, remat {POD['remat']}, LoRA r={ADAPTERS['lora_rank']} on "
        f"{len(ADAPTERS['lora_targets'])} projections + embedding MLP "
        f"({ADAPTERS['embed_mlp_hidden']}); "
        + ("toy batch" if toy else f"pod batch {POD['harmful_per_step']}+"
           f"{POD['benign_per_step']} rows over {args.pod_devices} devices"))
  for r in results:
    if r["row"] == "device":
      print(f"  {r['model']}: {_si(r['params'])} params, N = {_si(r['non_embedding'])} "
            "non-embedding")
  print(f"{'model':<12} {'row':<9} {'batch':<18} {'tokens/s':>11} {'ms/step':>10} "
        f"{'MFU':>7} {'useful':>7} {'peak GiB':>8}")
  for r in results:
    if r["row"] != "device":
      print(_fmt_row(r))
  print("MFU: model FLOPs (6N per adapted token + 2N per frozen-forward token + attention + "
        "LM head) / time / peak; useful: 4N per adapted token (LoRA forms no frozen-weight "
        "gradient). generate: ms per new token, prefill included.")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
