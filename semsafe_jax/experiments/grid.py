"""config.experiment -> cells: one ordinary main-job run each, as one command line.

A cell is (method, override set, seed). Its command is

  python -m semsafe_jax.main --config=<method config> --workdir=W/cells/<cell> \\
      <method overrides> <experiment.overrides> <override set> --config.seed=S \\
      --config.data.cache_dir=W/shared/cache

where a later group replaces an earlier group's value of the same field (and
--config.eval.cache_dir=W/shared/eval_cache, the base model's answers, when the main job
has that field). The runner runs
exactly these (with this interpreter for `python`), and `print_commands` prints them for a
scheduler's job array.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from semsafe_jax import files
from semsafe_jax.errors import ConfigError

CELLS_DIR = "cells"
SHARED_DIR = "shared"
REPORT_FILE = "report.json"
# Main-job fields that point at a cache every cell shares -> its folder in W/shared/ ("" =
# W/shared itself). Passed when the method's config has the field and no override sets it.
SHARED_FIELDS = (("data.cache_dir", "cache"), ("eval.cache_dir", "eval_cache"),
                 ("shared_dir", ""))
_NAME = re.compile(r"^[A-Za-z0-9_]+$")
# What a cell's workdir can be in; see `status`.
DONE, PARTIAL, STALE, MISSING = "done", "partial", "stale", "missing"


@dataclasses.dataclass(frozen=True)
class Cell:
  method: str
  override_set: str  # "" = the method as configured
  seed: int
  config: str  # the method's config file, optionally "path:arg"
  flags: tuple[str, ...]  # "--config.<field>=<value>", in command-line order
  workdir: str
  set_fields: tuple[str, ...] = ()  # fields the override set changes (for sweep curves)

  @property
  def arm(self) -> str:
    """Method and override set: what a row of the summary table is (seeds are averaged)."""
    return f"{self.method}-{self.override_set}" if self.override_set else self.method

  @property
  def name(self) -> str:
    return f"{self.arm}-s{self.seed}"

  def argv(self, python: str = "python") -> list[str]:
    return [python, "-m", "semsafe_jax.main", f"--config={self.config}",
            f"--workdir={self.workdir}", *self.flags]

  def command(self) -> str:
    return shlex.join(self.argv())


def parse_overrides(items: Any, field: str) -> list[tuple[str, str]]:
  """("loss.lam=0", ...) -> [("loss.lam", "0"), ...]; a bare string is one override."""
  if isinstance(items, str):
    items = (items,)
  out = []
  for item in items or ():
    key, sep, value = str(item).partition("=")
    key = key.strip().removeprefix("--config.")
    if not sep or not key or " " in key:
      raise ConfigError(field, item, 'each override is "field=value", e.g. "loss.lam=0"')
    if key in ("seed", "mode"):
      raise ConfigError(field, item, f"{key} is set by the experiment (experiment.seeds), "
                        "not by an override")
    out.append((key, value))
  return out


def merge_overrides(*groups: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
  """Later groups replace every earlier value of a field they set.

  Within one group a field may repeat: that is how a tuple field is given on the command
  line (--config.data.sources=a --config.data.sources=b).
  """
  out: list[tuple[str, str]] = []
  for group in groups:
    fields = {k for k, _ in group}
    out = [(k, v) for k, v in out if k not in fields] + list(group)
  return out


def _methods(exp) -> list[tuple[str, str, list[tuple[str, str]], tuple[int, ...]]]:
  """(name, config spec, overrides, seeds) per method, in config order."""
  methods = exp.get("methods", None)
  if not methods:
    raise ConfigError("experiment.methods", methods, "name -> a method config file (or "
                      "{config, overrides, seeds}); at least one")
  default_seeds = tuple(int(s) for s in exp.get("seeds", (0,)))
  out = []
  for name, spec in methods.items():
    field = f"experiment.methods.{name}"
    if not _NAME.match(name):
      raise ConfigError(field, name, "method names use letters, digits and _ only")
    if isinstance(spec, str):
      spec = {"config": spec}
    elif isinstance(spec, Mapping) or hasattr(spec, "to_dict"):
      spec = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    else:
      raise ConfigError(field, spec, "a config file path or {config, overrides, seeds}")
    unknown = set(spec) - {"config", "overrides", "seeds"}
    if unknown or not spec.get("config"):
      raise ConfigError(field, spec, "keys: config (required), overrides, seeds")
    seeds = tuple(int(s) for s in (spec.get("seeds") or default_seeds))
    if not seeds:
      raise ConfigError("experiment.seeds", seeds, "at least one seed")
    out.append((name, str(spec["config"]), parse_overrides(spec.get("overrides", ()),
                                                           f"{field}.overrides"), seeds))
  return out


def _override_sets(exp) -> list[tuple[str, list[tuple[str, str]]]]:
  sets = exp.get("override_sets", None)
  if not sets:
    return [("", [])]
  out = []
  for name, items in sets.items():
    if not _NAME.match(name):
      raise ConfigError(f"experiment.override_sets.{name}", name,
                        "override set names use letters, digits and _ only")
    out.append((name, parse_overrides(items, f"experiment.override_sets.{name}")))
  return out


def shared_dir(workdir: str, exp) -> str:
  return exp.get("shared_dir", "") or os.path.join(workdir, SHARED_DIR)


def expand(exp, workdir: str, has_field=None) -> list[Cell]:
  """Every cell of the grid, methods x override sets x seeds, in run order: the first seed
  of every arm, then the second, ...

  has_field(config spec, field) -> bool says whether the method's config has a field; with
  it, cells also get --config.shared_dir when the main job has one.
  """
  common = parse_overrides(exp.get("overrides", ()), "experiment.overrides")
  shared = shared_dir(workdir, exp)
  baseline = exp.get("baseline", "")
  cells = []
  # The baseline first (its cells are what every paired test needs), then the others in
  # config order (a ConfigDict's: by name).
  methods = sorted(_methods(exp), key=lambda m: m[0] != baseline)
  for method, spec, method_over, seeds in methods:
    for set_name, set_over in _override_sets(exp):
      over = merge_overrides(method_over, common, set_over)
      fields = {k for k, _ in over}
      # What every cell computes alike, in one place: SBERT embeddings, the base model's
      # answers, and whatever else the main job keys by its inputs there.
      extra = [(field, os.path.join(shared, sub) if sub else shared)
               for field, sub in SHARED_FIELDS
               if field not in fields and (field == "data.cache_dir" or (
                   has_field is not None and has_field(spec, field)))]
      for rank, seed in enumerate(seeds):
        flags = tuple(f"--config.{k}={v}" for k, v in [*over, ("seed", str(seed)), *extra])
        cell = Cell(method, set_name, seed, spec, flags, "",
                    tuple(sorted({k for k, _ in set_over})))
        cells.append((rank, dataclasses.replace(
            cell, workdir=os.path.join(workdir, CELLS_DIR, cell.name))))
  # Seed-major (stable sort): a grid stopped part-way has whole seeds of every arm.
  cells = [c for _, c in sorted(cells, key=lambda rc: rc[0])]
  names = [c.name for c in cells]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ConfigError("experiment.seeds", dup, "each (method, override set, seed) once")
  if baseline and baseline not in {c.method for c in cells}:
    raise ConfigError("experiment.baseline", baseline,
                      f"one of the methods ({', '.join(dict.fromkeys(c.method for c in cells))}) "
                      "or '' for no paired tests")
  return cells


# ----------------------------------------------------------------------------
# A cell's config, as the main job will see it.


def parse_config(config: str, flags: Sequence[str]):
  """The ConfigDict `python -m semsafe_jax.main --config=<config> <flags>` runs with."""
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ["semsafe_jax.main", f"--config={config}", *flags]
  fv = absl_flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv["config"].value


def _checked_parse(config: str, flags: Sequence[str], method: str, where: str):
  path = config.split(":", 1)[0]
  if not os.path.isfile(path):
    raise ConfigError(f"experiment.methods.{method}", config,
                      f"no config file at {path} (paths are relative to the current directory)")
  try:
    return parse_config(config, flags)
  except Exception as e:  # absl / ml_collections: unknown field, unparsable value, bad file
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConfigError(f"experiment ({where})", " ".join([f"--config={config}", *flags]),
                      f"the main job rejects this: {msg}") from None


def method_config(config: str, method: str):
  """The method's config file as it is, before any override."""
  return _checked_parse(config, [], method, f"method {method}")


