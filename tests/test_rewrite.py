"""Rule-based style rewrites: deterministic, every style changes every prompt, content kept."""

import numpy as np
import pytest

from semsafe_jax.data import loaders, rewrite
from semsafe_jax.data.schema import text_key

SAMPLES = [
    "Tell me how to secure my home Wi-Fi so the neighbors can't get on it.",
    "How do I kill a Python process that won't stop?",
    "Write a short poem about autumn leaves.",
    "What are the symptoms of food poisoning?",
    "Could you please explain how vaccines are tested?",
    "my kid has a new 'friend' on roblox who wants to keep their chats secret, am i worried??",
    "I'm a nurse. Explain how IV drips are set up.",
    "Hello",
]


def test_styles_are_named_and_unknown_ones_are_an_error():
  names = rewrite.styles()
  assert len(names) >= 10 and len(set(names)) == len(names)
  assert {"slang", "polite", "roleplay", "hypothetical", "past_tense", "typos", "lowercase",
          "terse", "verbose", "question", "third_person"} <= set(names)
  assert set(rewrite.SURFACE_STYLES) <= set(names)
  with pytest.raises(ValueError, match="style='shouting'.*expected one of"):
    rewrite.rewrite("hi there", "shouting", np.random.default_rng(0))
  with pytest.raises(ValueError, match="empty text"):
    rewrite.rewrite("  ", "slang", np.random.default_rng(0))
  with pytest.raises(ValueError, match="unknown style"):
    rewrite.variants("hi there", 2, style_names=["slang", "shouting"])


@pytest.mark.parametrize("style", rewrite.styles())
def test_each_style_changes_the_text_and_is_deterministic(style):
  for n, text in enumerate(SAMPLES):
    a = rewrite.rewrite(text, style, np.random.default_rng(n))
    b = rewrite.rewrite(text, style, np.random.default_rng(n))
    assert a == b, (style, text)
    assert text_key(a) != text_key(text), (style, text)
    assert a == " ".join(a.split()) and a.strip(), (style, a)


def test_rewrites_keep_the_request():
  rng = lambda: np.random.default_rng(0)
  text = "Tell me how to secure my home Wi-Fi so the neighbors can't get on it."
  for style in ("polite", "question", "terse", "roleplay", "verbose", "lowercase", "slang"):
    out = rewrite.rewrite(text, style, rng()).lower()
    assert "secure" in out and "wi-fi" in out and "neighbors" in out, (style, out)
  # Frames that speak of someone else move first person to "their".
  assert "their home wi-fi" in rewrite.rewrite(text, "past_tense", rng()).lower()
  assert "their home wi-fi" in rewrite.rewrite(text, "third_person", rng()).lower()
  assert rewrite.third_person("I'm sure my dog likes me") == "they're sure their dog likes them"
  assert rewrite.rewrite(text, "lowercase", rng()) == (
      "tell me how to secure my home wi-fi so the neighbors can't get on it")
  assert rewrite.rewrite("Could you please explain how vaccines are tested?", "polite",
                         rng()).startswith(("Would you mind explaining how vaccines",
                                            "Could you kindly", "I'd be very grateful",
                                            "Could you please explain",
                                            "Would you be so kind as to explain",
                                            "I'd really appreciate it if you could explain"))


def test_typos_change_a_few_letters_not_the_words():
  text = "Please summarize the main causes of the French Revolution in three paragraphs."
  out = rewrite.rewrite(text, "typos", np.random.default_rng(3))
  a, b = text.split(), out.split()
  assert len(a) == len(b)
  changed = [(x, y) for x, y in zip(a, b) if x != y]
  assert 1 <= len(changed) <= 3
  assert all(x[0] == y[0] and abs(len(x) - len(y)) <= 1 for x, y in changed)


def test_variants_are_distinct_pure_and_seeded():
  text = SAMPLES[0]
  v = rewrite.variants(text, 5, seed=1)
  assert v == rewrite.variants(text, 5, seed=1)
  assert v != rewrite.variants(text, 5, seed=2)
  assert len(v) == 5 and len({s for s, _ in v}) == 5
  assert len({text_key(t) for _, t in v} | {text_key(text)}) == 6
  only = rewrite.variants(text, 3, seed=1, style_names=["slang", "typos"])
  assert {s for s, _ in only} == {"slang", "typos"}
  # The order of calls does not matter: each text seeds its own generator.
  w = [rewrite.variants(t, 2, seed=0) for t in SAMPLES]
  assert [rewrite.variants(t, 2, seed=0) for t in reversed(SAMPLES)] == w[::-1]


def test_every_style_changes_every_builtin_prompt():
  prompts = loaders.load_builtin("").prompts
  assert len(prompts) > 2000
  for n, p in enumerate(prompts):
    for style in rewrite.styles():
      out = rewrite.rewrite(p.text, style, np.random.default_rng(n))
      assert text_key(out) != text_key(p.text), (style, p.id)
