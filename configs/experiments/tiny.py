"""2 methods x 2 seeds on configs/tiny.py: the experiment the tests run end to end.

Ours and the primary baseline, each method file on the tiny base config ("path:tiny").
"""

import os

from semsafe_jax.configs import load_sibling

_METHODS = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                        "methods"))


def get_config():
  c = load_sibling(__file__, "base.py")
  e = c.experiment
  e.methods = {name: os.path.join(_METHODS, f"{name}.py:tiny") for name in ("lora_sft",
                                                                            "semsafe")}
  e.seeds = (0, 1)
  e.baseline = "lora_sft"
  return c
