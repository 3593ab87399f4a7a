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
  # Base-model outputs any run on the same model and data can reuse (training targets,
  # paraphrases) are cached here too; "" = only in the workdir. Experiments share one.
  c.shared_dir = ""
  c.fast_compile = False  # skip most XLA optimisations: quicker compiles, slower steps (tests)

  # --- training method (semsafe_jax/methods/<name>.py; configs/methods/ holds one per method) ---
  c.method = ml_collections.ConfigDict()
  c.method.name = "semsafe"
  c.method.full_weights = False  # train every model weight too (full fine-tuning)
  # L_capability "kl" reads the frozen base model's states at the benign targets: computed
  # once before training (rows x 32 x D float32 on the host: 45 MB and about 90 s here) instead
  # of by a base forward in every step (4-5% of the step). False: every step runs it.
  c.method.cache_base_states = True
  # Generated variants of training prompts (semsafe_jax/methods/paraphrase.py): ours takes
  # them as unlabelled partners of their source (with data.unlabeled_per_step > 0),
  # paraphrase_aug trains on them with the source's target. 0 and 0 = none.
  c.method.rule_rewrites = 0  # style rewrites per source prompt (data/rewrite.py)
  c.method.paraphrases_per_prompt = 0  # greedy paraphrases per source prompt, by:
  c.method.paraphraser = ""  # "" = the model being trained; or any model path / alias
  c.method.paraphrase_min_cos = 0.7  # keep a variant at SBERT cosine >= this to its source
  c.method.paraphrase_max_new_tokens = 48
  # A reply longer than this times its source (in characters) answered instead of rewriting.
  c.method.paraphrase_max_len_ratio = 2.0

  # --- model (semsafe_jax/models) ---
  c.model = ml_collections.ConfigDict()
  # Aliases: smollm2-135m-instruct | gemma3-270m (embedded GGUFs) | tiny-random[:<family>];
  # or an HF dir (safetensors), a .gguf file, a hub id. Families: llama, mistral, qwen2,
  # qwen3, gemma3.
  c.model.name_or_path = "smollm2-135m-instruct"
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
  c.model.param_dtype = "float32"  # weights are cast to this while streaming in
  # Recompute each layer in the backward pass: off | full | dots. On this default's CPU step
  # (benchmarks/README.md), full peaks at 3.6 GiB, off at 11.1 GiB; with packing and the
  # base-state table the full step costs as much CPU time as the off step did without them,
  # and about 9% more wall time on 2 cores.
  c.model.remat = "full"
  # Layers as a scan (one compiled block) or unrolled (faster steps on CPU, longer compiles):
  # auto = scan on GPU/TPU; on CPU unroll, except a differentiated forward under remat (XLA:CPU
  # keeps an unrolled program's activations alive anyway) | scan | unroll.
  c.model.layer_loop = "auto"

  # --- data (semsafe_jax/data) ---
  c.data = ml_collections.ConfigDict()
  # builtin | advbench:PATH | harmbench:PATH | xstest:PATH | jbb:PATH | strongreject:PATH |
  # csv:PATH | jsonl:PATH | json:PATH | hf:ID, each optionally ?opt=v&...; a tuple, because
  # config_flags cannot override lists: --config.data.sources=builtin --config.data.sources=...
  c.data.sources = ("builtin",)
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
  c.data.neighbors_per_anchor = 3  # mined neighbours drawn with each anchor into a shard
  c.data.pairable_anchor_frac = 0.5  # share of anchors drawn among prompts with a neighbour
  c.data.borderline_share = 0.7  # of the benign block, borderline prompts (< 0: as in the data)
  c.data.on_bad_rows = "error"  # error | warn (skip bad rows, counted and logged)
  # Column names for generic csv:/jsonl:/json:/hf: sources (per source: ?text_col=...).
  c.data.columns = ml_collections.ConfigDict(dict(
      id="id", text="text", label="label", category="category", intent_id="intent_id",
      style="style", source="source", topic="topic"))
  c.data.default_label = ""  # label for generic files without a label column
  c.data.eval_only_sources = ()  # never trained on, besides xstest (always eval-only)
  # Prompts with no label and no target (e.g. your own traffic), loaded as ?label=unlabeled.
  # Each is mined against the labelled training prompts; those within tau of one become its
  # unlabelled partners in L_consistency (semsafe_jax/data/unlabeled.py).
  c.data.unlabeled_sources = ("builtin:unlabeled",)  # the shipped pool (labels hidden)
  c.data.unlabeled_k = 4  # labelled neighbours considered per unlabelled prompt
  c.data.unlabeled_per_step = 16  # (anchor, partner) pairs per step; 0 = none
  c.data.unlabeled_harmful_share = 0.5  # of them, anchored on harmful prompts
  # Cross-label look-alikes (data/contrast.py): (harmful, safe) training pairs above
  # contrast_tau, whose refusal scores loss.w_contrast pushes apart by loss.contrast_margin.
  c.data.contrast_tau = 0.5
  c.data.contrast_k = 4
  c.data.contrast_per_step = 8
  # The step's row blocks (unlabelled anchors and partners, contrast pairs, and the harmful
  # and benign rows with their targets) are each packed several to a row of this many tokens
  # when that computes fewer padding tokens over the whole run: the same loss, less work
  # (semsafe_jax/train/packing.py); 0 = one prompt per row.
  c.data.pack_width = 160
  c.data.exclude_near_eval_only = True  # nor any prompt at cosine >= tau to an eval-only one
  c.data.refusals = "builtin"  # builtin | PATH (.jsonl with "text", or .txt one per line)
  c.data.cache_dir = ""  # SBERT embedding cache; "" = WORKDIR/cache
  c.data.embed_device = "cpu"
  c.data.approx_index = "ivf"  # what index=auto uses above exact_max: ivf | hnsw
  c.data.hnsw_m = 32
  c.data.hnsw_ef_construction = 64
  c.data.hnsw_ef_search = 128
  c.data.ivf_nlist = 0  # 0 = about 2 * sqrt(N)
  c.data.ivf_nprobe = 4  # lists scanned per query; raise for recall, lower for speed
  c.data.faiss_threads = 0  # 0 = all cores
  c.data.split_seed = 0  # splits depend on this, not on the training seed
  c.data.max_len = 128  # training row length cap (prompt + response tokens)
  c.data.max_response_tokens = 32  # refusal targets / base answers are cut to this
  c.data.eval_frac = 0.5  # share of benign / borderline prompts kept for evaluation
  c.data.lookalike_val_frac = 0.25  # training topics whose look-alikes form val_lookalike

  # --- generation (semsafe_jax/models/generate.py) ---
  c.generate = ml_collections.ConfigDict()
  c.generate.prompts = ()  # tuples: config_flags overrides those, not lists
  c.generate.prompts_file = ""
  c.generate.max_new_tokens = 64
  c.generate.batch_size = 8
  c.generate.temperature = 0.0  # 0 = greedy
  c.generate.top_k = 0
  c.generate.top_p = 1.0
  c.generate.seed = 0
  c.generate.stop_strings = ()
  c.generate.chat = True  # wrap prompts in the tokenizer's chat template (False: plain text)
  c.generate.adapters = True  # apply trained adapters when the workdir has a checkpoint

  # --- adapters (semsafe_jax/adapters) ---
  c.adapters = ml_collections.ConfigDict()
  c.adapters.lora_rank = 8
  c.adapters.lora_alpha = 16.0
  c.adapters.lora_dropout = 0.0
  # Short names (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj) and/or
  # regexes fully matching kernel paths such as "layers/attn/q_proj/kernel"; a CLI
  # override may list them comma-separated. Left unset, LoRA adapts q_proj, v_proj.
  # Here every projection at r=8. Against q,v at r=16, both for 180 steps, it measured
  # 95% vs 87% held-out intents refused, 17% vs 23% borderline and 0% vs 8% benign
  # over-refusal, for 857 s vs 683 s of training.
  c.adapters.lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj")
  c.adapters.embed_mlp = True
  c.adapters.embed_mlp_hidden = 256

  # --- losses (semsafe_jax/losses) ---
  c.loss = ml_collections.ConfigDict()
  c.loss.w_safety = 1.0
  c.loss.lam = 1.0  # consistency weight
  c.loss.w_capability = 5.0
  c.loss.consistency_repr = "refusal_prob"  # hidden | refusal_prob | next_token
  c.loss.scorer = "first_token"  # first_token | soft_pattern | classifier | probe
  c.loss.hidden_layer = -1  # hidden_states index: 0 = embeddings, -1 = final norm output
  c.loss.hidden_pool = "mean"  # mean over prompt tokens | last prompt token
  c.loss.normalize_hidden = True  # unit-normalise pooled states before the squared L2
  c.loss.divergence = "js"  # next_token: js | sym_kl
  c.loss.capability = "kl"  # kl (vs the base model's distributions) | ce (its greedy tokens)
  c.loss.capability_first_token_weight = 20.0  # the answer-or-refuse token counts this much
  c.loss.safety_first_token_weight = 5.0  # ... and the first refusal token this much
  c.loss.kl_direction = "forward"  # forward = KL(base || adapted) | reverse
  # The LM head runs on the first N target tokens of each row (0 = every position).
  # Keep >= data.max_response_tokens; metric targets_dropped counts any cut off.
  c.loss.max_target_tokens = 48
  c.loss.ambiguous_token_weight = 0.5  # first_token: weight of openers shared with helpful answers
  c.loss.refusal_phrases = ()  # soft_pattern phrases; empty = built-in list
  c.loss.probe_pool = "prompt"  # probe scorer pools over: prompt | response tokens
  c.loss.classifier_hidden = 64  # refusal classifier (scorer "classifier")
  c.loss.classifier_steps = 300
  c.loss.classifier_lr = 3e-3
  # Unlabelled partners are pulled towards their anchor; the anchor does not move towards
  # them (mean-teacher style), so an unlabelled prompt cannot drag a refusal away.
  c.loss.anchor_stop_gradient = True
  c.loss.w_contrast = 0.0  # > 0: refuse the request, not its topic (cross-label margin)
  c.loss.contrast_margin = 0.5

  # --- safety probe ---
  c.probe = ml_collections.ConfigDict()
  c.probe.train = True  # fit and report the per-layer safety probe
  c.probe.max_prompts = 160  # per class, for probe training and its held-out check
  c.probe.use = "off"  # off | weight_pairs | flag_unlabeled
  c.probe.layer = "best"  # best (held-out accuracy) or a hidden_states index
  c.probe.threshold = 0.5  # flag_unlabeled: unsafe probability that flags a prompt
  c.probe.steps = 300  # logistic regression: full-batch Adam steps
  c.probe.lr = 0.05
  c.probe.l2 = 1e-3
  c.probe.batch_size = 16  # prompts per forward when extracting hidden states

  # --- probe gate (probes/gate.py): the adapters answer only the prompts a probe on the
  # frozen model flags; the rest get the base model's answer. The report then gains a
  # "gated" model beside "before" and "after". Fit on the training side only, after the
  # probe settings above.
  c.gate = ml_collections.ConfigDict()
  c.gate.use = False
  c.gate.recall = 0.97  # threshold: this share of held-back harmful training prompts flagged
  c.gate.held_back = 0.2  # share of the harmful training prompts held back to set it
  c.gate.max_per_split = 400  # prompts per side for the fit (a seeded sample)

  # --- training (semsafe_jax/train) ---
  c.train = ml_collections.ConfigDict()
  c.train.steps = 160
  c.train.lr = 1e-3
  c.train.warmup_steps = 10
  c.train.weight_decay = 0.0
  c.train.clip_norm = 1.0
  c.train.grad_accum = 1
  c.train.log_every = 10
  c.train.max_bad_steps = 5  # stop after this many consecutive non-finite steps
  c.train.end_lr_frac = 0.0  # cosine decays to lr * end_lr_frac
  c.train.progress = True  # tqdm bar (process 0)
  c.train.donate = True  # update params/opt state in place
  # Queue step s+1 before reading step s: auto = on GPU/TPU only. On CPU the queued step's
  # buffers are host memory held beside the running step's: 20.6 vs 11.2 GB peak on this
  # default, for no faster step (benchmarks/README.md) | on | off.
  c.train.overlap_steps = "auto"
  # Device mesh over all hosts; one axis may be -1 (the rest of the devices).
  c.train.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
  c.train.sharding = "replicate"  # frozen params: replicate | fsdp | tensor | fsdp_tensor

  # --- checkpoints (Orbax) ---
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 50
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True  # write in the background
  c.checkpoint.save_on_sigterm = True  # save and stop on SIGTERM (single process)

  # --- export ---
  c.export = ml_collections.ConfigDict()
  c.export.format = "peft"  # peft | merged | orbax
  c.export.out_dir = ""  # "" = WORKDIR/export/<format>
  c.export.step = -1  # checkpoint step to export; -1 = the latest
  c.export.dtype = "float32"  # weights on disk: float32 | bfloat16 | float16
  c.export.max_shard_gb = 5.0  # merged: split model.safetensors into shards above this size
  # peft: also write the base model as a transformers checkpoint to <out_dir>/base.
  # auto = when transformers cannot load model.name_or_path itself (GGUF, aliases, tiny-random).
  c.export.save_base = "auto"  # auto | yes | no
  c.export.base_model_name_or_path = ""  # recorded in adapter_config.json; "" = automatic

  # --- evaluation / report ---
  c.eval = ml_collections.ConfigDict()
  c.eval.max_new_tokens = 32  # enough for the judge: refusals open the answer
  c.eval.batch_size = 32
  # A generation batch of long prompts (attack templates) is halved until rows x (prompt +
  # new tokens) fits this: it bounds the KV cache and prefill memory (0 = no cap).
  c.eval.max_batch_tokens = 6144
  c.eval.max_per_split = 60  # deterministic subsample per report split (0 = all)
  c.eval.seed = 0
  c.eval.base_answer_tokens = 32  # length of the base answers L_capability trains on

  # --- evaluation plug-ins (semsafe_jax/eval; options of each type: its module's OPTIONS) ---
  # The frozen base model's answers are cached here ("" = WORKDIR/evals/cache); an
  # experiment points every cell at one directory, so "before" is generated once.
  c.eval.cache_dir = ""
  # {name: {type, options}}; -1 = the config.eval setting, 0 tokens = eval.max_new_tokens.
  c.evals = ml_collections.ConfigDict({
      "refusal": {"type": "refusal_splits", "groups": (), "max_per_split": -1,
                  "max_new_tokens": 0, "seed": -1},
      "external": {"type": "external", "splits": ("eval_only_harmful", "eval_only_borderline",
                                                  "eval_only_benign"),
                   "max_per_group": -1, "max_new_tokens": 0, "seed": -1},
      "attacks": {"type": "attacks", "attacks": (), "file": "", "splits": ("heldout_intent",),
                  "max_prompts": 30, "plain": True, "max_new_tokens": 0, "seed": -1},
      "prefill": {"type": "prefill", "splits": ("heldout_intent",), "max_prompts": 30,
                  "prefixes": ("Sure, here is",), "k": (5, 10, 20), "max_new_tokens": 0,
                  "seed": -1},
      "capability": {"type": "capability", "splits": ("eval_benign",), "max_prompts": -1,
                     "answer_tokens": 32, "agree_tokens": 32, "prompt_set": "",
                     "prompt_set_tokens": 128, "seed": -1},
      "consistency": {"type": "consistency", "splits": ("heldout_intent",), "max_groups": 0,
                      "min_group_size": 2, "external": True,
                      "external_splits": ("eval_only_harmful", "eval_only_borderline",
                                          "eval_only_benign"),
                      "tau": -1.0, "max_new_tokens": 0, "seed": -1},
      # The unlabelled pool against its hidden labels: did the refusals carry over?
      "unlabeled_pool": {"type": "unlabeled_pool", "max_per_group": -1, "max_new_tokens": 0,
                         "seed": -1},
  })
  # Refusal judges, the first is primary: string_match | classifier | llm:<path or alias>.
  c.judges = ("string_match", "classifier")
  c.judge = ml_collections.ConfigDict()
  c.judge.classifier_prompts = 128  # base answers (training benign/borderline) it learns from
  c.judge.classifier_threshold = 0.5
  c.judge.llm_prompt_file = ""  # "" = semsafe_jax/eval/llm_judge_prompt.txt
  c.judge.llm_dtype = "float32"
  c.judge.llm_batch_size = 8
  c.judge.max_disagreements = 20  # answers listed per judge pair in the report
  return c