def cell_config(cell: Cell):
  """Parses the cell's command line; bad overrides are a one-line error naming the cell."""
  cfg = _checked_parse(cell.config, cell.flags, cell.method, f"cell {cell.name}")
  if cfg.get("mode", "train") != "train":
    raise ConfigError(f"experiment.methods.{cell.method}", cell.config,
                      f"a cell runs the main job (mode='train'), this config has "
                      f"mode={cfg.mode!r}")
  return cfg


def config_dict(cfg) -> dict[str, Any]:
  from semsafe_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  return ckpt_lib.config_to_dict(cfg)


def status(cell: Cell, expected: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
  """(DONE | PARTIAL | STALE | MISSING, the fields that differ when STALE).

  STALE: the workdir holds a run whose training config differs (what the main job's own
  workdir guard refuses). PARTIAL: same run, no report.json (crashed or still running), or
  a report made with other evaluation settings (report.json's "config", when it records
  one): rerunning resumes and evaluates again. DONE: report.json from this config.
  """
  from semsafe_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  path = os.path.join(cell.workdir, ckpt_lib.CONFIG_FILE)
  if not files.is_file(path):
    return MISSING, {}
  old = files.read_json(path)
  diff = ckpt_lib.config_diff(old, expected)
  if diff:
    return STALE, diff
  report_path = os.path.join(cell.workdir, REPORT_FILE)
  if not files.is_file(report_path):
    return PARTIAL, {}
  made_with = files.read_json(report_path).get("config")
  # Evaluation settings may change in a finished workdir; only the report knows which
  # ones it was made with. Fields that pick how a run goes, not what it reports, aside.
  run_only = [k for k in ckpt_lib.RESUME_SAFE_KEYS if k not in ("eval", "evals", "judges", "gate")]
  if made_with is not None and ckpt_lib.config_diff(made_with, expected, run_only):
    return PARTIAL, {}
  return DONE, {}
