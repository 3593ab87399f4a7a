"""Config checks that run before any work, each failing with one line: field, value, allowed.

`semsafe_jax.main` calls `validate(config)` before the job starts, so before the
workdir's config.json is written: a corrected rerun is then never refused as a
config change. A check is a small function `check(config)` that raises
`ConfigError` (see `fail`); register more with `@register` (methods add their own).
Checks read only the config and the file system: no model, data or JAX work.
A field a config leaves out is not checked (the code's own default applies).
"""

from __future__ import annotations

import math
import numbers
import os
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from semsafe_jax.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
EXPORT_FORMATS = ("peft", "merged", "orbax")
OVERLAP_STEPS = ("auto", "on", "off")  # train.overlap_steps: train.trainer.overlaps_steps
_MISSING = object()

Check = Callable[[Any], None]
CHECKS: list[Check] = []


def register(check: Check) -> Check:
  """Adds `check` to the checks `validate` runs (in registration order)."""
  CHECKS.append(check)
  return check


def validate(config: Any) -> None:
  """Runs every registered check; raises ConfigError at the first bad value."""
  for check in CHECKS:
    check(config)


# ----------------------------------------------------------------------------
# Helpers for checks.


def fail(field: str, value: Any, allowed: str) -> NoReturn:
  raise ConfigError(field, value, allowed)


def get(config: Any, field: str) -> Any:
  """config["a.b.c"], or _MISSING when any part is absent."""
  node = config
  for part in field.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return _MISSING
  return node


def present(value: Any) -> bool:
  return value is not _MISSING


