"""full_ft: the lora_sft loss with every weight of the model trainable.

The trainable tree holds {"full": params} (see semsafe_jax/adapters): generation,
checkpoints and the merged export use those weights in place of the base model's; there
is no PEFT export. Any method can train full weights with `method.full_weights=True`
(e.g. ours with consistency: configs/methods/semsafe_full_ft.py).
"""

from __future__ import annotations

from semsafe_jax.methods import lora_sft
from semsafe_jax.methods.base import Prepared


def prepare(ctx) -> Prepared:
  return lora_sft.sft_prepared(ctx, ctx.init_trainable(full_weights=True))
