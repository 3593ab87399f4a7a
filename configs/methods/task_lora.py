"""task_lora: plain LoRA task fine-tuning of the aligned model (the retention reference).

  python -m semsafe_jax.main --config=configs/methods/task_lora.py --workdir=runs/ret_task_lora
"""

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, "../retention.py", base)
  c.method.name = "task_lora"
  return c
