"""Generate mode: complete prompts with the base model or the trained adapters.

  python -m semsafe_jax.main --config=configs/default.py --workdir=W \\
      --config.mode=generate --config.generate.prompts_file=prompts.txt

Prompts come from `config.generate.prompts` and/or `config.generate.prompts_file`
(one prompt per line, or JSONL with a "prompt" field). With
`config.generate.adapters` and a training checkpoint in W, the latest trained
adapters are applied (LoRA merged, embedding MLP as the embed_fn); with `gate.use` too,
only to the prompts that the run's probe gate (W/gate.json) flags. Writes
W/generations.jsonl: one object per prompt, in input order.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from typing import Any

import jax
from absl import logging

from semsafe_jax import adapters as adapters_lib
from semsafe_jax.errors import ConfigError, InputFileError, MissingInputError
from semsafe_jax import files
from semsafe_jax.files import write_jsonl
from semsafe_jax.models import generate as gen_lib
from semsafe_jax.models.loading import load_pretrained
from semsafe_jax.retention import aligned as aligned_lib

OUTPUT_FILE = "generations.jsonl"


def read_prompts_file(path: str) -> list[str]:
  """Prompts from a text file (one per line) or JSONL ({"prompt": ...} per line)."""
  if not os.path.isfile(path):
    raise MissingInputError(f"generate.prompts_file {path!r} does not exist.")
  try:
    with open(path, encoding="utf-8") as f:
      lines = [line.rstrip("\n") for line in f if line.strip()]
  except UnicodeDecodeError as e:
    raise InputFileError(
        f"generate.prompts_file {path!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
        f"offset {e.start}); save it as UTF-8.") from None
  except OSError as e:
    raise InputFileError(f"generate.prompts_file {path!r} cannot be read: "
                         f"{e.strerror or e}.") from None
  if not lines:
    raise InputFileError(f"generate.prompts_file {path!r} holds no prompts (it is empty).")
  if not (path.endswith(".jsonl") or all(line.lstrip().startswith("{") for line in lines)):
    return lines
  prompts = []
  for i, line in enumerate(lines, 1):
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise InputFileError(f"{path}:{i}: not valid JSON ({e.msg}).") from None
    text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
    if not isinstance(text, str):
      raise InputFileError(f"{path}:{i}: expected an object with a string \"prompt\" field.")
    prompts.append(text)
  return prompts


def collect_prompts(gc: Any) -> list[str]:
  prompts = [str(p) for p in (gc.prompts or [])]
  if gc.prompts_file:
    prompts += read_prompts_file(os.path.expanduser(gc.prompts_file))
  if not prompts:
    raise ConfigError("generate.prompts_file", gc.prompts_file,
                      "nothing to generate: set --config.generate.prompts_file=FILE "
                      "or config.generate.prompts")
  return prompts


def load_trained_adapters(workdir: str, model_name: str | None = None,
                          adapter_cfg: Any = None) -> tuple[Any, Any] | None:
  """(adapters, adapter config) of the latest checkpoint in workdir, or None.

  The adapter config is the one saved with the run (its LoRA scale is what the
  adapters were trained with); `adapter_cfg` is the fallback.
  """
  try:
    ckpt = importlib.import_module("semsafe_jax.train.checkpoint")
    load_latest = ckpt.load_latest_adapters
  except (ImportError, AttributeError) as e:
    logging.warning("Cannot read training checkpoints (%s); generating with the base model.", e)
    return None
  got = load_latest(workdir)
  if got is None:
    return None
  trainable, saved = got
  # The trainable tree holds the adapters (possibly next to other trained state).
  adapters = trainable.get("adapters", trainable) if isinstance(trainable, dict) else trainable
  adapters = {k: adapters[k] for k in ("lora", "embed_mlp", "full")
              if adapters.get(k) is not None}
  # A saved run config carries the adapter settings (LoRA scale) the adapters were trained with.
  if isinstance(saved, dict) and saved.get("adapters"):
    adapter_cfg = saved["adapters"]
  trained_on = (saved.get("model") or {}).get("name_or_path") if isinstance(saved, dict) else None
  if model_name is not None and trained_on is not None and trained_on != model_name:
    logging.warning("The adapters in %s were trained on %r, but model.name_or_path is %r.",
                    workdir, trained_on, model_name)
  return adapters, adapter_cfg


def _load_gate(workdir: str) -> Any:
  """The run's probe gate (W/gate.json), which the main job fits with gate.use=True."""
  from semsafe_jax.probes import gate as gate_lib  # pylint: disable=g-import-not-at-top

  path = os.path.join(workdir, gate_lib.GATE_FILE)
  if not files.exists(path):
    raise MissingInputError(f"gate.use=True: {path} does not exist; the main job writes it "
                            "when run with --config.gate.use=True")
  return gate_lib.load(path)


