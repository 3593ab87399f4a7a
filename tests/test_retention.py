"""The retention scenario: the regularisers against hand computations, the task set, the
aligned model, and every retention method end to end from a tiny safety run."""

import importlib.util
import json
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semsafe_jax import adapters as adapters_lib
from semsafe_jax import methods, retention
from semsafe_jax.configs import load_config
from semsafe_jax.data.pipeline import prepare_data
from semsafe_jax.data.schema import DataError
from semsafe_jax.eval import base as eval_base
from semsafe_jax.files import read_jsonl
from semsafe_jax.jobs import export as export_job
from semsafe_jax.jobs import train as train_job
from semsafe_jax.methods.context import Context
from semsafe_jax.models import transformer
from semsafe_jax.models.loading import load_pretrained
from semsafe_jax.retention import aligned as aligned_lib
from semsafe_jax.retention import common, regularizers
from semsafe_jax.retention import tasks as tasks_lib
from semsafe_jax.train import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


def _make_tasks():
  """semsafe_jax/data/builtin/make_tasks.py, a script beside the data (not a module)."""
  spec = importlib.util.spec_from_file_location(
      "make_tasks", REPO / "semsafe_jax" / "data" / "builtin" / "make_tasks.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _orthonormal(rows, cols, rng=RNG):
  return np.linalg.qr(rng.standard_normal((rows, cols)))[0].astype(np.float32)


# --- SaLoRA.


def test_salora_output_has_no_component_in_span_u():
  L, I, O, r, s = 2, 12, 10, 3, 2.0
  a = RNG.standard_normal((L, I, r)).astype(np.float32)
  b = RNG.standard_normal((L, r, O)).astype(np.float32)
  u = np.stack([_orthonormal(O, 4) for _ in range(L)])
  init = {"u": u, "a0": RNG.standard_normal((L, I, r)).astype(np.float32),
          "b0c": np.asarray(regularizers.project_out(
              jnp.asarray(RNG.standard_normal((L, r, O)), jnp.float32), u))}
  a2, b2 = regularizers.salora_factors(a, b, init)
  x = RNG.standard_normal((5, I)).astype(np.float32)
  for l in range(L):
    y = s * x @ np.asarray(a2[l]) @ np.asarray(b2[l])  # the LoRA branch's output
    assert np.abs(y @ u[l]).max() < 1e-4 * np.abs(y).max()
    # ... and the trainable part alone is x a b (I - u uᵀ).
    want = s * x @ a[l] @ b[l] @ (np.eye(O) - u[l] @ u[l].T)
    got = s * x @ a[l] @ np.asarray(regularizers.project_out(b, u))[l]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_salora_init_hand_case():
  I, O, r, scale = 8, 6, 2, 2.0
  k = RNG.standard_normal((I, O)).astype(np.float32)
  # Harmful inputs live on two directions: their outputs span (e0, e1) K.
  basis = np.eye(I, dtype=np.float32)[:2]
  gh = basis.T @ np.diag([9.0, 4.0]).astype(np.float32) @ basis
  got = regularizers.salora_layer(jnp.asarray(k), jnp.asarray(gh), jnp.eye(I), jax.random.key(0),
                                  rank=r, safety_rank=2, task_rank=O, scale=scale, iters=12)
  u = np.asarray(got["u"])
  span = np.linalg.qr((basis @ k).T)[0]  # the outputs' span
  np.testing.assert_allclose(np.abs(np.linalg.svd(u.T @ span)[1]), 1.0, atol=1e-4)
  # Task directions covering everything: the initial update is K's top-r SVD part.
  p, sv, qt = np.linalg.svd(k, full_matrices=False)
  k_r = (p[:, :r] * sv[:r]) @ qt[:r]
  np.testing.assert_allclose(scale * np.asarray(got["a0"]) @ np.asarray(got["b0"]), k_r,
                             atol=1e-3)
  # The offset is that update through C, so training starts at the aligned model.
  c = np.eye(O) - u @ u.T
  np.testing.assert_allclose(np.asarray(got["b0c"]), np.asarray(got["b0"]) @ c, atol=1e-5)
  a2, b2 = regularizers.salora_factors(got["a0"][None], got["b0"][None],
                                       {k_: v[None] for k_, v in got.items()})
  assert np.abs(np.asarray(a2[0] @ b2[0])).max() < 1e-5


# --- AsFT.


def _asft_by_hand(a, b, v, scale):
  total = 0.0
  for l in range(a.shape[0]):
    vt = v[l].T.astype(np.float64)  # W convention: [out, in]
    n = np.linalg.norm(vt)
    c = vt @ vt.T / n if n > 0 else np.zeros((vt.shape[0],) * 2)
    dw = (scale * a[l] @ b[l]).T.astype(np.float64)
    total += np.linalg.norm((np.eye(c.shape[0]) - c) @ dw) ** 2
  return total


def test_asft_penalty_equals_the_frobenius_formula():
  L, I, O, r, s = 3, 9, 7, 2, 2.0
  a = RNG.standard_normal((L, I, r)).astype(np.float32)
  b = RNG.standard_normal((L, r, O)).astype(np.float32)
  x = RNG.standard_normal((L, I, 3)).astype(np.float32)
  y = RNG.standard_normal((L, 3, O)).astype(np.float32)
  x[2] = 0.0  # a layer the safety run left alone: every update there is off V
  v = np.einsum("lir,lro->lio", x, y)
  want = _asft_by_hand(a, b, v, s)
  low = regularizers.asft_penalty(a, b, regularizers.asft_factor(x, y), s)
  dense = regularizers.asft_penalty(a, b, regularizers.asft_factor(v, None), s)
  np.testing.assert_allclose(float(low), want, rtol=1e-4)
  np.testing.assert_allclose(float(dense), want, rtol=1e-4)


# --- AlignGuard-LoRA.


def test_fisher_penalty_zero_at_init_and_hand_case():
  L, I, O, r, s = 2, 3, 4, 2, 2.0
  w = RNG.uniform(0, 2, (L, I, O)).astype(np.float32)
  a = RNG.standard_normal((L, I, r)).astype(np.float32)
  assert float(regularizers.weighted_sq_penalty(a, np.zeros((L, r, O), np.float32), w, s)) == 0
  b = RNG.standard_normal((L, r, O)).astype(np.float32)
  want = sum(w[l, i, o] * (s * sum(a[l, i, k] * b[l, k, o] for k in range(r))) ** 2
             for l in range(L) for i in range(I) for o in range(O))
  np.testing.assert_allclose(float(regularizers.weighted_sq_penalty(a, b, w, s)), want,
                             rtol=1e-5)


def test_fisher_weights_split_by_coordinate():
  f = {"m": np.arange(1, 11, dtype=np.float32).reshape(1, 2, 5)}  # mean 5.5
  h = {"m": np.full((1, 2, 5), 2.0, np.float32)}
  w = regularizers.fisher_weights(f, h, critical_frac=0.2)["m"]
  crit = w["align"] > 0
  assert crit.sum() == 2 and set(w["align"][crit] * 5.5) == {9.0, 10.0}
  np.testing.assert_allclose(w["task"][~crit], 1.0)
  assert not np.any(w["task"][crit])


# --- Tasks.


def test_builtin_tasks_file_is_current_and_split_is_stable():
  make_tasks = _make_tasks()
  assert make_tasks.main(["--check"]) == 0
  tasks = tasks_lib.load_tasks([tasks_lib.BUILTIN])
  assert len(tasks) == len(make_tasks.build()) > 400
  split = tasks_lib.split(tasks, 0.2)
  assert 0.1 < len(split.heldout) / len(tasks) < 0.3
  assert not {t.id for t in split.train} & {t.id for t in split.heldout}
  # Held out by id alone: the same task is held out whatever else is loaded.
  assert tasks_lib.split(tasks[::2], 0.2).heldout == [t for t in split.heldout
                                                      if t in tasks[::2]]
  # Every computed answer is right.
  by_id = {t.id: t for t in tasks}
  assert by_id["task-capital-001"].response == "Paris"
  for t in tasks:
    if t.category == "arithmetic" and "+" in t.prompt:
      x, y = (int(n) for n in t.prompt.removeprefix("What is ").rstrip("?").split(" + "))
      assert int(t.response) == x + y


def test_task_sources_files_and_errors(tmp_path):
  j = tmp_path / "t.json"
  j.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi."},
                           {"instruction": "Say bye.", "output": "Bye."}]))
  got = tasks_lib.load_tasks([f"json:{j}?prompt_col=instruction&response_col=output"])
  assert [(t.id, t.prompt) for t in got] == [("t-1", "Say hi."), ("t-2", "Say bye.")]
  jl = tmp_path / "t.jsonl"
  jl.write_text('{"prompt": "Add 1 and 2.", "response": "3"}\n')
  assert tasks_lib.load_tasks([str(jl)])[0].response == "3"
  for bad, match in ((f"csv:{jl}", "expected"), (f"jsonl:{jl}?text_col=x", "unknown option"),
                     (f"jsonl:{tmp_path}/none.jsonl", "no file"),
                     (f"json:{j}", "needs non-empty strings")):
    with pytest.raises(DataError, match=match):
      tasks_lib.load_tasks([bad])


