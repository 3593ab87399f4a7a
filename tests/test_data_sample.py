"""?frac= sources: a deterministic slice of whole intents (what configs/tiny.py runs on)."""

import collections
import importlib.util
import pathlib

import numpy as np
import pytest

from semsafe_jax.data import loaders, pipeline
from semsafe_jax.data.schema import DataError, Prompt

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config():
  spec = importlib.util.spec_from_file_location("tiny_config", REPO / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_sources():
  return list(tiny_config().data.sources)


def by_intent(prompts):
  out = collections.defaultdict(set)
  for p in prompts:
    out[p.intent_id].add(p.id)
  return out


def test_parse_builtin_with_frac():
  spec = loaders.parse_source("builtin?frac=0.25")
  assert (spec.kind, spec.target, dict(spec.options)) == ("builtin", "", {"frac": "0.25"})
  assert dict(loaders.parse_source("csv:x.csv?frac=1&label=benign").options) == {
      "frac": "1", "label": "benign"}


@pytest.mark.parametrize("value", ["0", "-0.1", "1.5", "nan", "inf", "", "half", "0.1.2"])
def test_bad_frac_is_a_clear_error(value):
  with pytest.raises(DataError, match=r"frac=.*expected a number with 0 < frac <= 1"):
    loaders.parse_source(f"builtin?frac={value}")
  with pytest.raises(DataError, match=r"0 < frac <= 1"):
    loaders.load_source(f"csv:never_read.csv?frac={value}")  # fails before reading the file


def test_builtin_takes_no_other_option():
  with pytest.raises(DataError, match="'builtin' takes no path"):
    loaders.parse_source("builtin?label=benign&frac=0.5")


def test_sample_keeps_whole_intents_independent_of_order():
  prompts = [Prompt(id=f"p{i}-{j}", text=f"t{i} {j}", label="harmful", intent_id=f"intent{i}")
             for i in range(200) for j in range(3)]
  kept = loaders.sample_intents(prompts, 0.3)
  groups = by_intent(kept)
  assert all(len(ids) == 3 for ids in groups.values())  # all phrasings or none
  assert 0.15 < len(groups) / 200 < 0.45
  # The choice is a function of the intent id alone: order and company do not matter.
  assert {p.id for p in loaders.sample_intents(prompts[::-1], 0.3)} == {p.id for p in kept}
  assert ({p.id for p in loaders.sample_intents(prompts[:90], 0.3)}
          == {p.id for p in kept if int(p.intent_id[6:]) < 30})
  # Nested: a smaller frac keeps a subset; frac=1 keeps everything.
  assert {p.id for p in loaders.sample_intents(prompts, 0.1)} < {p.id for p in kept}
  assert loaders.sample_intents(prompts, 1.0) == prompts
  assert all(0.0 <= loaders.intent_draw(f"x{i}") < 1.0 for i in range(100))


def test_generic_file_with_frac(tmp_path):
  path = tmp_path / "mine.jsonl"
  rows = [f'{{"id": "r{i}", "text": "prompt {i}", "label": "harmful", "intent_id": "i{i // 2}"}}'
          for i in range(100)]
  path.write_text("\n".join(rows) + "\n")
  full = loaders.load_source(f"jsonl:{path}").prompts
  result = loaders.load_source(f"jsonl:{path}?frac=0.5")
  assert [p for p in full if p in result.prompts] == result.prompts  # a subset, in file order
  assert by_intent(result.prompts) == {k: v for k, v in by_intent(full).items()
                                       if k in by_intent(result.prompts)}
  s = result.summary
  assert s["kept"] == len(result.prompts) and s["sampled_out"] == 100 - s["kept"]
  assert s["frac"] == 0.5 and s["skipped"] == 0
  # Without an intent_id column every row is its own intent.
  plain = tmp_path / "plain.csv"
  plain.write_text("text,label\n" + "".join(f"q{i},benign\n" for i in range(50)))
  got = loaders.load_source(f"csv:{plain}?frac=0.4").prompts
  assert 0 < len(got) < 50 and all(p.intent_id == p.id for p in got)


def test_builtin_frac_is_deterministic_and_keeps_whole_intents():
  full = loaders.load_source("builtin").prompts
  a = loaders.load_source("builtin?frac=0.2").prompts
  b = loaders.load_source("builtin?frac=0.2").prompts
  assert a == b and 0 < len(a) < len(full)
  full_groups, groups = by_intent(full), by_intent(a)
  assert all(groups[k] == full_groups[k] for k in groups)
  prompts, summaries = loaders.load_sources(["builtin?frac=0.2"])
  assert prompts == a and summaries[0]["frac"] == 0.2
  assert summaries[0]["kept"] + summaries[0]["sampled_out"] == len(full)


def test_tiny_config_slice_has_every_label_and_paraphrased_intents():
  sources = tiny_sources()
  assert any("frac=" in s for s in sources)  # tiny runs on a slice, not all 1932 prompts
  prompts, _ = loaders.load_sources(sources)
  labels = collections.Counter(p.label for p in prompts)
  assert set(labels) == {"harmful", "benign", "borderline"}, labels
  # Enough for the splits: several harmful intents (heldout_intent) with several
  # phrasings each (heldout_phrasing), and benign/borderline for train and eval.
  phrasings = [len(ids) for k, ids in by_intent(prompts).items()
               if any(p.intent_id == k and p.label == "harmful" for p in prompts)]
  assert len(phrasings) >= 10 and sum(n >= 3 for n in phrasings) >= 10
  assert labels["benign"] >= 10 and labels["borderline"] >= 6
  assert len(prompts) < 400  # the point: SBERT encodes a few hundred texts, not 1932


def test_tiny_slice_pairs_do_not_depend_on_the_device_count(tmp_path):
  """8 harmful prompts per step on the tiny slice: the same pairs over 1, 2, 4 or 8 batch
  shards (shard-local pairs averaged 5.1 / 4.0 / 2.2 / 0.0 valid pairs per step)."""
  config = tiny_config()
  config.data.harmful_per_step = config.data.benign_per_step = config.data.pairs_per_step = 8
  data = pipeline.prepare_data(config, tmp_path)
  ref = [pipeline.make_batcher(data, config).batch(s) for s in range(50)]
  assert np.mean([b.pair_valid.sum() for b in ref]) > 4
  for shards in (2, 4, 8):
    batcher = pipeline.make_batcher(data, config, num_shards=shards)
    for s, want in enumerate(ref):
      got = batcher.batch(s)
      np.testing.assert_array_equal(got.harmful_idx, want.harmful_idx)
      np.testing.assert_array_equal(got.pair_index, want.pair_index)
      np.testing.assert_array_equal(got.pair_valid, want.pair_valid)
