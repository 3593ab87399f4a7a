"""Training: a generic jit train step, mesh sharding, Orbax checkpoints, `fit`."""

from semsafe_jax.train.checkpoint import (
                                          ConfigMismatchError,
                                          load_latest_adapters,
                                          prepare_workdir,
)
from semsafe_jax.train.sharding import (
                                          initialize_distributed,
                                          make_mesh,
                                          model_logical_axes,
)
from semsafe_jax.train.step import TrainState, TrainStep, make_optimizer
from semsafe_jax.train.trainer import NonFiniteError, Preempted, fit

__all__ = [
    "ConfigMismatchError", "NonFiniteError", "Preempted", "TrainState", "TrainStep", "fit",
    "initialize_distributed", "load_latest_adapters", "make_mesh", "make_optimizer",
    "model_logical_axes", "prepare_workdir",
]