def test_task_batches_cover_every_task_each_epoch():
  n, per = 10, 4
  seen = np.concatenate([tasks_lib.batch_rows(n, per, 3, s) for s in range(5)])  # 2 epochs
  assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:2 * n]) == list(range(n))
  np.testing.assert_array_equal(tasks_lib.batch_rows(n, per, 3, 2), seen[8:12])


# --- The aligned model's statistics.


def test_kernel_input_grams_match_the_layer_inputs(base):
  from conftest import TINY  # pylint: disable=g-import-not-at-top
  ids = RNG.integers(0, TINY.vocab_size, (3, 7)).astype(np.int32)
  mask = np.ones((3, 7), bool)
  mask[0, 5:] = False
  grams = common.kernel_input_grams(base, TINY, ids, mask, ["layers/attn/q_proj"], 2)
  x = transformer.embed(base, TINY, jnp.asarray(ids))
  h = transformer.rms_norm(x, base["layers"]["pre_attn_norm"]["scale"][0], TINY.rms_eps,
                           TINY.norm_offset)
  h = np.asarray(h, np.float64)[mask]
  np.testing.assert_allclose(grams["layers/attn/q_proj"][0], h.T @ h, rtol=1e-4, atol=1e-4)
  assert grams["layers/attn/q_proj"].shape == (TINY.num_layers, TINY.hidden_size,
                                               TINY.hidden_size)


