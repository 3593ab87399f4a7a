"""Export trained adapters to the PyTorch world (PEFT, merged transformers) or Orbax."""

from semsafe_jax.export.hf import hf_config_dict, save_hf_model
from semsafe_jax.export.merged import fold_embed_mlp, merged_params, save_merged
from semsafe_jax.export.native import load_orbax, save_orbax
from semsafe_jax.export.peft import peft_config_dict, save_peft

__all__ = [
    "fold_embed_mlp", "hf_config_dict", "load_orbax", "merged_params", "peft_config_dict",
    "save_hf_model", "save_merged", "save_orbax", "save_peft",
]
