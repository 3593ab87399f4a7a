"""mode=export end to end: a workdir checkpoint -> PEFT / merged / Orbax exports."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

from semsafe_jax import adapters as adapters_lib
from semsafe_jax import export
from semsafe_jax.jobs import export as export_job
from semsafe_jax.models.loading import load_pretrained
from semsafe_jax.train import checkpoint
from semsafe_jax.train.step import TrainState

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config():
  spec = importlib.util.spec_from_file_location("tiny_config",
                                                os.path.join(_ROOT, "configs", "tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  config.mode = "export"
  return config


def _write_checkpoint(workdir: str, config, adapters, step: int = 3) -> None:
  checkpoint.prepare_workdir(workdir, config)
  state = TrainState(trainable=adapters, opt_state=optax.adam(1e-3).init(adapters),
                     step=jnp.int32(step), rng=jnp.zeros((2,), jnp.uint32),
                     bad_total=jnp.int32(0), bad_consecutive=jnp.int32(0))
  ckpt = checkpoint.Checkpointer(workdir, every=1, keep=2, async_save=False)
  ckpt.save(step, state, {"seed": 0}, force=True)
  ckpt.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir holding a checkpoint of random non-zero adapters on tiny-random."""
  config = _tiny_config()
  workdir = str(tmp_path_factory.mktemp("run"))
  pre = load_pretrained(config.model.name_or_path)
  ad = adapters_lib.init_adapters(config.adapters, pre.cfg, pre.params, jax.random.PRNGKey(0))
  leaves, tree = jax.tree.flatten(ad)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  ad = jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape)
                                 for k, x in zip(keys, leaves)])
  _write_checkpoint(workdir, config, ad)
  ids = np.asarray(pre.tokenizer(["Tell me how to bake bread."])["input_ids"])
  logits = adapters_lib.adapted_forward(pre.params, ad, pre.cfg, config.adapters,
                                        jnp.asarray(ids)).logits
  return dict(config=config, workdir=workdir, adapters=ad, ids=ids, logits=np.asarray(logits))


def _torch_logits(model, ids) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids)).logits.float().numpy()


def test_export_merged(trained):
  config = trained["config"]
  config.export.format = "merged"
  out = export_job.run(config, trained["workdir"])
  assert out == os.path.join(trained["workdir"], "export", "merged")
  files = os.listdir(out)
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert np.abs(_torch_logits(model, trained["ids"]) - trained["logits"]).max() < 1e-3
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok("Tell me how to bake bread.")["input_ids"] == trained["ids"][0].tolist()


def test_export_peft_with_base(trained):
  config = trained["config"]
  config.export.format = "peft"
  out = export_job.run(config, trained["workdir"])
  with open(os.path.join(out, "adapter_config.json")) as f:
    conf = json.load(f)
  # tiny-random is no transformers checkpoint, so the base model is exported too.
  assert conf["base_model_name_or_path"] == os.path.join(os.path.abspath(out), "base")
  assert conf["r"] == config.adapters.lora_rank
  assert conf["lora_alpha"] == config.adapters.lora_alpha
  # AutoPeftModel finds the base through adapter_config.json.
  model = peft.AutoPeftModelForCausalLM.from_pretrained(out).eval()
  assert np.abs(_torch_logits(model, trained["ids"]) - trained["logits"]).max() < 1e-3
  # Exporting again writes over the earlier export.
  assert export_job.run(config, trained["workdir"]) == out


def test_export_orbax(trained):
  config = trained["config"]
  config.export.format = "orbax"
  out = export_job.run(config, trained["workdir"])
  restored, conf = export.load_orbax(out)
  assert conf["base_model_name_or_path"] == "tiny-random"
  assert conf["adapters"]["lora_rank"] == config.adapters.lora_rank
  jax.tree.map(np.testing.assert_allclose, restored, jax.tree.map(np.asarray, trained["adapters"]))


def test_export_without_checkpoint_is_a_clear_error(tmp_path):
  config = _tiny_config()
  with pytest.raises(FileNotFoundError, match="Train first"):
    export_job.run(config, str(tmp_path))


def test_export_refuses_foreign_out_dir(trained, tmp_path):
  config = trained["config"]
  config.export.format = "merged"
  (tmp_path / "notes.txt").write_text("keep me")
  config.export.out_dir = str(tmp_path)
  try:
    with pytest.raises(FileExistsError):
      export_job.run(config, trained["workdir"])
  finally:
    config.export.out_dir = ""
  assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_transformers_loadable(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  assert export_job.transformers_loadable(str(tmp_path))
  assert export_job.transformers_loadable("HuggingFaceTB/SmolLM2-135M-Instruct")
  assert not export_job.transformers_loadable("smollm2-135m-instruct")
  assert not export_job.transformers_loadable("tiny-random:qwen3")
  assert not export_job.transformers_loadable(str(tmp_path / "model.gguf"))