def test_check_splits_refuses_a_leak(tmp_path):
  data = types.SimpleNamespace(
      prompts=[types.SimpleNamespace(id="h-1"), types.SimpleNamespace(id="h-2")],
      splits={"heldout_intent": np.asarray([0]), "train": np.asarray([1])})
  (tmp_path / "splits.json").write_text(json.dumps({"train": ["h-2"]}))
  aligned = aligned_lib.Aligned(str(tmp_path), 1, {}, {}, "semsafe", {}, None)
  aligned_lib.check_splits(aligned, data)
  (tmp_path / "splits.json").write_text(json.dumps({"train": ["h-1", "h-2"]}))
  with pytest.raises(DataError, match="h-1"):
    aligned_lib.check_splits(aligned, data)


def test_config_errors_are_one_line(tmp_path):
  from semsafe_jax import validate  # pylint: disable=g-import-not-at-top
  from semsafe_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  c = load_config(str(REPO / "configs" / "methods" / "asft.py"), "tiny")
  c.retention.aligned_workdir = str(tmp_path / "none")
  with pytest.raises(ConfigError, match="holds no checkpoint"):
    validate.validate(c)
  c = load_config(str(REPO / "configs" / "tiny.py"))
  c.method.name = "salora"  # a retention method without configs/retention.py
  with pytest.raises(ConfigError, match="retention"):
    validate.validate(c)


