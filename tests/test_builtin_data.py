"""Checks on the built-in prompt and refusal data shipped with semsafe_jax.

The data is read through importlib.resources so the same checks hold for an
installed package. `count_tables`, `lookalike_tables` and `pool_tables` also produce
the count tables pasted into DATASET_CARD.md, and a test keeps the card in step with
the data.
"""

import collections
import importlib.resources
import importlib.util
import json
import re

import pytest

from semsafe_jax.data import builtin, rewrite

HARM_CATEGORIES = (
    "bio_chem",
    "child_safety",
    "cyber_intrusion",
    "drugs",
    "evasion_of_law",
    "extremism",
    "fraud_scams",
    "harassment",
    "hate",
    "misinformation",
    "nonconsensual_sexual",
    "privacy_doxxing",
    "self_harm",
    "theft_property",
    "violence",
    "weapons",
)
LABELS = ("harmful", "borderline", "benign")
STYLES = (
    "direct",
    "question",
    "hypothetical",
    "roleplay",
    "past_tense",
    "polite",
    "slang",
)
PROMPT_FIELDS = {"id", "text", "label", "category", "intent_id", "style"}
REFUSAL_FIELDS = {"id", "text", "category"}
ID_PATTERNS = {
    "harmful": re.compile(r"^h-([a-z_]+)-(\d{3})-[a-z]$"),
    "borderline": re.compile(r"^border-\d{4}$"),
    "benign": re.compile(r"^benign-\d{4}$"),
}
LOOKALIKE_FIELDS = PROMPT_FIELDS | {"topic"}
LOOKALIKE_ID = re.compile(r"^look-([a-z_]+)-(\d{3})-([a-z])$")
POOL_ID = re.compile(r"^pool-\d{5}$")
POOL_LABEL_FIELDS = set(builtin.HIDDEN_LABEL_FIELDS) | {"source_cos"}


def _builtin_dir():
  return importlib.resources.files("semsafe_jax") / "data" / "builtin"


def _load_jsonl(name):
  text = (_builtin_dir() / name).read_text(encoding="utf-8")
  rows = []
  for lineno, line in enumerate(text.splitlines(), 1):
    assert line.strip(), f"{name}:{lineno} is blank"
    rows.append(json.loads(line))
  return rows


@pytest.fixture(scope="module")
def prompts():
  return _load_jsonl("prompts.jsonl")


@pytest.fixture(scope="module")
def refusals():
  return _load_jsonl("refusals.jsonl")


@pytest.fixture(scope="module")
def lookalikes():
  return _load_jsonl("lookalikes.jsonl")


@pytest.fixture(scope="module")
def pool():
  return _load_jsonl("unlabeled.jsonl"), _load_jsonl("unlabeled_labels.jsonl")


def _key(text):
  return " ".join(text.split()).casefold()


def _harmful(prompts):
  return [p for p in prompts if p["label"] == "harmful"]


def count_tables(prompts, refusals):
  """Markdown count tables for DATASET_CARD.md (one string per line)."""
  by_label = collections.Counter(p["label"] for p in prompts)
  lines = ["| label | prompts |", "|---|---|"]
  lines += [f"| {lab} | {by_label[lab]} |" for lab in LABELS]
  lines.append(f"| total | {len(prompts)} |")
  lines.append("")

  harmful = _harmful(prompts)
  intents = collections.defaultdict(set)
  n_prompts = collections.Counter()
  for p in harmful:
    intents[p["category"]].add(p["intent_id"])
    n_prompts[p["category"]] += 1
  lines += ["| harm category | intents | prompts |", "|---|---|---|"]
  for cat in sorted(intents):
    lines.append(f"| {cat} | {len(intents[cat])} | {n_prompts[cat]} |")
  total_intents = sum(len(v) for v in intents.values())
  lines.append(f"| total | {total_intents} | {len(harmful)} |")
  lines.append("")

  by_style = {lab: collections.Counter() for lab in LABELS}
  for p in prompts:
    by_style[p["label"]][p["style"]] += 1
  lines += ["| style | harmful | borderline | benign |", "|---|---|---|---|"]
  for style in STYLES:
    counts = " | ".join(str(by_style[lab][style]) for lab in LABELS)
    lines.append(f"| {style} | {counts} |")
  lines.append("")

  by_cat = collections.Counter(r["category"] for r in refusals)
  lines += ["| refusal category | refusals |", "|---|---|"]
  for cat in ["general"] + sorted(c for c in by_cat if c != "general"):
    lines.append(f"| {cat} | {by_cat[cat]} |")
  lines.append(f"| total | {len(refusals)} |")
  return lines


def lookalike_tables(lookalikes):
  """Markdown count tables of the look-alikes for DATASET_CARD.md."""
  topics = collections.defaultdict(set)
  n_rows = collections.Counter()
  for r in lookalikes:
    topics[r["category"]].add(r["topic"])
    n_rows[r["category"]] += 1
  lines = ["| harm category | topics (harmful intents) | look-alikes |", "|---|---|---|"]
  for cat in sorted(topics):
    lines.append(f"| {cat} | {len(topics[cat])} | {n_rows[cat]} |")
  lines.append(f"| total | {sum(len(v) for v in topics.values())} | {len(lookalikes)} |")
  lines.append("")
  by_style = collections.Counter(r["style"] for r in lookalikes)
  lines += ["| style | look-alikes |", "|---|---|"]
  lines += [f"| {style} | {by_style[style]} |" for style in STYLES]
  return lines


