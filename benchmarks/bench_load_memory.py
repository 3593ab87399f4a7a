"""Host peak memory while loading SmolLM2-135M-Instruct, ours vs transformers.

Each load runs in a fresh subprocess; we report the peak RSS growth during the
load (after imports) divided by the model's size in the target dtype. The
streaming loader aims for <= 2x. Sources: the embedded GGUF, and an HF
safetensors directory (float32) written once from it.

  python benchmarks/bench_load_memory.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _child(loader: str, source: str, dtype: str, hf_dir: str) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  if loader == "ours":
    import jax  # pylint: disable=g-import-not-at-top
    from semsafe_jax.models import load_pretrained, registry  # pylint: disable=g-import-not-at-top
    jax.numpy.zeros(1).block_until_ready()  # backend start-up is not part of the load
    target = "smollm2-135m-instruct" if source == "gguf" else hf_dir
    before, t = _rss_mb(), time.time()
    pre = load_pretrained(target, param_dtype=dtype, dtype=dtype, tokenizer=False)
    jax.block_until_ready(pre.params)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(pre.params))
  else:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers as tf  # pylint: disable=g-import-not-at-top
    from semsafe_jax.models import registry  # pylint: disable=g-import-not-at-top
    tf.LlamaConfig()  # import the model modules before measuring
    kw = dict(dtype=getattr(torch, dtype))
    if source == "gguf":
      path, _ = registry.embedded_gguf_path("smollm2-135m-instruct")
      args, kw = (str(path.parent),), dict(kw, gguf_file=path.name)
    else:
      args = (hf_dir,)
    before, t = _rss_mb(), time.time()
    model = tf.AutoModelForCausalLM.from_pretrained(*args, **kw)
    n_params = sum(p.numel() for p in model.parameters())
  seconds = time.time() - t
  itemsize = 4 if dtype == "float32" else 2
  return dict(loader=loader, source=source, dtype=dtype, seconds=seconds,
              model_mb=n_params * itemsize / 2**20, peak_growth_mb=_peak_mb() - before)


def _run(loader: str, source: str, dtype: str, hf_dir: str) -> dict:
  out = subprocess.run([sys.executable, __file__, "--child", loader, source, dtype, hf_dir],
                       check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _write_hf_dir(d: pathlib.Path) -> None:
  """SmolLM2 as a float32 safetensors checkpoint (via transformers' GGUF loader)."""
  code = (
      "import json, pathlib, sys, torch, transformers as tf\n"
      "from safetensors.torch import save_file\n"
      "from semsafe_jax.models import registry\n"
      "p, _ = registry.embedded_gguf_path('smollm2-135m-instruct')\n"
      "m = tf.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, "
      "dtype=torch.float32)\n"
      "d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True)\n"
      "cfg = m.config.to_dict(); cfg.pop('quantization_config', None)\n"
      "(d / 'config.json').write_text(json.dumps(cfg))\n"
      "sd = {k: v.contiguous() for k, v in m.state_dict().items() if k != 'lm_head.weight'}\n"
      "save_file(sd, str(d / 'model.safetensors'), metadata={'format': 'pt'})\n")
  subprocess.run([sys.executable, "-c", code, str(d)], check=True, capture_output=True)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--child", nargs=4, metavar=("LOADER", "SOURCE", "DTYPE", "HF_DIR"))
  ap.add_argument("--workdir", default=None, help="where to write the safetensors copy")
  args = ap.parse_args()
  if args.child:
    print(json.dumps(_child(*args.child)))
    return
  with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
    hf_dir = pathlib.Path(tmp) / "smollm2-hf"
    _write_hf_dir(hf_dir)
    print(f"{'source':<12}{'dtype':<10}{'model MB':>10}{'ours peak MB':>14}{'ours x':>8}"
          f"{'ours s':>8}{'tf peak MB':>12}{'tf x':>7}{'tf s':>7}")
    for source in ("gguf", "safetensors"):
      for dtype in ("float32", "bfloat16"):
        ours = _run("ours", source, dtype, str(hf_dir))
        ref = _run("transformers", source, dtype, str(hf_dir))
        m = ours["model_mb"]
        print(f"{source:<12}{dtype:<10}{m:>10.0f}{ours['peak_growth_mb']:>14.0f}"
              f"{ours['peak_growth_mb'] / m:>8.2f}{ours['seconds']:>8.1f}"
              f"{ref['peak_growth_mb']:>12.0f}{ref['peak_growth_mb'] / ref['model_mb']:>7.2f}"
              f"{ref['seconds']:>7.1f}", flush=True)


if __name__ == "__main__":
  main()