def test_dataset_card_counts_the_task_set():
  card = (REPO / "semsafe_jax" / "data" / "builtin" / "DATASET_CARD.md").read_text()
  tasks = tasks_lib.load_tasks([tasks_lib.BUILTIN])
  assert f"The task set ({len(tasks)} pairs)" in card.replace("\n", " ")
  for cat in {t.category for t in tasks}:
    assert f"({sum(t.category == cat for t in tasks)}" in card, cat


def test_before_cache_is_per_aligned_model():
  c = load_config(str(REPO / "configs" / "methods" / "task_lora.py"), "tiny")
  plain = eval_base.base_cache_file(c, "/w")
  assert plain == eval_base.base_cache_file(c, "/w", "")
  one, two = (eval_base.base_cache_file(c, "/w", f"/safety@{s}") for s in (6, 8))
  assert len({plain, one, two}) == 3


# --- End to end from a tiny safety run.


def _small_evals(c, tasks: bool = True):
  c.judges = ("string_match",)
  evals = {"refusal": {"type": "refusal_splits", "groups": ("heldout_intent", "lookalike"),
                       "max_per_split": 2}}
  if tasks:
    evals["task"] = {"type": "task", "max_prompts": 3, "agree_tokens": 4}
  c.evals = evals


@pytest.fixture(scope="module")
def safety_run(tmp_path_factory, fast_compile):
  """A tiny safety run (ours), the aligned model of every retention test."""
  del fast_compile
  root = tmp_path_factory.mktemp("retention")
  c = load_config(str(REPO / "configs" / "tiny.py"))
  c.train.progress, c.train.steps, c.checkpoint.every = False, 3, 3
  c.data.cache_dir = str(root / "cache")
  _small_evals(c, tasks=False)
  train_job.run(c, str(root / "safety"))
  return root


def retention_config(name: str, root: pathlib.Path):
  c = load_config(str(REPO / "configs" / "methods" / f"{name}.py"), "tiny")
  c.retention.aligned_workdir = str(root / "safety")
  c.train.progress, c.train.steps = False, 2
  c.data.cache_dir = str(root / "cache")
  c.eval.cache_dir = str(root / "eval_cache")  # the aligned model answers once
  _small_evals(c)
  return c


def test_every_retention_method_is_registered_with_a_config():
  assert set(retention.METHODS) <= set(methods.names())
  for name in retention.METHODS:
    assert load_config(str(REPO / "configs" / "methods" / f"{name}.py"), "tiny").method.name \
        == name


@pytest.fixture(scope="module")
def shared(safety_run, tmp_path_factory):
  """The safety run's data (same settings, same splits), the tiny model and the aligned
  model, prepared once; each method gets its own Context on them."""
  w = tmp_path_factory.mktemp("contract")
  data = prepare_data(retention_config("task_lora", safety_run), w)
  pre = load_pretrained("tiny-random")
  aligned = aligned_lib.load(str(safety_run / "safety"), "tiny-random", pre.params, pre.cfg)
  return data, pre, aligned


