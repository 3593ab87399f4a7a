"""Mesh, sharding rules, and 8 emulated devices == 1 device."""

import numpy as np
import jax
from jax.sharding import PartitionSpec as P

import test_train_toy as toy
from semsafe_jax.train import sharding

# Runs in a subprocess with 8 emulated CPU devices: placement checks, then the
# reference run under two meshes. Results go to the .npz named in argv[1].
_ON_8_DEVICES = r"""
import sys
import jax, numpy as np
import test_train_toy as toy
from semsafe_jax.train import sharding
P = jax.sharding.PartitionSpec
assert jax.device_count() == 8
mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
axes = sharding.model_logical_axes(toy.CFG)
placed = sharding.place_tree(toy.frozen_params(), mesh, sharding.get_rules("fsdp_tensor"), axes)
q = placed["layers"]["attn"]["q_proj"]["kernel"]
assert q.sharding.spec == P(None, "fsdp", "model"), q.sharding.spec
assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 16, 16)
b = sharding.shard_batch({"ids": np.zeros((8, 5), np.int32), "w": np.zeros((3,))}, mesh)
assert b["ids"].sharding.spec == P(("data", "fsdp"))
assert b["ids"].addressable_shards[0].data.shape == (2, 5)
assert b["w"].sharding.is_fully_replicated

out = {}
runs = {"dp": ({"data": -1}, "replicate"),
        "fsdp_tp": ({"data": 2, "fsdp": 2, "model": 2}, "fsdp_tensor")}
for name, (shape, rules) in runs.items():
  c = toy.toy_config(toy.STRAIGHT_STEPS, sharding=rules)
  c.train.mesh.update(shape)
  params, history = toy.run(f"{sys.argv[2]}/{name}", c, frozen_axes=axes)
  out[f"{name}_params"] = toy.flat(params)
  out[f"{name}_loss"] = np.array([h["loss"] for h in history])
np.savez(sys.argv[1], **out)
"""


def test_8_devices_match_1_device(tmp_path):
  ref = toy.straight_run()  # this process: one CPU device
  assert jax.device_count() == 1
  out = tmp_path / "out.npz"
  proc = toy.subprocess.run([toy.sys.executable, "-c", _ON_8_DEVICES, str(out), str(tmp_path)],
                            env=toy.subprocess_env(8), capture_output=True, text=True,
                            timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  got = np.load(out)
  ref_loss = np.array([h["loss"] for h in ref["history"]])
  # Pure data parallel, and data x fsdp x model with the frozen model sharded.
  for name in ("dp", "fsdp_tp"):
    np.testing.assert_allclose(got[f"{name}_loss"], ref_loss, atol=1e-5, rtol=0, err_msg=name)
    np.testing.assert_allclose(got[f"{name}_params"], ref["params"], atol=1e-5, rtol=0,
                               err_msg=name)
  # The adapters moved: the comparison is not vacuous.
  assert np.abs(ref["params"] - toy.flat(toy.init_trainable())).max() > 1e-3


def test_make_mesh_and_rules():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data", "fsdp", "model") and mesh.shape["data"] == 1
  rules = sharding.get_rules("fsdp")
  # A size-1 axis, or one that does not divide the dim, replicates.
  assert sharding.logical_to_spec((4, 6), ("vocab", "embed"), mesh, rules) == P()
  assert sharding.batch_sharding(mesh, (3, 2)).spec == P(("data", "fsdp"))
  try:
    sharding.make_mesh({"data": 3})
  except ValueError as e:
    assert "needs 3 devices" in str(e)
  else:
    raise AssertionError("expected a ValueError")


def test_rules_tables_cover_model_axes():
  devices = np.array(jax.devices() * 8)[:8]  # specs only: the mesh is never used to compute
  mesh = jax.sharding.Mesh(devices.reshape(2, 2, 2), sharding.MESH_AXES)
  axes = sharding.model_logical_axes(toy.CFG)
  spec = lambda path, rules: sharding.logical_to_spec(
      (2, 32, 32), axes[path], mesh, sharding.get_rules(rules))
  assert spec("layers/attn/q_proj/kernel", "replicate") == P()
  assert spec("layers/attn/q_proj/kernel", "fsdp") == P(None, "fsdp")
  assert spec("layers/attn/q_proj/kernel", "tensor") == P(None, None, "model")
  assert spec("layers/mlp/down_proj/kernel", "fsdp_tensor") == P(None, "model", "fsdp")
  assert sharding.logical_to_spec((32,), axes["final_norm/scale"], mesh,
                                  sharding.get_rules("fsdp_tensor")) == P()
