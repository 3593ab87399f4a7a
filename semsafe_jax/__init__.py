"""semsafe_jax: semantically consistent refusal fine-tuning for LLMs in JAX/Flax."""

__version__ = "0.1.0"