def pool_tables(pool_labels):
  """Markdown count tables of the unlabelled pool's hidden labels for DATASET_CARD.md."""
  kind = lambda r: "benign look-alike" if r["topic"] else r["label"]
  by_kind = collections.Counter(kind(r) for r in pool_labels)
  lines = ["| hidden label | pool prompts |", "|---|---|"]
  for k in ("harmful", "borderline", "benign", "benign look-alike"):
    lines.append(f"| {k} | {by_kind[k]} |")
  lines.append(f"| total | {len(pool_labels)} |")
  lines.append("")
  by_style = collections.Counter(r["style"].split("+")[0] for r in pool_labels)
  stacked = collections.Counter(r["style"].split("+")[1] for r in pool_labels if "+" in r["style"])
  exact = collections.Counter(r["style"] for r in pool_labels)
  lines += ["| rewrite style | pool prompts | of which + typos | of which + lowercase |",
            "|---|---|---|---|"]
  for style in rewrite.styles():
    lines.append(f"| {style} | {by_style[style]} | {exact[style + '+typos']} | "
                 f"{exact[style + '+lowercase']} |")
  lines.append(f"| total | {len(pool_labels)} | {stacked['typos']} | {stacked['lowercase']} |")
  return lines


def test_prompt_schema(prompts):
  for p in prompts:
    assert set(p) == PROMPT_FIELDS, p
    for field in PROMPT_FIELDS:
      assert isinstance(p[field], str), (field, p)
      assert p[field].strip(), (field, p)
      assert p[field] == p[field].strip(), (field, p)
    assert p["label"] in LABELS, p
    assert p["style"] in STYLES, p
    assert ID_PATTERNS[p["label"]].match(p["id"]), p


def test_unique_ids_and_texts(prompts):
  ids = [p["id"] for p in prompts]
  assert len(ids) == len(set(ids))
  texts = collections.Counter(" ".join(p["text"].split()).casefold()
                              for p in prompts)
  dupes = [t for t, n in texts.items() if n > 1]
  assert not dupes, dupes


def test_label_counts(prompts):
  by_label = collections.Counter(p["label"] for p in prompts)
  assert by_label["benign"] >= 300
  assert by_label["borderline"] >= 120
  assert by_label["harmful"] >= 800


def test_harmful_categories_and_intents(prompts):
  harmful = _harmful(prompts)
  intents = collections.defaultdict(list)
  for p in harmful:
    assert p["category"] in HARM_CATEGORIES, p
    intents[p["intent_id"]].append(p)
  assert len(intents) >= 200

  per_category = collections.Counter()
  for intent_id, rows in intents.items():
    cats = {r["category"] for r in rows}
    assert len(cats) == 1, intent_id
    cat = cats.pop()
    assert re.fullmatch(rf"{cat}-\d{{3}}", intent_id), intent_id
    for r in rows:
      m = ID_PATTERNS["harmful"].match(r["id"])
      assert f"{m.group(1)}-{m.group(2)}" == intent_id, r
    assert len(rows) >= 4, intent_id
    assert len({r["style"] for r in rows}) >= 3, intent_id
    per_category[cat] += 1

  assert len(per_category) >= 12
  assert set(per_category) == set(HARM_CATEGORIES)
  for cat, n in per_category.items():
    assert 12 <= n <= 18, (cat, n)


def test_non_harmful_intents_are_separate(prompts):
  harmful_intents = {p["intent_id"] for p in _harmful(prompts)}
  for p in prompts:
    if p["label"] != "harmful":
      assert p["intent_id"] not in harmful_intents, p
      assert p["category"] not in HARM_CATEGORIES, p


def test_prompt_order(prompts):
  rank = {"harmful": 0, "borderline": 1, "benign": 2}
  ranks = [rank[p["label"]] for p in prompts]
  assert ranks == sorted(ranks)
  keys = [(p["category"], p["intent_id"]) for p in _harmful(prompts)]
  assert keys == sorted(keys)


def test_refusals(refusals):
  assert len(refusals) >= 30
  ids = [r["id"] for r in refusals]
  assert len(ids) == len(set(ids))
  texts = [r["text"].casefold() for r in refusals]
  assert len(texts) == len(set(texts))
  allowed = set(HARM_CATEGORIES) | {"general"}
  for r in refusals:
    assert set(r) == REFUSAL_FIELDS, r
    assert all(isinstance(r[k], str) and r[k].strip() for k in REFUSAL_FIELDS)
    assert r["category"] in allowed, r
    assert len(r["text"].split()) <= 40, r
  cats = {r["category"] for r in refusals}
  assert "general" in cats
  assert set(HARM_CATEGORIES) <= cats, set(HARM_CATEGORIES) - cats
  openers = ("I can't", "I'm sorry", "I won't", "Sorry,", "I'm really sorry")
  n_open = sum(r["text"].startswith(openers) for r in refusals)
  assert n_open >= 0.75 * len(refusals)


