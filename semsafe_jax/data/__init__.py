"""Data side: load prompts, embed them (SBERT), mine near-duplicates, split, batch.

  schema     Prompt record, DataError, the eval-only rule
  loaders    public formats and generic files -> Prompts (spec strings like "advbench:PATH")
  builtin    the shipped prompts, look-alikes, unlabelled pool and refusals
  rewrite    rule-based style rewrites (the unlabelled pool, generated neighbours)
  embed      cached, normalised SBERT embeddings
  neighbors  FAISS top-K neighbours above tau, stats
  splits     leak-free train / held-out splits
  batches    static-shape batches; consistency pairs over the global batch
  unlabeled  unlabelled partners of labelled training prompts (mined, generated)
  contrast   cross-label look-alike pairs (harmful vs safe training prompts)
  pipeline   prepare_data(config, workdir): all of the above, written to the workdir

Modules are imported directly (no re-exports here) so that importing one stays light.
"""
