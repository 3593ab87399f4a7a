"""The caching host allocator: when the entry points re-exec, and that it stops the fault churn."""

import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest

from semsafe_jax import malloc

REPO = pathlib.Path(__file__).resolve().parents[1]

# Allocates, touches and frees a 64 MB block ten times and reports the minor
# page faults of the last five rounds: each round faults the block in afresh
# when freed memory goes back to the kernel, and not at all when it is reused.
# Then frees 512 MB and reports the resident size before and after release().
_CHILD = """
import json, os, resource, sys
from semsafe_jax import malloc
malloc.reexec()
import numpy as np
def faults():
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(10):
  if i == 5:
    start = faults()
  a = np.ones(1 << 24, np.float32)
  del a
n_faults = faults() - start
def rss_mb():
  return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS"))) >> 10
blocks = [np.ones(1 << 24, np.float32) for _ in range(8)]  # 512 MB, then freed
del blocks
held = rss_mb()
malloc.release()
maps = open("/proc/self/maps").read()
print(json.dumps({"active": malloc.active(), "faults": n_faults, "argv": sys.argv[1:],
                  "tbb_mapped": "tbbmalloc_proxy" in maps, "held_mb": held,
                  "released_mb": rss_mb()}))
"""


def _child(choice: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", malloc._ACTIVE)}
  env[malloc.ENV] = choice
  out = subprocess.run([sys.executable, "-c", _CHILD, "kept", "--flag=1"], env=env, cwd=REPO,
                       capture_output=True, text=True, check=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("environ", [
    {malloc.ENV: "system"},
    {malloc.ENV: "auto", "LD_PRELOAD": "/opt/lib/libjemalloc.so.2"},
    {"SEMSAFE_MALLOC_ACTIVE": "tbbmalloc"},  # already restarted: never exec twice
])
def test_plan_leaves_the_process_alone(environ):
  assert malloc.plan(environ) is None


def test_plan_rejects_unknown_choice():
  with pytest.raises(ValueError, match="SEMSAFE_MALLOC"):
    malloc.plan({malloc.ENV: "hoard"})


# setup.py installs the tbb wheel on Linux x86_64 only.
_HAS_TBB_WHEEL = sys.platform.startswith("linux") and platform.machine() == "x86_64"


@pytest.mark.skipif(not _HAS_TBB_WHEEL, reason="the tbb wheel is a Linux x86_64 dependency")
def test_tbbmalloc_from_the_wheel():
  name, env = malloc.plan({malloc.ENV: "tbbmalloc"})
  assert name == "tbbmalloc"
  assert pathlib.Path(env["LD_PRELOAD"]).is_file()
  assert int(env["TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD"]) > 0
  # The environment plan() is given is the one read: a threshold set there wins.
  _, env = malloc.plan({malloc.ENV: "tbbmalloc", "TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD": "8388608"})
  assert env["TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD"] == "8388608"


@pytest.mark.skipif(not _HAS_TBB_WHEEL, reason="the tbb wheel is a Linux x86_64 dependency")
def test_reexec_keeps_the_command_reuses_freed_memory_and_releases_it():
  cached = _child("tbbmalloc")
  plain = _child("system")
  assert cached["active"] == "tbbmalloc" and cached["tbb_mapped"]
  assert plain["active"] == "system" and not plain["tbb_mapped"]
  assert cached["argv"] == plain["argv"] == ["kept", "--flag=1"]
  # glibc maps the block in afresh every round (5 rounds x 64 MB: thousands of
  # faults with 4 KiB pages, at least 5 x 32 with huge pages); the caching
  # allocator hands the same memory back.
  assert plain["faults"] >= 5 * 32
  assert cached["faults"] < plain["faults"] / 4
  # release() hands the cached 512 MB back (a no-op under glibc, which never held it).
  assert cached["held_mb"] - cached["released_mb"] > 400
  assert plain["held_mb"] - plain["released_mb"] < 100


def test_release_on_new_shape_releases_once_per_shape(monkeypatch):
  calls = []
  monkeypatch.setattr(malloc, "release", lambda: calls.append(1))
  new_shape = malloc.ReleaseOnNewShape()
  for shape in [32, 32, 64, 64, 64, (64, 8), (64, 8), 32]:
    new_shape(shape)
  assert len(calls) == 4  # 32, 64, (64, 8), 32 again


def test_generation_releases_between_prompt_buckets(monkeypatch):
  """A caching allocator keeps each bucket's freed temporaries unless told to hand them back:
  generation does so when the bucket changes and when it ends, not after every batch."""
  from semsafe_jax.models import generate as gen_lib  # pylint: disable=g-import-not-at-top
  from semsafe_jax.models.loading import load_pretrained  # pylint: disable=g-import-not-at-top
  pre = load_pretrained("tiny-random")
  calls = []
  monkeypatch.setattr(malloc, "release", lambda: calls.append(1))
  short, long = "hi", " ".join(["word"] * 60)  # two prompt buckets
  gen_lib.generate(pre.params, pre.cfg, pre.tokenizer, [short] * 4 + [long] * 4,
                   max_new_tokens=2, batch_size=2)
  assert len(calls) == 3  # entering each of the two buckets, and at the end
