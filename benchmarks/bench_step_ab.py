"""One method's train step under two sets of config flags, timed in pairs in one process.

  HF_HUB_OFFLINE=1 python benchmarks/bench_step_ab.py --workdir=runs/bench_ab \
      [--method=semsafe] [--pairs=10] [--base=tiny] [--json=FILE] \
      --a="--config.model.remat=off --config.data.pack_width=0" [--b="..."] \
      [-- --config.FIELD=VALUE ...  (both arms)]

A shared machine's speed drifts: on the 2-core development machine, separate runs minutes
apart differed by up to 20%, so alternating whole runs (bench_methods.py) cannot tell a few
percent apart. Here both arms go through the method's real `prepare`
(bench_methods.prepare: the main job's data and model stages, host stages cached in
`<workdir>/shared`), each gets the trainer's `TrainStep` and its own state, and then their
steps run alternately in one process, A B, B A, A B, ... (so a drift that is linear in time
hits both arms alike), each timed from building its batch to its metrics on the host.
After 2 warm-up steps per arm (compiles), each pair gives the ratio B/A; the table gives
each arm's median step, and the median ratio with a 95% bootstrap interval over pairs, in
wall and CPU seconds. The process's peak host memory covers both arms together (see
bench_methods.py for each alone).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_methods  # pylint: disable=g-import-not-at-top,wrong-import-position

WARM = bench_methods.WARM
BOOTSTRAP = 4000


def _arm(method: str, workdir: str, name: str, base: str | None, flags: list[str]) -> dict:
  """Prepares one arm: its batches, its jitted step and its initial state."""
  import jax  # pylint: disable=g-import-not-at-top
  from semsafe_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from semsafe_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  config, _, mesh, _, prepared, prepare_s = bench_methods.prepare(method, workdir, base,
                                                                  flags, wd_name=name)
  tc = config.train
  optimizer, schedule = step_lib.make_optimizer(tc)
  frozen = prepared.frozen
  if frozen is not None:  # placed as fit places it
    frozen = sharding.place_tree(frozen, mesh, sharding.get_rules(tc.get("sharding",
                                                                         "replicate")),
                                 prepared.frozen_axes)
  init = jax.jit(lambda t: step_lib.init_state(t, optimizer, config.seed))
  state = init(sharding.place_tree(jax.device_get(prepared.trainable), mesh))
  step = step_lib.TrainStep(prepared.loss_fn, optimizer, schedule,
                            donate=tc.get("donate", True))
  return {"name": name, "flags": flags, "batch_fn": prepared.batch_fn, "mesh": mesh,
          "frozen": frozen, "state": state, "step": step, "next": 0, "wall": [], "cpu": [],
          "prepare_s": prepare_s}


def _run_step(arm: dict) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from semsafe_jax.train import sharding  # pylint: disable=g-import-not-at-top

  w0, c0 = time.perf_counter(), bench_methods.cpu_seconds()
  batch = sharding.shard_batch(arm["batch_fn"](arm["next"]), arm["mesh"])
  arm["state"], metrics = arm["step"](arm["state"], arm["frozen"], batch)
  jax.block_until_ready(metrics)
  arm["wall"].append(time.perf_counter() - w0)
  arm["cpu"].append(bench_methods.cpu_seconds() - c0)
  arm["next"] += 1


def ratio_interval(a: list[float], b: list[float], seed: int = 0) -> tuple[float, float, float]:
  """Median of the paired ratios b/a, and its 95% percentile-bootstrap interval."""
  r = np.asarray(b, np.float64) / np.asarray(a, np.float64)
  rng = np.random.default_rng(seed)
  boot = np.median(r[rng.integers(0, len(r), (BOOTSTRAP, len(r)))], axis=1)
  return float(np.median(r)), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def main():
  argv, common = bench_methods.split_argv(sys.argv[1:])
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--method", default="semsafe")
  ap.add_argument("--a", required=True, help="config flags of arm A (quoted, shell syntax)")
  ap.add_argument("--b", default="", help="config flags of arm B; default: none")
  ap.add_argument("--pairs", type=int, default=10, help="timed steps per arm")
  ap.add_argument("--base", default=None, help="config the method file builds on, e.g. tiny")
  ap.add_argument("--json", default=None, help="also write the per-step times here")
  args = ap.parse_args(argv)
  if args.pairs < 2:
    ap.error(f"--pairs={args.pairs}: must be >= 2")
  from semsafe_jax import malloc  # pylint: disable=g-import-not-at-top

  malloc.reexec(None)  # as the command line does; before JAX loads
  from semsafe_jax import methods  # pylint: disable=g-import-not-at-top

  if args.method not in methods.names():
    ap.error(f"--method: {args.method!r} is not a method; expected one of "
             f"{', '.join(methods.names())}")
  arms = [_arm(args.method, args.workdir, name, args.base, shlex.split(flags) + common)
          for name, flags in (("A", args.a), ("B", args.b))]
  for i in range(WARM + args.pairs):
    order = arms if i % 2 == 0 else arms[::-1]
    for arm in order:
      _run_step(arm)
    if i >= WARM:
      a, b = arms
      print(f"pair {i - WARM + 1}/{args.pairs}: A {a['wall'][-1]:.2f} s, "
            f"B {b['wall'][-1]:.2f} s", flush=True)
  a, b = arms
  timed = lambda arm, key: arm[key][WARM:]
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"\nmethod {args.method}; config: configs/methods/{args.method}.py"
        f"{':' + args.base if args.base else ''} {' '.join(common)}\n"
        f"allocator {malloc.active()}; {os.cpu_count()} CPUs; {args.pairs} pairs after "
        f"{WARM} warm-up steps per arm; peak host memory of both arms together "
        f"{peak:.1f} GB\n")
  print("| arm | flags | s/step (wall) | CPU s/step | prepare s |")
  print("|---|---|---|---|---|")
  for arm in arms:
    print(f"| {arm['name']} | {' '.join(arm['flags'][:len(arm['flags']) - len(common)]) or '-'}"
          f" | {statistics.median(timed(arm, 'wall')):.2f}"
          f" | {statistics.median(timed(arm, 'cpu')):.2f} | {arm['prepare_s']:.0f} |")
  result = {"method": args.method, "pairs": args.pairs, "peak_rss_gb": peak,
            "arms": {arm["name"]: {"flags": arm["flags"], "wall": timed(arm, "wall"),
                                   "cpu": timed(arm, "cpu")} for arm in arms}}
  for key, label in (("wall", "wall"), ("cpu", "CPU")):
    med, lo, hi = ratio_interval(timed(a, key), timed(b, key))
    result[f"ratio_{key}"] = [med, lo, hi]
    print(f"\nB / A, {label} time: {med:.3f} [95% {lo:.3f}-{hi:.3f}] (median of paired ratios)")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
