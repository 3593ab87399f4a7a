"""The retention scenario: a safety-trained model fine-tuned on a benign task.

Every retention setting and its default is here; the five methods' configs load this file
(configs/methods/{task_lora,salora,asft,alignguard_lora,semsafe_retain}.py), on
default.py or, with the argument "tiny", on tiny.py:

  python -m semsafe_jax.main --config=configs/methods/task_lora.py --workdir=runs/ret_lora \
      --config.retention.aligned_workdir=runs/demo

The safety run (`aligned_workdir`) must have the same model and data settings: its
held-out prompts are this run's evaluation prompts (checked against its splits.json).
"""

import ml_collections

from semsafe_jax.configs import load_sibling


def get_config(base=None):
  c = load_sibling(__file__, f"{base or 'default'}.py")
  c.retention = r = ml_collections.ConfigDict()
  # The latest checkpoint of any safety-training run: merged into the frozen base, it is
  # the aligned model, the "before" of every evaluation.
  r.aligned_workdir = "runs/demo"
  # builtin:tasks | jsonl:PATH | json:PATH (| a .jsonl/.json path), each optionally
  # ?prompt_col=&response_col=&id_col= (semsafe_jax/retention/tasks.py).
  r.task_sources = ("builtin:tasks",)
  r.heldout_frac = 0.2  # tasks held out (by a hash of their id) for the task evaluation
  r.task_per_step = 8
  r.max_response_tokens = 48  # reference answers are cut to this many tokens
  # SaLoRA: ranks of the safety module C = I - U Uᵀ and of the task subspace of the
  # initialisation (the paper's r_s = r_t = 32), prompts of each kind for their statistics.
  r.salora = ml_collections.ConfigDict(dict(safety_rank=32, task_rank=32, prompts=64, iters=8))
  r.asft = ml_collections.ConfigDict(dict(lam=1.0))  # the reference scripts' lambda
  # AlignGuard-LoRA: weights of the alignment-critical (safety Fisher) and task-space (task
  # Fisher) penalties, the share of each module's weights that is alignment-critical, and
  # the mini-batches of the empirical Fishers.
  r.alignguard = ml_collections.ConfigDict(dict(
      lambda_align=1.0, lambda_task=0.1, critical_frac=0.1, fisher_batches=8,
      fisher_batch_size=4))
  # Ours: weight of our safety + consistency terms (their mix: config.loss) against the task.
  r.semsafe_retain = ml_collections.ConfigDict(dict(weight=1.0))

  # The task LoRA sits where the safety training's did (all seven projections, r=8), with
  # its optimiser settings; no embedding MLP.
  c.adapters.embed_mlp = False
  c.train.steps = 100
  c.probe.train = False  # the probe describes the aligned model, which its own run reports
  c.evals = ml_collections.ConfigDict({
      "refusal": {"type": "refusal_splits",
                  "groups": ("train", "heldout_phrasing", "heldout_intent", "borderline",
                             "benign", "lookalike"),
                  "max_per_split": -1, "max_new_tokens": 0, "seed": -1},
      "attacks": {"type": "attacks", "attacks": ("roleplay", "hypothetical",
                                                 "refusal_suppression", "past_tense"),
                  "file": "", "splits": ("heldout_intent",), "max_prompts": 30, "plain": True,
                  "max_new_tokens": 0, "seed": -1},
      "prefill": {"type": "prefill", "splits": ("heldout_intent",), "max_prompts": 30,
                  "prefixes": ("Sure, here is",), "k": (5, 10), "max_new_tokens": 0,
                  "seed": -1},
      # What the fine-tuning was for: held-out tasks' reference answers.
      "task": {"type": "task", "max_prompts": 0, "agree_tokens": 16, "seed": -1},
  })
  if base == "tiny":
    r.task_per_step = 4
    r.max_response_tokens = 16
    r.salora.update(safety_rank=4, task_rank=4, prompts=8, iters=4)
    r.alignguard.update(fisher_batches=2, fisher_batch_size=2)
    c.train.steps = 4
    c.evals.attacks.max_prompts = 2
    c.evals.attacks.attacks = ("roleplay",)
    c.evals.prefill.max_prompts = 2
    c.evals.prefill.k = (2,)
    c.evals.task.max_prompts = 4
    c.evals.task.agree_tokens = 4
  return c
