"""Mesh, sharding rules, and 8 emulated devices == 1 device."""

import numpy as np
import jax
from jax.sharding import PartitionSpec as P

import test_train_toy as toy
from semsafe_jax.train import sharding

_CHECK_8_DEVICES = r"""
import jax, numpy as np
import test_train_toy as toy
from semsafe_jax.train import sharding
assert jax.device_count() == 8
mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
axes = sharding.model_logical_axes(toy.CFG)
placed = sharding.place_tree(toy.frozen_params(), mesh, sharding.get_rules("fsdp_tensor"), axes)
q = placed["layers"]["attn"]["q_proj"]["kernel"]
assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "model"), q.sharding.spec
assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 16, 16)
b = sharding.shard_batch({"ids": np.zeros((8, 5), np.int32), "w": np.zeros((3,))}, mesh)
assert b["ids"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
assert b["ids"].addressable_shards[0].data.shape == (2, 5)
assert b["w"].sharding.is_fully_replicated
print("PLACEMENT_OK")
"""


def _run_8_devices(tmp_path, name, *args):
  out = tmp_path / f"{name}.npz"
  proc = toy.start_cli(["--workdir", str(tmp_path / name), "--out", str(out),
                        "--steps", str(toy.STRAIGHT_STEPS), *args], devices=8)
  log, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, log
  return np.load(out)


def test_8_devices_match_1_device(tmp_path):
  ref = toy.straight_run()  # this process: one CPU device
  assert jax.device_count() == 1
  ref_loss = np.array([h["loss"] for h in ref["history"]])
  # Pure data parallel, and data x fsdp x model with the frozen model sharded.
  for name, args in [("dp", []),
                     ("fsdp_tp", ["--mesh", "data=2,fsdp=2,model=2",
                                  "--sharding", "fsdp_tensor"])]:
    got = _run_8_devices(tmp_path, name, *args)
    assert int(got["devices"]) == 8
    np.testing.assert_allclose(got["loss"], ref_loss, atol=1e-5, rtol=0, err_msg=name)
    np.testing.assert_allclose(got["params"], ref["params"], atol=1e-5, rtol=0, err_msg=name)
    # The adapters moved: the comparison is not vacuous.
    assert np.abs(got["params"] - toy.flat(toy.init_trainable())).max() > 1e-3


def test_placement_on_8_devices():
  proc = toy.subprocess.run([toy.sys.executable, "-c", _CHECK_8_DEVICES],
                            env=toy.subprocess_env(8), capture_output=True, text=True,
                            timeout=300)
  assert "PLACEMENT_OK" in proc.stdout, proc.stdout + proc.stderr


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
