"""Decoder models: config, functional transformer, checkpoint loading."""

from semsafe_jax.models.config import ModelConfig, from_hf_dict
from semsafe_jax.models.loading import ModelLoadError, Pretrained, load_pretrained
from semsafe_jax.models.transformer import ModelOutput, forward

__all__ = ["ModelConfig", "from_hf_dict", "forward", "ModelOutput",
           "load_pretrained", "Pretrained", "ModelLoadError"]
