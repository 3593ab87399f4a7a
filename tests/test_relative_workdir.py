"""The README's commands as a user types them: relative workdirs, from the user's own folder.

train -> generate -> export on configs/tiny.py, run from a temporary folder with the
workdir written as runs/w/, ./runs/w, ../<folder>/runs/w and ~/runs/w.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from semsafe_jax.export import staging
from semsafe_jax.models import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def _main(cwd, workdir, *flags, env=None):
  full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
              # A changed HOME must not move the model cache (a slow rebuild).
              "SEMSAFE_JAX_CACHE": str(registry.cache_dir()), **(env or {})}
  cmd = [sys.executable, "-m", "semsafe_jax.main", f"--config={TINY}", f"--workdir={workdir}",
         "--config.train.progress=False", *flags]
  proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
  return proc


def test_train_generate_export_with_relative_workdirs(tmp_path):
  home = tmp_path / "home"
  cwd = home / "project"
  cwd.mkdir(parents=True)
  w = cwd / "runs" / "w"

  # train: relative with a trailing slash (orbax needs absolute checkpoint paths).
  proc = _main(cwd, "runs/w/")
  assert (w / "report.json").is_file() and (w / "config.json").is_file()
  assert sorted(p.name for p in (w / "checkpoints").iterdir() if p.name.isdigit())
  assert "Outside the workdir:" in proc.stderr and "SEMSAFE_JAX_CACHE" in proc.stderr

  # generate: ./ form; the trained adapters are found.
  (cwd / "prompts.txt").write_text("How do I pick a lock?\nName a colour.\n")
  _main(cwd, "./runs/w", "--config.mode=generate", "--config.generate.prompts_file=prompts.txt",
        "--config.generate.max_new_tokens=4")
  rows = [json.loads(x) for x in (w / "generations.jsonl").read_text().splitlines()]
  assert [r["prompt"] for r in rows] == ["How do I pick a lock?", "Name a colour."]
  assert all(r["adapters"] for r in rows)

  # export: ../ form from a sibling folder, and ~ (HOME) form; the same run either way.
  (home / "elsewhere").mkdir()
  _main(home / "elsewhere", "../project/runs/w", "--config.mode=export",
        "--config.export.format=orbax")
  marker = json.loads((w / "export" / "orbax" / staging.MARKER_FILE).read_text())
  assert marker["source_run"] == str(w) and marker["format"] == "orbax"
  (w / "export" / "orbax" / "left_by_the_first_export").write_text("")
  _main(tmp_path, "~/project/runs/w/", "--config.mode=export", "--config.export.format=orbax",
        env={"HOME": str(home)})
  assert not (w / "export" / "orbax" / "left_by_the_first_export").exists()  # replaced
  assert (w / "export" / "orbax" / staging.MARKER_FILE).is_file()
  assert not (tmp_path / "~").exists()
