"""One contract for every registered method and every config under configs/methods/.

For each method: the loss is the same with and without jit, its gradients are finite and
reach every trainable leaf group; for each config: the main job runs end to end on the
tiny config (`configs/methods/<name>.py:tiny`) and exports in its configured format.
The retention methods start from a safety run's workdir: tests/test_retention.py holds
them to the same contract.
"""

import pathlib

import jax
import numpy as np
import pytest

from semsafe_jax import methods, retention
from semsafe_jax.configs import load_config
from semsafe_jax.data.pipeline import prepare_data
from semsafe_jax.jobs import export as export_job
from semsafe_jax.jobs import train as train_job
from semsafe_jax.methods.context import Context
from semsafe_jax.models.loading import load_pretrained
from semsafe_jax.train import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
ALL_CONFIGS = sorted(p.stem for p in (REPO / "configs" / "methods").glob("*.py"))
CONFIGS = [c for c in ALL_CONFIGS if c not in retention.METHODS]
NAMES = [n for n in methods.names() if n not in retention.METHODS]


def method_config(name: str):
  c = load_config(str(REPO / "configs" / "methods" / f"{name}.py"), "tiny")
  c.train.progress = False
  return c


@pytest.fixture(scope="module")
def shared(tmp_path_factory, fast_compile):
  """Data and the tiny model, prepared once; each method gets its own Context on them."""
  del fast_compile
  w = tmp_path_factory.mktemp("contract")
  config = method_config("semsafe")
  data = prepare_data(config, w)
  pre = load_pretrained(config.model.name_or_path)
  return w, data, pre


def test_every_method_has_a_config():
  assert set(methods.names()) <= set(ALL_CONFIGS)


@pytest.mark.parametrize("name", NAMES)
def test_loss_contract(shared, name):
  w, data, pre = shared
  config = method_config(name)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
  ctx = Context(config, str(w), data, pre.cfg, pre.params, pre.tokenizer, mesh)
  prepared = methods.get(name).prepare(ctx)
  batch = prepared.batch_fn(0)
  rng = jax.random.key(0)

  def f(t):
    return prepared.loss_fn(t, prepared.frozen, batch, rng)

  (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(prepared.trainable)
  with jax.disable_jit():
    loss_e, metrics_e = f(prepared.trainable)
  np.testing.assert_allclose(loss, loss_e, rtol=2e-5, atol=1e-6)
  assert np.isfinite(float(loss)) and "l_total" in metrics
  for k, v in metrics.items():
    if "accuracy" in k:  # counts ties at init (chosen = rejected): decided by rounding noise
      continue
    np.testing.assert_allclose(v, metrics_e[k], rtol=2e-4, atol=1e-5, err_msg=k)
  for group, g in grads.items():
    leaves = [np.asarray(x) for x in jax.tree.leaves(g)]
    assert all(np.all(np.isfinite(x)) for x in leaves), group
    assert sum(float(np.abs(x).sum()) for x in leaves) > 0, f"{name}: no gradient in {group}"


@pytest.mark.parametrize("name", CONFIGS)
def test_end_to_end_and_export(tmp_path, fast_compile, name):
  del fast_compile
  config = method_config(name)
  report = train_job.run(config, str(tmp_path))
  assert report["method"] == config.method.name
  assert report["after"]["heldout_intent"]["n"] > 0
  assert report["final_metrics"]["step"] == config.train.steps
  assert np.isfinite(report["final_metrics"]["loss"])
  out = export_job.run(config, str(tmp_path))
  assert pathlib.Path(out).is_dir() and any(pathlib.Path(out).iterdir())