def _is_number(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def int_at_least(config: Any, field: str, low: int, why: str = "") -> None:
  v = get(config, field)
  if not present(v):
    return
  if not (_is_number(v) and float(v).is_integer() and v >= low):
    fail(field, v, f"expected an integer >= {low}{why}")


def number_in(config: Any, field: str, low: float | None = None, high: float | None = None, *,
              low_open: bool = False, high_open: bool = False, why: str = "") -> None:
  """low <= v <= high (strict where *_open); NaN and infinities always fail."""
  v = get(config, field)
  if not present(v):
    return
  ok = _is_number(v) and math.isfinite(v)
  if ok and low is not None:
    ok = v > low if low_open else v >= low
  if ok and high is not None:
    ok = v < high if high_open else v <= high
  if not ok:
    if low is not None and high is not None:
      rng = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
      text = f"expected a number in {rng}"
    elif low is not None:
      text = f"expected a number {'>' if low_open else '>='} {low:g}"
    else:
      text = f"expected a number {'<' if high_open else '<='} {high:g}"
    fail(field, v, text + why)


def one_of(config: Any, field: str, choices: Sequence[Any]) -> None:
  v = get(config, field)
  if present(v) and v not in choices:
    fail(field, v, f"expected one of {', '.join(str(c) for c in choices)}")


def as_list(value: Any) -> list[str]:
  """A tuple field as strings; a CLI override may arrive as one comma-separated string."""
  if value is None or not present(value):
    return []
  items = [value] if isinstance(value, str) else list(value)
  return [s.strip() for item in items for s in str(item).split(",") if s.strip()]


def _mode(config: Any) -> str:
  mode = get(config, "mode")
  return mode if present(mode) else "train"


def uses_model(config: Any) -> bool:
  """False in mine mode, which stops after the data (and imports no model code)."""
  return _mode(config) != "mine"


# ----------------------------------------------------------------------------
# The checks.


def modes() -> list[str]:
  """config.mode values: one per module of semsafe_jax/jobs."""
  import pkgutil  # pylint: disable=g-import-not-at-top

  from semsafe_jax import jobs  # pylint: disable=g-import-not-at-top
  return sorted(m.name for m in pkgutil.iter_modules(jobs.__path__) if not m.name.startswith("_"))


@register
def check_mode(config: Any) -> None:
  one_of(config, "mode", modes())


@register
def check_method(config: Any) -> None:
  name = get(config, "method.name")
  if not present(name) or not uses_model(config):
    return
  try:
    from semsafe_jax import methods  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  one_of(config, "method.name", methods.names())
  # A method module may check its own options (`validate(config)`).
  check = getattr(methods.get(name), "validate", None)
  if check is not None:
    check(config)


@register
def check_model(config: Any) -> None:
  if not uses_model(config):
    return
  for field in ("model.dtype", "model.param_dtype"):
    one_of(config, field, DTYPES)
  remat = get(config, "model.remat")
  if present(remat) and remat not in (False, True, None, "", "off", "full", "dots"):
    fail("model.remat", remat, "expected 'off', 'full' or 'dots'")
  one_of(config, "model.layer_loop", ("auto", "scan", "unroll"))
  name = get(config, "model.name_or_path")
  if present(name):
    problem = model_source_problem(name)
    if problem:
      fail("model.name_or_path", name, problem)


def model_source_problem(name: Any) -> str:
  """Why `name` names no loadable model (aliases, paths, hub ids), or "" when it does.

  Only names and files are looked at, nothing is loaded.
  """
  from semsafe_jax.models import registry  # pylint: disable=g-import-not-at-top; stdlib only
  aliases = [*registry.EMBEDDED, *registry.ALIASES, "tiny-random", "tiny-random:<family>"]
  expected = (f"expected an alias ({', '.join(aliases)}), an existing .gguf file or model "
              "folder, or a hub id (org/name)")
  if not isinstance(name, str) or not name.strip():
    return expected
  family = registry.parse_tiny(name)
  if family is not None:
    try:
      registry.tiny_hf_config(family, 1)
    except registry.ModelLoadError as e:
      return str(e)
    return ""
  if registry.canonical_alias(name):
    return ""
  path = pathlib.Path(name).expanduser()
  if path.is_file():
    return "" if path.suffix == ".gguf" else "a file must be a .gguf; or give a model folder"
  if path.is_dir():
    if (path / "config.json").is_file() or any(path.glob("*.gguf")):
      return ""
    return "this folder holds neither config.json (a transformers model) nor a .gguf file"
  parts = name.split("/")
  hub_like = (len(parts) == 2 and all(parts) and not name.startswith((".", "~", "/"))
              and not name.endswith(".gguf"))
  if not hub_like:
    return expected
  if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
    try:
      import huggingface_hub  # pylint: disable=g-import-not-at-top
      cached = huggingface_hub.try_to_load_from_cache(name, "config.json")
    except Exception:  # pylint: disable=broad-except; an odd cache is the loader's to report
      return ""
    if not isinstance(cached, str):
      return ("a hub id, but HF_HUB_OFFLINE is set and it is not in the local Hugging Face "
              "cache; download it once online, or give a local path")
  return ""


@register
def check_data(config: Any) -> None:
  sources = get(config, "data.sources")
  if present(sources):
    specs = as_list(sources) if isinstance(sources, str) else [str(s) for s in sources]
    if not specs:
      fail("data.sources", sources, "expected at least one source, e.g. builtin")
    from semsafe_jax.data import loaders  # pylint: disable=g-import-not-at-top
    for spec in specs:
      try:
        parsed = loaders.parse_source(spec)
      except ValueError as e:  # DataError: the spec's own one-line message
        fail("data.sources", spec, str(e))
      if parsed.kind in loaders.FILE_KINDS:
        path = pathlib.Path(parsed.target).expanduser()
        if not path.is_file():
          fail("data.sources", spec, f"no such file: {path}")
  # Source names (a prompt's `source`, e.g. advbench), not specs: a spec here would match
  # nothing and leave its prompts trainable.
  for name in [str(s) for s in as_list(get(config, "data.eval_only_sources") or ())]:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
      fail("data.eval_only_sources", name, "expected source names such as advbench (the "
           "prompts' source), not a source spec; the spec goes in data.sources")
  number_in(config, "data.tau", -1.0, 1.0, low_open=True, high_open=True,
            why=" (a cosine similarity)")
  int_at_least(config, "data.k", 1, " (neighbours mined per prompt)")
  int_at_least(config, "data.embed_batch_size", 1)
  one_of(config, "data.index", ("auto", "flat", "hnsw", "ivf"))
  one_of(config, "data.approx_index", ("ivf", "hnsw"))
  for field, low in [("exact_max", 0), ("hnsw_m", 2), ("hnsw_ef_construction", 1),
                     ("hnsw_ef_search", 1), ("ivf_nlist", 0), ("ivf_nprobe", 1),
                     ("faiss_threads", 0), ("split_seed", 0)]:
    int_at_least(config, f"data.{field}", low)
  for field in ("heldout_intent_frac", "heldout_phrasing_frac", "eval_frac"):
    number_in(config, f"data.{field}", 0.0, 1.0, high_open=True)
  int_at_least(config, "data.harmful_per_step", 1)
  for field in ("benign_per_step", "pairs_per_step", "neighbors_per_anchor"):
    int_at_least(config, f"data.{field}", 0)
  number_in(config, "data.pairable_anchor_frac", 0.0, 1.0)
  for field in ("unlabeled_k", "contrast_k"):
    int_at_least(config, f"data.{field}", 1)
  for field in ("unlabeled_per_step", "contrast_per_step", "pack_width"):
    int_at_least(config, f"data.{field}", 0)
  number_in(config, "data.unlabeled_harmful_share", 0.0, 1.0)
  number_in(config, "data.contrast_tau", -1.0, 1.0, low_open=True, high_open=True,
            why=" (a cosine similarity)")
  number_in(config, "data.borderline_share", high=1.0,
            why=" (a share in [0, 1]; < 0 = as in the data)")
  one_of(config, "data.on_bad_rows", ("error", "warn"))
  int_at_least(config, "data.max_len", 8)
  int_at_least(config, "data.max_response_tokens", 1)
  refusals = get(config, "data.refusals")
  if present(refusals) and refusals != "builtin":
    if not isinstance(refusals, str) or not pathlib.Path(refusals).expanduser().is_file():
      fail("data.refusals", refusals, "expected builtin or an existing .jsonl/.txt file")
  cache_dir = get(config, "data.cache_dir")
  if present(cache_dir) and cache_dir and pathlib.Path(str(cache_dir)).expanduser().is_file():
    fail("data.cache_dir", cache_dir, "expected a folder (or empty for WORKDIR/cache); "
         "this is a file")


@register
def check_adapters(config: Any) -> None:
  if not uses_model(config):
    return
  targets = as_list(get(config, "adapters.lora_targets"))
  if targets:
    int_at_least(config, "adapters.lora_rank", 1,
                 " while adapters.lora_targets is set (for no LoRA: "
                 "--config.adapters.lora_targets='')")
    from semsafe_jax.adapters import lora  # pylint: disable=g-import-not-at-top
    paths = list(lora.SHORT_TARGETS.values())
    for t in targets:
      if t in lora.SHORT_TARGETS:
        continue
      try:
        rx = re.compile(t)
      except re.error:
        rx = None
      if rx is None or not any(rx.fullmatch(p) for p in paths):
        fail("adapters.lora_targets", t,
             f"expected module names from {', '.join(lora.SHORT_TARGETS)}, or a regex "
             "fully matching a kernel path such as layers/attn/q_proj/kernel")
  number_in(config, "adapters.lora_alpha", 0.0, low_open=True)
  number_in(config, "adapters.lora_dropout", 0.0, 1.0, high_open=True)
  if get(config, "adapters.embed_mlp") is True:
    int_at_least(config, "adapters.embed_mlp_hidden", 1)


@register
def check_loss(config: Any) -> None:
  if not uses_model(config):
    return
  from semsafe_jax.losses import capability, consistency  # pylint: disable=g-import-not-at-top
  scorers, reprs = _loss_names()
  one_of(config, "loss.scorer", scorers)
  one_of(config, "loss.consistency_repr", reprs)
  one_of(config, "loss.divergence", consistency.DIVERGENCES)
  one_of(config, "loss.capability", capability.KINDS)
  one_of(config, "loss.kl_direction", capability.DIRECTIONS)
  one_of(config, "loss.hidden_pool", ("mean", "last"))
  one_of(config, "loss.probe_pool", ("prompt", "response"))
  for field in ("w_safety", "lam", "w_capability", "capability_first_token_weight",
                "safety_first_token_weight", "ambiguous_token_weight"):
    number_in(config, f"loss.{field}", 0.0)
  int_at_least(config, "loss.max_target_tokens", 0, " (0 = every position)")
  int_at_least(config, "loss.classifier_hidden", 1)
  int_at_least(config, "loss.classifier_steps", 1)
  number_in(config, "loss.classifier_lr", 0.0, low_open=True)
  probe_train = get(config, "probe.train")
  if get(config, "loss.scorer") == "probe" and present(probe_train) and not probe_train:
    fail("loss.scorer", "probe", "needs probe.train=True (the probe trained in this run scores "
         "refusals)")


def _loss_names() -> tuple[Sequence[str], Sequence[str]]:
  """(loss.scorer values, loss.consistency_repr values), from the module that owns them."""
  from semsafe_jax.methods import semsafe  # pylint: disable=g-import-not-at-top
  return tuple(semsafe.SCORERS), tuple(semsafe.REPRS)


@register
def check_probe(config: Any) -> None:
  one_of(config, "probe.use", ("off", "weight_pairs", "flag_unlabeled"))
  train = get(config, "probe.train")
  if get(config, "probe.use") == "flag_unlabeled" and present(train) and not train:
    fail("probe.use", "flag_unlabeled", "needs probe.train=True (the probe trained in this run "
         "flags the unlabeled prompts)")
  layer = get(config, "probe.layer")
  if present(layer) and layer not in ("best", None, ""):
    try:
      int(layer)
    except (TypeError, ValueError):
      fail("probe.layer", layer, "expected best or a hidden_states index (an integer)")
  number_in(config, "probe.threshold", 0.0, 1.0)
  int_at_least(config, "probe.max_prompts", 1)
  int_at_least(config, "probe.steps", 1)
  number_in(config, "probe.lr", 0.0, low_open=True)
  number_in(config, "probe.l2", 0.0)
  int_at_least(config, "probe.batch_size", 1)


@register
def check_gate(config: Any) -> None:
  number_in(config, "gate.recall", 0.0, 1.0, low_open=True)
  number_in(config, "gate.held_back", 0.0, 1.0, low_open=True, high_open=True)
  int_at_least(config, "gate.max_per_split", 1)
  use = get(config, "gate.use")
  if present(use) and not isinstance(use, bool):
    fail("gate.use", use, "expected True or False")


@register
def check_train(config: Any) -> None:
  int_at_least(config, "train.steps", 1)
  number_in(config, "train.lr", 0.0, low_open=True)
  int_at_least(config, "train.warmup_steps", 0)
  number_in(config, "train.weight_decay", 0.0)
  number_in(config, "train.clip_norm", 0.0, why=" (0 = no clipping)")
  int_at_least(config, "train.grad_accum", 1)
  int_at_least(config, "train.log_every", 1)
  int_at_least(config, "train.max_bad_steps", 1)
  number_in(config, "train.end_lr_frac", 0.0, 1.0)
  one_of(config, "train.sharding", ("replicate", "fsdp", "tensor", "fsdp_tensor"))
  one_of(config, "train.overlap_steps", OVERLAP_STEPS)
  mesh = get(config, "train.mesh")
  if present(mesh) and mesh is not None:
    axes = ("data", "fsdp", "model")
    sizes = mesh.to_dict() if hasattr(mesh, "to_dict") else dict(mesh)
    for axis, size in sizes.items():
      if axis not in axes:
        fail(f"train.mesh.{axis}", size, f"unknown mesh axis; axes are {', '.join(axes)}")
      if not (_is_number(size) and float(size).is_integer() and (size >= 1 or size == -1)):
        fail(f"train.mesh.{axis}", size, "expected an integer >= 1, or -1 (the other devices)")
    if sum(1 for s in sizes.values() if s == -1) > 1:
      fail("train.mesh", sizes, "at most one axis may be -1")


@register
def check_checkpoint(config: Any) -> None:
  int_at_least(config, "checkpoint.every", 1)
  int_at_least(config, "checkpoint.keep", 1)


@register
def check_generate(config: Any) -> None:
  int_at_least(config, "generate.max_new_tokens", 1)
  int_at_least(config, "generate.batch_size", 1)
  number_in(config, "generate.temperature", 0.0, why=" (0 = greedy)")
  int_at_least(config, "generate.top_k", 0, " (0 = off)")
  number_in(config, "generate.top_p", 0.0, 1.0, low_open=True)
  if _mode(config) != "generate":
    return
  prompts_file = get(config, "generate.prompts_file")
  if present(prompts_file) and prompts_file:
    path = pathlib.Path(str(prompts_file)).expanduser()
    if not path.is_file():
      fail("generate.prompts_file", prompts_file, f"no such file: {path}")
  elif not as_list(get(config, "generate.prompts")):
    fail("generate.prompts_file", prompts_file if present(prompts_file) else "",
         "nothing to generate: give a prompts file (one prompt per line, or JSONL with "
         "\"prompt\") or config.generate.prompts")


@register
def check_export(config: Any) -> None:
  one_of(config, "export.format", EXPORT_FORMATS)
  one_of(config, "export.dtype", DTYPES)
  save_base = get(config, "export.save_base")
  if present(save_base) and str(save_base).lower() not in ("auto", "yes", "no"):
    fail("export.save_base", save_base, "expected auto, yes or no")
  number_in(config, "export.max_shard_gb", 0.0, low_open=True)
  int_at_least(config, "export.step", -1, " (-1 = the latest)")


@register
def check_eval(config: Any) -> None:
  int_at_least(config, "eval.max_new_tokens", 1)
  int_at_least(config, "eval.batch_size", 1)
  int_at_least(config, "eval.max_batch_tokens", 0)
  int_at_least(config, "eval.max_per_split", 0, " (0 = all)")
  int_at_least(config, "eval.base_answer_tokens", 1)
