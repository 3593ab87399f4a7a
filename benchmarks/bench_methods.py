"""Seconds per train step of every training method, each through its own `prepare` and `fit`.

  HF_HUB_OFFLINE=1 python benchmarks/bench_methods.py --workdir=runs/bench_methods \
      [--methods=semsafe,lora_sft,...] [--reps=6] [--base=tiny] [--json=FILE] \
      [-- --config.FIELD=VALUE ...]

Per method, in a process of its own (so each peak host memory is its own):
`configs/methods/<name>.py` plus the flags after `--`, the main job's data and model stage, the
method's real `prepare(ctx)` (its host stages: base-model answers, references, rewrites),
then the shared trainer's `fit` for 2 + reps steps. A step's time is the interval between
two consecutive `batch_fn` calls inside `fit` (which reads step s-1's metrics before or,
with train.overlap_steps on, after it queues step s): in steady state, one step of the
real loop (batch building, host-to-device, the jitted update, metric read-back). The
first two intervals (compilation) are dropped; the table gives the medians of the rest in
wall and CPU seconds, the ratio to the first method, and the process's peak host memory
(prepare and model included).

Host stages are cached in `<workdir>/shared` (every method's config gets
`data.cache_dir`, `eval.cache_dir` and `shared_dir` there), so a second run only times.
A method whose prepare would generate paraphrases with the model (paraphrase_aug's default,
30-50 minutes on 2 cores) can be given `--config.method.paraphrases_per_prompt=0`: its
variants are then rule rewrites, with rows of the same shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

DEFAULT_METHODS = ("semsafe", "lora_sft", "full_ft", "dpo", "safedpo", "paraphrase_aug",
                   "contrastive", "circuit_breakers", "deep_alignment")
WARM = 2  # intervals dropped: the first steps compile


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


class _Clock:
  """Wraps batch_fn: records wall and CPU time at each call (one call per step)."""

  def __init__(self, batch_fn):
    self.batch_fn, self.wall, self.cpu = batch_fn, [], []

  def __call__(self, step):
    self.wall.append(time.perf_counter())
    self.cpu.append(cpu_seconds())
    return self.batch_fn(step)

  def intervals(self) -> tuple[list[float], list[float]]:
    d = lambda xs: [b - a for a, b in zip(xs, xs[1:])][WARM:]
    return d(self.wall), d(self.cpu)


def prepare(method: str, workdir: str, base: str | None, flags: list[str], wd_name: str = ""):
  """(config, workdir, mesh, ctx, prepared, prepare seconds): one method as the main job
  builds it, through its real `prepare`.

  Host stages are cached in `<workdir>/shared`; the method's own workdir is
  `<workdir>/<wd_name or method>`, its checkpoints removed (a benchmark never resumes).
  """
  # Imports here: the parent process only orchestrates and stays light.
  from semsafe_jax import methods  # pylint: disable=g-import-not-at-top
  from semsafe_jax.experiments import grid  # pylint: disable=g-import-not-at-top
  from semsafe_jax.jobs import train as train_job  # pylint: disable=g-import-not-at-top
  from semsafe_jax.train import sharding  # pylint: disable=g-import-not-at-top

  shared = os.path.join(workdir, "shared")
  wd = os.path.join(workdir, wd_name or method)
  path = os.path.join("configs", "methods", f"{method}.py") + (f":{base}" if base else "")
  config = grid.parse_config(path, [
      f"--config.data.cache_dir={shared}/cache", f"--config.eval.cache_dir={shared}/eval",
      f"--config.shared_dir={shared}", *flags, "--config.checkpoint.every=1000000",
      "--config.train.progress=False", "--config.overwrite=True"])
  if int(config.train.get("grad_accum", 1)) != 1:  # then batch_fn runs per micro-step
    raise SystemExit("bench: times one batch_fn call per step; use train.grad_accum=1")
  shutil.rmtree(os.path.join(wd, "checkpoints"), ignore_errors=True)
  t0 = time.time()
  mesh = sharding.make_mesh(dict(config.train.get("mesh", {}) or {}))
  ctx = train_job.method_context(config, wd, mesh)  # as the main job builds it
  # prepare sees the configured run's train.steps (packed rows are planned over all of its
  # batches, so the timed steps have the real run's shapes).
  prepared = methods.get(config.method.name).prepare(ctx)
  return config, wd, mesh, ctx, prepared, time.time() - t0


def one(method: str, workdir: str, reps: int, base: str | None, flags: list[str]) -> dict:
  """Prepares and trains one method; returns its timings (runs in its own process)."""
  from semsafe_jax import adapters as adapters_lib  # pylint: disable=g-import-not-at-top
  from semsafe_jax import malloc  # pylint: disable=g-import-not-at-top
  from semsafe_jax.train.trainer import fit  # pylint: disable=g-import-not-at-top

  config, wd, mesh, ctx, prepared, prepare_s = prepare(method, workdir, base, flags)
  config.train.steps = WARM + 1 + reps  # fit runs only a few of the planned steps
  n_trainable = adapters_lib.param_summary(prepared.trainable, ctx.params)["trainable"]
  clock = _Clock(prepared.batch_fn)
  fit(prepared.loss_fn, prepared.trainable, clock, config, wd, frozen=prepared.frozen,
      frozen_axes=prepared.frozen_axes, mesh=mesh)
  wall, cpu = clock.intervals()
  return {"method": method, "wall": wall, "cpu": cpu, "prepare_s": prepare_s,
          "trainable": int(n_trainable), "allocator": malloc.active(),
          "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
  """(the script's own arguments, the config flags after "--")."""
  if "--" not in argv:
    return argv, []
  i = argv.index("--")
  return argv[:i], argv[i + 1:]


def main():
  argv, flags = split_argv(sys.argv[1:])
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
  ap.add_argument("--reps", type=int, default=6, help="timed steps per method")
  ap.add_argument("--base", default=None, help="config the method files build on, e.g. tiny")
  ap.add_argument("--json", default=None, help="also write the per-method results here")
  ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one method
  args = ap.parse_args(argv)
  if args.reps < 1:
    ap.error(f"--reps={args.reps}: must be >= 1")
  names = [m for m in args.methods.split(",") if m]
  from semsafe_jax import malloc  # pylint: disable=g-import-not-at-top

  if args.one:
    malloc.reexec(None)  # as the command line does
    print("RESULT " + json.dumps(one(args.one, args.workdir, args.reps, args.base, flags)),
          flush=True)
    return
  from semsafe_jax import methods  # pylint: disable=g-import-not-at-top
  bad = [m for m in names if m not in methods.names()]
  if bad:
    ap.error(f"--methods: {bad[0]!r} is not a method; expected some of "
             f"{', '.join(methods.names())}")
  results = []
  for m in names:
    print(f"[{len(results) + 1}/{len(names)}] {m} ...", flush=True)
    cmd = [sys.executable, __file__, f"--workdir={args.workdir}", f"--one={m}",
           f"--reps={args.reps}"] + ([f"--base={args.base}"] if args.base else [])
    proc = subprocess.run(cmd + ["--"] + flags, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
      tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
      raise SystemExit(f"bench_methods: {m} failed (exit {proc.returncode}): {tail}")
    results.append(json.loads(lines[-1][len("RESULT "):]))
  ref = results[0]
  ref_w, ref_c = statistics.median(ref["wall"]), statistics.median(ref["cpu"])
  print(f"\nconfig: configs/methods/<name>.py{':' + args.base if args.base else ''} "
        f"{' '.join(flags)}\nallocator {ref['allocator']}; "
        f"{os.cpu_count()} CPUs; load average now {os.getloadavg()[0]:.2f}; "
        f"medians of {args.reps} steps after {WARM} warm-up steps\n")
  print(f"| method | s/step (wall) | x {ref['method']} | CPU s/step | x {ref['method']} "
        f"| prepare s | peak host GB | trainable |")
  print("|---|---|---|---|---|---|---|---|")
  for r in results:
    w, c = statistics.median(r["wall"]), statistics.median(r["cpu"])
    print(f"| {r['method']} | {w:.2f} | {w / ref_w:.2f} | {c:.2f} | {c / ref_c:.2f} "
          f"| {r['prepare_s']:.0f} | {r['peak_rss_gb']:.1f} | {r['trainable']:,} |")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
