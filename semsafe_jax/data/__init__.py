"""Data side: load prompts, embed them (SBERT), mine near-duplicates, split, batch.

  schema     Prompt record, DataError, the eval-only rule
  loaders    public formats and generic files -> Prompts (spec strings like "advbench:PATH")
  builtin    the shipped prompts and refusals
  embed      cached, normalised SBERT embeddings
  neighbors  FAISS top-K neighbours above tau, stats
  splits     leak-free train / held-out splits
  batches    static-shape batches with shard-local pairs
  pipeline   prepare_data(config, workdir): all of the above, written to the workdir

Modules are imported directly (no re-exports here) so that importing one stays light.
"""