def run(config, workdir: str) -> list[dict[str, Any]]:
  gc, mc = config.generate, config.model
  prompts = collect_prompts(gc)
  pre = load_pretrained(mc.name_or_path, dtype=mc.dtype, param_dtype=mc.param_dtype,
                        layer_loop=mc.layer_loop)
  cfg, params, tok = pre.cfg, pre.params, pre.tokenizer
  if tok is None:
    raise ConfigError("model.name_or_path", mc.name_or_path,
                      "this model has no tokenizer; generation needs one")

  embed_fn, adapted, step_note, gate = None, False, "base model", None
  if gc.adapters:
    got = load_trained_adapters(workdir, str(mc.name_or_path), config.adapters)
    if got is None:
      logging.info("No training checkpoint in %s: generating with the base model.", workdir)
    else:
      adapters, adapter_cfg = got
      # A retention run's adapters sit on its aligned model (semsafe_jax/retention).
      final = aligned_lib.final_adapters(workdir, adapters, adapter_cfg)
      if final is not None:
        adapters = final[0]
        params, cfg = aligned_lib.model_of(workdir, params, cfg)
      if config.gate.use:
        gate = _load_gate(workdir)
        base_params, base_cfg = params, cfg
      params, embed_fn = adapters_lib.apply_trained(params, adapters, adapter_cfg)
      adapted = True
      step_note = f"trained adapters ({', '.join(sorted(adapters)) or 'none'}) from {workdir}"
      logging.info("Applying %s.", step_note)
  else:
    logging.info("generate.adapters=False: generating with the base model.")

  t0 = time.perf_counter()
  gen = lambda p, c, ps, e: gen_lib.generate_batch(
      p, c, tok, ps, max_new_tokens=gc.max_new_tokens, temperature=gc.temperature,
      top_k=gc.top_k, top_p=gc.top_p, seed=gc.seed, batch_size=gc.batch_size,
      stop_strings=tuple(gc.stop_strings or ()), chat=gc.chat, embed_fn=e)
  on = [adapted] * len(prompts)
  if gate is None:
    out = gen(params, cfg, prompts, embed_fn)
  else:  # the adapters answer what the gate flags, the base model the rest
    on = gate.flags(base_params, base_cfg, tok, prompts,
                    batch_size=int(config.probe.batch_size)).tolist()
    step_note += f", behind the probe gate (flagged {sum(on)} of {len(prompts)})"
    sides = {True: [i for i, f in enumerate(on) if f], False: [i for i, f in enumerate(on)
                                                               if not f]}
    got: dict[int, tuple[str, list[int], bool]] = {}
    for side, ix in sides.items():
      if ix:
        g = gen(*((params, cfg) if side else (base_params, base_cfg)),
                [prompts[i] for i in ix], embed_fn if side else None)
        got.update(zip(ix, zip(g.texts, g.token_ids, g.finished)))
    out = gen_lib.Generation(*(list(col) for col in zip(*(got[i] for i in range(len(prompts))))))
  seconds = time.perf_counter() - t0
  n_tokens = sum(len(t) for t in out.token_ids)
  logging.info("Generated %d tokens for %d prompts in %.1fs (%s).", n_tokens, len(prompts),
               seconds, step_note)

  rows = [{"index": i, "prompt": p, "completion": c, "num_tokens": len(ids), "finished": fin,
           "adapters": bool(a), "model": str(mc.name_or_path)}
          for i, (p, c, ids, fin, a) in enumerate(zip(prompts, out.texts, out.token_ids,
                                                      out.finished, on))]
  for r in rows:
    print(f"### prompt {r['index']}: {r['prompt']}\n{r['completion']}\n", flush=True)
  if jax.process_index() == 0:
    write_jsonl(os.path.join(workdir, OUTPUT_FILE), rows)
    print(f"Wrote {len(rows)} generations to {os.path.join(workdir, OUTPUT_FILE)} "
          f"({step_note}).", flush=True)
  return rows
