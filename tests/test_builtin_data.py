"""Checks on the built-in prompt and refusal data shipped with semsafe_jax.

The data is read through importlib.resources so the same checks hold for an
installed package. `count_tables` also produces the count tables pasted into
DATASET_CARD.md, and a test keeps the card in step with the data.
"""

import collections
import importlib.resources
import json
import re

import pytest

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


def test_dataset_card_counts_match(prompts, refusals):
  card = (_builtin_dir() / "DATASET_CARD.md").read_text(encoding="utf-8")
  card_lines = set(card.splitlines())
  missing = [ln for ln in count_tables(prompts, refusals)
             if ln and ln not in card_lines]
  assert not missing, missing
