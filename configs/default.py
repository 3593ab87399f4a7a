"""The main job on the embedded default: SmolLM2-135M-Instruct + built-in data.

Every experiment is a config file; `tiny.py` and the pod configs override this one.
Override any field from the command line: --config.train.steps=50
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.mode = "train"  # train | generate | mine | export
  c.seed = 0
  c.overwrite = False  # allow a changed config in an existing workdir
  c.multihost = False  # call jax.distributed.initialize() (TPU pods, multi-node GPU)

  # --- model (semsafe_jax/models) ---
  c.model = ml_collections.ConfigDict()
  c.model.name_or_path = "smollm2-135m-instruct"  # alias, HF dir, .gguf file or hub id
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
  c.model.param_dtype = "float32"
  c.model.remat = False  # rematerialise each block in the backward pass

  # --- data (semsafe_jax/data) ---
  c.data = ml_collections.ConfigDict()
  c.data.sources = ["builtin"]  # builtin | advbench:PATH | csv:PATH | jsonl:PATH | hf:ID ...
  c.data.sbert = "all-MiniLM-L6-v2"  # embedded default; any sentence-transformers id/path
  c.data.embed_batch_size = 64
  c.data.tau = 0.7
  c.data.k = 8
  c.data.same_label_only = True
  c.data.index = "auto"  # auto | flat | hnsw | ivf
  c.data.exact_max = 50_000  # exact search below this many vectors
  c.data.heldout_intent_frac = 0.2
  c.data.heldout_phrasing_frac = 0.25
  c.data.harmful_per_step = 8  # anchors + neighbours per step
  c.data.benign_per_step = 8
  c.data.pairs_per_step = 16

  # --- generation (semsafe_jax/models/generate.py) ---
  c.generate = ml_collections.ConfigDict()
  c.generate.prompts = []
  c.generate.prompts_file = ""
  c.generate.max_new_tokens = 64
  c.generate.batch_size = 8
  c.generate.temperature = 0.0  # 0 = greedy
  c.generate.top_k = 0
  c.generate.top_p = 1.0
  c.generate.seed = 0
  c.generate.stop_strings = []
  c.generate.adapters = True  # apply trained adapters when the workdir has a checkpoint

  # --- adapters (semsafe_jax/adapters) ---
  c.adapters = ml_collections.ConfigDict()
  c.adapters.lora_rank = 16
  c.adapters.lora_alpha = 32.0
  c.adapters.lora_dropout = 0.0
  c.adapters.lora_targets = ["q_proj", "v_proj"]
  c.adapters.embed_mlp = True
  c.adapters.embed_mlp_hidden = 256

  # --- losses (semsafe_jax/losses) ---
  c.loss = ml_collections.ConfigDict()
  c.loss.w_safety = 1.0
  c.loss.lam = 1.0  # consistency weight
  c.loss.w_capability = 1.0
  c.loss.consistency_repr = "refusal_prob"  # hidden | refusal_prob | next_token
  c.loss.scorer = "first_token"  # first_token | soft_pattern | classifier | probe
  c.loss.hidden_layer = -1

  # --- safety probe ---
  c.probe = ml_collections.ConfigDict()
  c.probe.use = "off"  # off | weight_pairs | flag_unlabeled

  # --- training (semsafe_jax/train) ---
  c.train = ml_collections.ConfigDict()
  c.train.steps = 200
  c.train.lr = 1e-3
  c.train.warmup_steps = 10
  c.train.weight_decay = 0.0
  c.train.clip_norm = 1.0
  c.train.grad_accum = 1
  c.train.log_every = 10
  c.train.max_bad_steps = 5

  # --- checkpoints (Orbax) ---
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 50
  c.checkpoint.keep = 3

  # --- export ---
  c.export = ml_collections.ConfigDict()
  c.export.format = "peft"  # peft | merged | orbax

  # --- evaluation / report ---
  c.eval = ml_collections.ConfigDict()
  c.eval.max_new_tokens = 48
  return c