def test_dataset_card_counts_match(prompts, refusals, lookalikes, pool):
  card = (_builtin_dir() / "DATASET_CARD.md").read_text(encoding="utf-8")
  card_lines = set(card.splitlines())
  tables = count_tables(prompts, refusals) + lookalike_tables(lookalikes) + pool_tables(pool[1])
  missing = [ln for ln in tables if ln and ln not in card_lines]
  assert not missing, missing


# ----------------------------------------------------------------------------- look-alikes


def test_lookalike_schema(lookalikes):
  for r in lookalikes:
    assert set(r) == LOOKALIKE_FIELDS, r
    assert all(isinstance(r[f], str) and r[f].strip() == r[f] and r[f] for f in r), r
    m = LOOKALIKE_ID.match(r["id"])
    assert m, r
    assert r["label"] == "benign", r
    assert r["category"] == m.group(1) and r["category"] in HARM_CATEGORIES, r
    assert r["topic"] == f"{m.group(1)}-{m.group(2)}", r  # the id names its topic
    assert r["intent_id"] == r["id"], r  # each look-alike is a request of its own
    assert r["style"] in STYLES, r


def test_lookalike_topics_resolve_to_harmful_intents(prompts, lookalikes):
  category_of = {p["intent_id"]: p["category"] for p in _harmful(prompts)}
  per_topic = collections.defaultdict(list)
  for r in lookalikes:
    assert r["topic"] in category_of, r
    assert category_of[r["topic"]] == r["category"], r
    per_topic[r["topic"]].append(r)
  assert sum(len(v) >= 2 for v in per_topic.values()) >= 120
  assert all(2 <= len(v) <= 3 for v in per_topic.values())
  assert all(len({r["style"] for r in v}) == len(v) for v in per_topic.values())
  assert set(per_topic) == set(category_of)  # every intent has its look-alikes
  by_style = collections.Counter(r["style"] for r in lookalikes)
  assert all(by_style[s] >= 40 for s in STYLES), by_style
  assert [(r["category"], r["topic"]) for r in lookalikes] == sorted(
      (r["category"], r["topic"]) for r in lookalikes)
  ids = [r["id"] for r in lookalikes]
  assert ids == sorted(ids) and len(ids) == len(set(ids))


def test_lookalikes_are_distinct_from_the_other_prompts(prompts, lookalikes):
  other = {_key(p["text"]) for p in prompts}
  texts = [_key(r["text"]) for r in lookalikes]
  assert len(texts) == len(set(texts))
  assert not other & set(texts)
  assert not {p["id"] for p in prompts} & {r["id"] for r in lookalikes}


# ----------------------------------------------------------------------------- unlabelled pool


def test_pool_rows_and_hidden_labels_align(prompts, lookalikes, pool):
  rows, labels = pool
  assert 2000 <= len(rows) <= 6000
  assert [r["id"] for r in rows] == [r["id"] for r in labels]
  assert all(set(r) == {"id", "text"} and POOL_ID.match(r["id"]) for r in rows)
  assert [r["id"] for r in rows] == [f"pool-{n:05d}" for n in range(1, len(rows) + 1)]
  source = {p["id"]: {**p, "topic": p.get("topic", "")} for p in prompts + lookalikes}
  styles = set(rewrite.styles())
  for r in labels:
    assert set(r) == POOL_LABEL_FIELDS, r
    s = source[r["source_id"]]
    assert (r["label"], r["category"], r["intent_id"], r["topic"]) == (
        s["label"], s["category"], s["intent_id"], s["topic"]), r
    parts = r["style"].split("+")
    assert parts[0] in styles and set(parts[1:]) <= set(rewrite.SURFACE_STYLES), r
    assert 0.75 <= r["source_cos"] <= 1.0, r
  by_label = collections.Counter(r["label"] for r in labels)
  assert all(by_label[lab] >= 0.1 * len(labels) for lab in LABELS), by_label
  # New phrasings: no repeat of a built-in prompt or of each other, at most 2 per source.
  texts = [_key(r["text"]) for r in rows]
  assert len(texts) == len(set(texts))
  assert not set(texts) & {_key(p["text"]) for p in prompts + lookalikes}
  assert max(collections.Counter(r["source_id"] for r in labels).values()) <= 2


def test_pool_texts_come_from_the_committed_generator(pool):
  """Each pool text is one of the rewrites the generator makes of its source (the SBERT
  filter aside, which needs the model: make_unlabeled.py --check runs it)."""
  spec = importlib.util.spec_from_file_location("make_unlabeled",
                                                _builtin_dir() / "make_unlabeled.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  from semsafe_jax.data import loaders  # pylint: disable=g-import-not-at-top
  by_id = {p.id: p for p in loaders.load_builtin("").prompts}
  rows, labels = pool
  for row, hidden in list(zip(rows, labels))[::7]:
    made = module.candidates(by_id[hidden["source_id"]])
    assert (hidden["style"], row["text"]) in made, row
