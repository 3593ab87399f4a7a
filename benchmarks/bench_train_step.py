"""Train-step throughput: our jit LoRA step vs PyTorch + PEFT on the same model.

  HF_HUB_OFFLINE=1 python benchmarks/bench_train_step.py [--reps 5] [--target_tokens 32]

SmolLM2-135M-Instruct (the embedded GGUF, dequantised to float32 on both
sides), LoRA rank 16 / alpha 32 on q_proj and v_proj, AdamW, batch 8 x 128,
float32, same CPU (torch uses one thread per core). One step = forward,
backward, optimizer update.

  torch:            PEFT LoRA, LM loss on all tokens (labels = input ids),
                    grad-norm clipping + AdamW as ours.
  ours (all):       `train.step.TrainStep`, the same LM loss on all tokens.
  ours (targets):   the step our losses run: the LM head and loss only on the
                    response tokens (the last --target_tokens of each row),
                    via forward(compute_logits=False) + lm_head on the
                    gathered positions.

Reports tokens/s (batch tokens per second), the ratio to torch, achieved
useful FLOP/s as a fraction of a float32 matmul peak measured in the same run,
peak host memory of each contender alone, and the same ratios in CPU seconds
per step (robust to other processes on a shared machine). Useful FLOPs count
the work the loss needs: forward matmuls and attention, activation gradients,
and LoRA gradients as PEFT forms them (through x@a and (xa)@b), never a frozen
weight's gradient. Ours runs LoRA unmerged, as the training loss does
(`apply_adapters(merge=False)`). Timings are medians of --reps steps,
interleaved across the contenders so machine load hits them alike.

Both contenders run in one process, so under the same host allocator: the
caching malloc our entry points use (semsafe_jax/malloc.py), or glibc's with
--malloc system. The header names it.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from semsafe_jax import malloc
from semsafe_jax.adapters import lora as lora_lib
from semsafe_jax.models import transformer
from semsafe_jax.models.config import LAYER_LOOPS
from semsafe_jax.models.loading import load_config, load_pretrained
from semsafe_jax.models.registry import embedded_gguf_path
from semsafe_jax.train import step as step_lib

RANK, ALPHA, TARGETS = 16, 32.0, ("q_proj", "v_proj")


def matmul_peak_seconds(n: int = 2048):
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()

  def run():
    t, c = time.perf_counter(), time.process_time()
    f(a, b).block_until_ready()
    return time.perf_counter() - t, time.process_time() - c
  return run, 2 * n**3


def useful_flops(cfg, B: int, T: int, loss_tokens: int) -> float:
  """Matmul FLOPs a LoRA train step needs (causal attention as full T x T blocks)."""
  D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
  NH, KH = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  proj = 2 * (D * NH + 2 * D * KH + NH * D + 3 * D * F)  # per token, per layer
  attn = 4 * T * NH
  lora_fwd = sum(2 * RANK * (D + out) for out in (NH, KH))  # x@a, (xa)@b for q and v
  per_token = L * (2 * proj + 3 * attn + 3 * lora_fwd)  # fwd + activation grads (+ LoRA grads)
  head = 2 * 2 * D * V  # logits and their input gradient
  return B * T * per_token + B * loss_tokens * head


class Ours:
  """Our TrainStep on a LoRA CE loss (LoRA unmerged, as the methods train it)."""

  def __init__(self, cfg, params, ids, loss_tokens: int, lr: float):
    T = ids.shape[1]
    self.frozen = jax.device_put(params)
    lora = lora_lib.init_lora(params, list(TARGETS), RANK, jax.random.key(0))
    scale = ALPHA / RANK
    # Labels: next token. All-token loss: positions 0..T-2; targets: the last K.
    K = T - 1 if loss_tokens >= T - 1 else loss_tokens
    pos_K = np.arange(T - 1 - K, T - 1)

    def loss_fn(trainable, frozen, batch, rng):
      del rng
      p = lora_lib.apply_lora(frozen, trainable, scale, merge=False)
      ids_BxT = batch["ids"]
      labels_BxK = ids_BxT[:, pos_K + 1]
      if K == T - 1:
        logits = transformer.forward(p, cfg, ids_BxT).logits[:, :-1]
      else:  # the LM head only where the loss reads it
        h = transformer.forward(p, cfg, ids_BxT, compute_logits=False).hidden
        logits = transformer.lm_head(p, cfg, h[:, pos_K])
      logz = jax.nn.logsumexp(logits, axis=-1)
      gold = jnp.take_along_axis(logits, labels_BxK[..., None], axis=-1)[..., 0]
      loss = jnp.mean(logz - gold)
      return loss, {"l_ce": loss}

    c = ml_collections.ConfigDict(dict(steps=1000, lr=lr, warmup_steps=0, weight_decay=0.0,
                                       clip_norm=1.0))
    optimizer, schedule = step_lib.make_optimizer(c)
    self.state = step_lib.init_state(lora, optimizer, seed=0)
    self.step = step_lib.TrainStep(loss_fn, optimizer, schedule)
    self.batch = {"ids": jnp.asarray(ids)}

  def __call__(self) -> float:
    self.state, m = self.step(self.state, self.frozen, self.batch)
    return float(m["loss"])  # blocks until the step is done


class Torch:
  """transformers + PEFT LoRA, AdamW, LM loss on all tokens."""

  def __init__(self, ids, lr: float):
    import peft  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    path, _ = embedded_gguf_path("smollm2-135m-instruct")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.config.use_cache = False
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                          target_modules=list(TARGETS), task_type="CAUSAL_LM")
    self.model = peft.get_peft_model(model, cfg).train()
    self.trainable = [p for p in self.model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(self.trainable, lr=lr, weight_decay=0.0)
    self.clip = torch.nn.utils.clip_grad_norm_
    self.ids = torch.from_numpy(ids.astype(np.int64))

  def __call__(self) -> float:
    out = self.model(input_ids=self.ids, labels=self.ids)
    out.loss.backward()
    self.clip(self.trainable, 1.0)  # as our step: global-norm clipping, then AdamW
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def build(name: str, cfg, ids: np.ndarray, target_tokens: int, lr: float):
  if name == "torch+peft":
    return Torch(ids, lr)
  pre = load_pretrained("smollm2-135m-instruct", dtype="float32", param_dtype="float32",
                        tokenizer=False)
  k = ids.shape[1] if name == "ours (all)" else target_tokens
  return Ours(cfg, pre.params, ids, k, lr)


def _own_peak_rss_gib() -> float:
  # VmHWM restarts at exec; ru_maxrss would carry the parent's peak over a fork.
  try:
    with open("/proc/self/status") as f:
      kib = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    return kib / 2**20
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_rss_gib(name: str, args) -> float:
  """Peak host memory of one contender alone (a fresh process: build, 2 steps)."""
  cmd = [sys.executable, __file__, "--memory_of", name, "--batch", str(args.batch),
         "--seq", str(args.seq), "--target_tokens", str(args.target_tokens),
         "--remat", args.remat, "--layer_loop", args.layer_loop]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
  return float(out.strip().splitlines()[-1])


def _print_rows(seconds: dict[str, float], describe, useful_gflop, unit: str, peak: float,
                peak_name: str, extra=lambda name: "") -> None:
  """One line per contender: describe(seconds), the ratio to torch, and for ours the
  useful GFLOP rate (useful_gflop(name) / seconds) as a share of the matmul peak."""
  ref = seconds.get("torch+peft")
  for name, sec in seconds.items():
    line = f"    {name:19s} {describe(sec)}"
    if ref is not None and not name.startswith("torch"):
      line += f"  {ref / sec:.2f}x torch"
    if name.startswith("ours"):
      rate = useful_gflop(name) / sec
      line += f"  useful {rate:,.0f} {unit} = {rate / peak:.0%} of {peak_name}"
    print(line + extra(name))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--target_tokens", type=int, default=32)
  ap.add_argument("--remat", default="off", help="ours: model.remat (off | full | dots)")
  ap.add_argument("--layer_loop", choices=LAYER_LOOPS, default="auto",
                  help="ours: model.layer_loop (auto unrolls on CPU)")
  ap.add_argument("--malloc", choices=malloc.CHOICES, default=None,
                  help=f"host allocator for both contenders (default: ${malloc.ENV} or auto)")
  ap.add_argument("--skip_torch", action="store_true")
  ap.add_argument("--skip_memory", action="store_true")
  ap.add_argument("--memory_of", default="", help=argparse.SUPPRESS)  # internal
  args = ap.parse_args()
  malloc.reexec(args.malloc)  # both contenders run in this process, so under the same allocator
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  B, T, lr = args.batch, args.seq, 1e-4
  cfg = load_config("smollm2-135m-instruct", dtype="float32", param_dtype="float32",
                    remat=args.remat, layer_loop=args.layer_loop)
  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (B, T)).astype(np.int32)
  targets_name = f"ours (targets {args.target_tokens})"
  names = ["ours (all)", targets_name] + ([] if args.skip_torch else ["torch+peft"])

  if args.memory_of:
    f = build(args.memory_of, cfg, ids, args.target_tokens, lr)
    f(), f()
    print(_own_peak_rss_gib())
    return

  contenders = {n: build(n, cfg, ids, args.target_tokens, lr) for n in names}
  peak_run, peak_flops = matmul_peak_seconds()
  print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}, jax {jax.__version__}, "
        f"torch {torch.__version__}, allocator {malloc.active()}, "
        f"load avg {os.getloadavg()[0]:.1f}")
  first = {name: f() for name, f in contenders.items()}  # compile / warm up
  wall = {name: [] for name in contenders}
  cpu = {name: [] for name in contenders}
  peak_wall, peak_cpu = [], []
  for _ in range(args.reps):
    for name, f in contenders.items():
      time.sleep(0.5)  # lets torch's OpenMP workers stop spinning before the next timing
      t, c = time.perf_counter(), time.process_time()
      f()
      wall[name].append(time.perf_counter() - t)
      cpu[name].append(time.process_time() - c)
    runs = [peak_run() for _ in range(3)]
    peak_wall.append(min(w for w, _ in runs))
    peak_cpu.append(min(c for _, c in runs))
  med = lambda xs: statistics.median(xs)
  peak_gflops = peak_flops / med(peak_wall) / 1e9
  peak_per_cpu_s = peak_flops / med(peak_cpu) / 1e9
  load = os.getloadavg()[0]
  memory = {} if args.skip_memory else {n: peak_rss_gib(n, args) for n in names}

  loop = "unrolled" if transformer.unrolls_layers(cfg) else "scanned"
  print(f"step: batch {B} x {T}, LoRA r={RANK} on {'+'.join(TARGETS)}, AdamW, float32, "
        f"remat {args.remat}, layers {loop}; "
        f"median of {args.reps}; first-step losses "
        + ", ".join(f"{k} {v:.4f}" for k, v in first.items()))
  useful = lambda name: useful_flops(
      cfg, B, T, T - 1 if name == "ours (all)" else args.target_tokens) / 1e9
  print("  wall clock:")
  _print_rows({n: med(ts) for n, ts in wall.items()},
              lambda t: f"{B * T / t:7,.0f} tok/s ({t * 1e3:7.1f} ms/step)", useful,
              "GFLOP/s", peak_gflops, "peak",
              lambda name: f"  peak RSS {memory[name]:.2f} GiB" if name in memory else "")
  print(f"    float32 2048^2 matmul peak (same run): {peak_gflops:,.0f} GFLOP/s")
  # CPU seconds (all threads) are far less sensitive to other processes on the
  # machine than wall time; torch's OpenMP spin-waiting counts as CPU time too
  # (set OMP_WAIT_POLICY=PASSIVE to exclude it on a busy machine).
  print("  CPU time (all threads):")
  _print_rows({n: med(cs) for n, cs in cpu.items()}, lambda c: f"{c:6.2f} CPU-s/step", useful,
              "GFLOP per CPU-s", peak_per_cpu_s, "the matmul's")
  print(f"    matmul: {peak_per_cpu_s:,.0f} GFLOP per CPU-s; load avg {load:.1f} at the end "
        f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')})")


if __name__ == "__main__":
  main()