@pytest.mark.parametrize("name", retention.METHODS)
def test_loss_contract(safety_run, shared, tmp_path, name):
  config = retention_config(name, safety_run)
  data, pre, aligned = shared
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
  ctx = Context(config, str(tmp_path), data, aligned.cfg, aligned.params, pre.tokenizer, mesh,
                aligned=aligned)
  prepared = methods.get(name).prepare(ctx)
  batch = prepared.batch_fn(0)
  rng = jax.random.key(0)
  # Away from init, so every regulariser has a gradient (SaLoRA starts off zero anyway).
  trainable = jax.tree.map(lambda x: x + 0.01 * jnp.ones_like(x), prepared.trainable)

  def f(t):
    return prepared.loss_fn(t, prepared.frozen, batch, rng)

  (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(trainable)
  with jax.disable_jit():
    loss_e, _ = f(trainable)
  np.testing.assert_allclose(loss, loss_e, rtol=2e-5, atol=1e-6)
  assert np.isfinite(float(loss)) and float(metrics["l_task"]) > 0
  leaves = [np.asarray(x) for x in jax.tree.leaves(grads)]
  assert all(np.all(np.isfinite(x)) for x in leaves) and sum(np.abs(x).sum() for x in leaves)
  # At init every method is the aligned model itself.
  l_init = prepared.loss_fn(prepared.trainable, prepared.frozen, batch, rng)[1]["l_task"]
  l_ref = common.task_loss(aligned.params, aligned.cfg, adapters_lib.adapted_embed_fn({}),
                           batch.task, common.n_max(config))
  np.testing.assert_allclose(float(l_init), float(l_ref), rtol=1e-4)


@pytest.mark.parametrize("w_capability", [5.0, 0.0])
def test_semsafe_retain_keeps_the_aligned_models_benign_answers(safety_run, shared, tmp_path,
                                                                w_capability):
  """L_capability is the KL to the aligned (frozen) model on the benign block: zero at init,
  positive once the adapters move; with w_capability = 0 the block is empty."""
  config = retention_config("semsafe_retain", safety_run)
  config.loss.w_capability = w_capability
  data, pre, aligned = shared
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
  ctx = Context(config, str(tmp_path), data, aligned.cfg, aligned.params, pre.tokenizer, mesh,
                aligned=aligned)
  prepared = methods.get("semsafe_retain").prepare(ctx)
  batch = prepared.batch_fn(0)
  benign = batch.safety.safety.benign
  assert (benign.ids.shape[0] > 0) == (w_capability > 0)
  if not w_capability:
    return
  # The answers trained towards are the aligned model's own.
  answers = [r["completion"] for r in read_jsonl(str(tmp_path / "base_answers.jsonl"))]
  assert answers == ctx.base_generate(data.texts(ctx.sft.benign_rows[:len(answers)]),
                                      config.eval.base_answer_tokens)
  rng = jax.random.key(0)
  at_init = prepared.loss_fn(prepared.trainable, prepared.frozen, batch, rng)[1]
  moved = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), prepared.trainable)
  away = prepared.loss_fn(moved, prepared.frozen, batch, rng)[1]
  assert abs(float(at_init["l_capability"])) < 1e-6 < float(away["l_capability"])


@pytest.mark.parametrize("name", retention.METHODS)
def test_end_to_end_and_export(safety_run, shared, tmp_path, name):
  config = retention_config(name, safety_run)
  report = train_job.run(config, str(tmp_path))
  assert report["method"] == name
  assert report["final_metrics"]["step"] == config.train.steps
  assert np.isfinite(report["final_metrics"]["loss"])
  assert report["method_report"]["aligned"]["workdir"] == str(safety_run / "safety")
  for stage in ("before", "after"):
    task = report["evals"]["task"][stage]
    assert task["task_nll"]["n"] == 3 and np.isfinite(task["task_nll"]["value"])
    assert report["evals"]["refusal"][stage]["heldout_intent/refusal"]["n"] > 0
  record = json.loads((tmp_path / "aligned.json").read_text())
  assert record["retention_method"] == name and record["step"] == 3
  config.export.format = "merged"
  out = pathlib.Path(export_job.run(config, str(tmp_path)))
  # The merged export is the aligned model plus the run's final adapters.
  got = load_pretrained(str(out))
  _, _, aligned = shared
  final = aligned_lib.final_adapters(str(tmp_path), _trainable(tmp_path), config.adapters)[0]
  ids = jnp.asarray(RNG.integers(0, aligned.cfg.vocab_size, (2, 6)), jnp.int32)
  ours = adapters_lib.adapted_forward(aligned.params, final, aligned.cfg, config.adapters, ids)
  theirs = transformer.forward(got.params, got.cfg, ids)
  np.testing.assert_allclose(np.asarray(theirs.logits), np.asarray(ours.logits), atol=1e-3)


def _trainable(workdir):
  from semsafe_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  return ckpt_lib.load_adapters(str(workdir)).trainable
