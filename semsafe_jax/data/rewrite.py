"""Deterministic, rule-based style rewrites of prompts.

A rewrite keeps the request and changes its surface: register (slang, polite, terse,
verbose), frame (role-play, hypothetical, past tense, third person, question) or
spelling (typos, lowercase). It never adds or removes content of the request, so a
rewrite keeps its source's label. Uses:

  - the built-in unlabelled pool (semsafe_jax/data/builtin/make_unlabeled.py);
  - "generated neighbours" of training prompts: unlabelled variants that sit next to
    their labelled source in embedding space.

  rewrite(text, style, rng) -> str   one style; changes the text for every style
  variants(text, n, seed)            n distinct rewrites, a pure function of (text, seed)
  styles()                           the style names

Everything random comes from the `np.random.Generator` passed in: the same text,
style and generator state always give the same output.
"""

from __future__ import annotations

import hashlib
import re
from typing import Callable, Sequence

import numpy as np

from semsafe_jax.data.schema import text_key

# ----------------------------------------------------------------------------- parsing

# Leading pleasantries that carry no request ("Could you please", "I'd be grateful if you
# could", ...); stripped before a new frame is put around the request.
_LEAD = re.compile(
    r"^(?:(?:hey|hi|hello|ok|okay|so|yo|please)[,!]?\s+)*"
    r"(?:would you (?:mind|be (?:so )?kind (?:as )?to) |"
    r"(?:could|can|would|will) you (?:please |kindly )?|"
    r"i(?:'d| would) (?:be (?:very |really )?grateful|appreciate it) if you could |"
    r"i(?:'d| would) like (?:you )?to |please |kindly )", re.I)
_TRAIL = re.compile(r"(?:[,.]?\s*(?:please|thanks|thank you|thx|pls|lol))+[.!?]*$", re.I)
# "Tell me how to X" / "Explain how to X" / "How do I X?" -> "X" (a verb phrase).
_HOWTO = [
    re.compile(r"^(?:tell|show|teach) me how (?:to|i can|i could|i should|do i) (.+)$", re.I),
    re.compile(r"^(?:explain|describe|show) how (?:to|i can|i could|one can|someone can) (.+)$",
               re.I),
    re.compile(r"^how (?:do|can|could|should|would|might) (?:i|we|one) (.+)$", re.I),
    re.compile(r"^how (?:to|2) (.+)$", re.I),
    re.compile(r"^help me (?:to )?(.+)$", re.I),
    re.compile(r"^(?:what'?s|what is) the (?:best|easiest|fastest|safest|right) way to (.+)$",
               re.I),
]
# A request that starts with a bare imperative verb ("Write ...", "Give me ...").
_IMPERATIVE = re.compile(
    r"^(write|give|make|find|create|help|plan|compile|identify|rewrite|describe|list|tell|"
    r"explain|show|teach|draft|generate|recommend|suggest|remind|convince|design|build|"
    r"outline|summarize|summarise|translate|produce|prepare|provide|walk|get|set|fix|point|"
    r"send|name|share|check|look|search|break|rank|compare|convert|calculate|debug)\b(.*)$",
    re.I)
# Verbs whose object is the thing asked for: "Write X" -> "how did people write X".
_MAKE_VERBS = frozenset({"write", "make", "create", "plan", "compile", "rewrite", "draft",
                         "generate", "design", "build", "outline", "produce", "prepare", "find",
                         "identify", "get", "set", "fix", "translate", "summarize", "summarise"})
_FIRST_TO_THIRD = [  # first person -> "they" forms; "they" takes the same verb forms as "I"
    (r"\bI'm\b", "they're"), (r"\bI am\b", "they are"), (r"\bI was\b", "they were"),
    (r"\bI've\b", "they've"), (r"\bI'd\b", "they'd"), (r"\bI'll\b", "they'll"),
    (r"\bI\b", "they"), (r"\bmyself\b", "themselves"), (r"\bmy\b", "their"),
    (r"\bmine\b", "theirs"), (r"\bme\b", "them"),
    (r"\bwe're\b", "they're"), (r"\bwe\b", "they"), (r"\bour\b", "their"), (r"\bus\b", "them"),
]


def _strip_end(text: str) -> str:
  return text.strip().rstrip(".?!").strip()


def _core(text: str) -> str:
  """The request without leading/trailing pleasantries and final punctuation."""
  t = " ".join(text.split())
  for _ in range(2):
    t = _LEAD.sub("", t)
  t = _TRAIL.sub("", t)
  return _strip_end(t) or _strip_end(text)


def _howto(core: str) -> str | None:
  """The verb phrase X of a "how to X" request, or None."""
  for pattern in _HOWTO:
    m = pattern.match(core)
    if m:
      return _strip_end(m.group(1))
  return None


_QUESTION_START = re.compile(
    r"^(?:what|what's|whats|which|who|whom|whose|where|when|why|how|is|are|was|were|do|does|"
    r"did|can|could|should|would|will|may|might|am|have|has)\b", re.I)


_YOU_REQUEST = re.compile(r"^(?:please )?(?:could|can|would|will) you\b", re.I)


def _kind(text: str, core: str) -> str:
  """'imperative', 'question' or 'statement' (how-to requests are found by `_howto`)."""
  if _IMPERATIVE.match(core) or _YOU_REQUEST.match(text.strip()):
    return "imperative"
  if text.rstrip().endswith("?") or _QUESTION_START.match(core):
    return "question"
  return "statement"


def _lower_first(text: str) -> str:
  if len(text) > 1 and text[:2].isupper():  # an acronym ("IRS", "ISIS")
    return text
  if text.startswith(("I ", "I'")):
    return text
  return text[:1].lower() + text[1:]


def _upper_first(text: str) -> str:
  return text[:1].upper() + text[1:]


def third_person(text: str) -> str:
  """First-person words -> "they/their/them" (used by the third-person frames)."""
  for pattern, repl in _FIRST_TO_THIRD:
    text = re.sub(pattern, repl, text)
  return text


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
  return options[int(rng.integers(len(options)))]


def _end(text: str, mark: str) -> str:
  return _strip_end(text) + mark


def _closed(text: str, core: str) -> str:
  """`text` with its own final punctuation, or "?" / "." as its kind asks."""
  text = text.strip()
  if text[-1:] in ".?!":
    return text
  return text + ("?" if _kind(text, core) == "question" else ".")


# ----------------------------------------------------------------------------- styles

_PERSONAS = ("a retired professor", "a veteran journalist", "a friendly librarian",
             "a grumpy sea captain", "an expert consultant", "a character in my novel",
             "my late grandmother", "a drill sergeant", "a wise old wizard",
             "an AI from the future")
_FRIENDS = ("friend", "cousin", "coworker", "neighbor", "roommate", "classmate", "brother",
            "sister", "uncle")


def _polite(text: str, rng: np.random.Generator) -> str:
  core = _core(text)
  how = _howto(core)
  kind = _kind(text, core)
  if how:
    body = _pick(rng, ("Would you mind explaining how to {}?",
                       "Could you kindly walk me through how to {}?",
                       "I'd be very grateful if you could tell me how to {}.")).format(how)
  elif kind == "imperative":
    body = _pick(rng, ("Could you please {}?", "Would you be so kind as to {}?",
                       "I'd really appreciate it if you could {}.")).format(_lower_first(core))
  elif kind == "question":
    body = _pick(rng, ("If it's not too much trouble, {}?", "May I ask: {}?",
                       "I hope you don't mind me asking, {}?")).format(_lower_first(core))
  else:
    body = _pick(rng, ("Sorry to bother you, but {}.", "Hello, I hope you can help: {}.")).format(
        _lower_first(core))
  return body + _pick(rng, ("", " Thank you so much!", " Thanks in advance.",
                            " Many thanks for your help."))


def _terse(text: str, rng: np.random.Generator) -> str:
  core = _core(text)
  how = _howto(core)
  if how:
    return _pick(rng, ("Steps to {}. Be brief.", "How to {}. Short answer.",
                       "Quick: how to {}?")).format(how)
  m = re.match(r"^(?:what|which|who|where|when|why) (?:is|are|was|were) (.+)$", core, re.I)
  if m:
    return _upper_first(_strip_end(m.group(1))) + _pick(
        rng, (". Explain briefly.", ": short answer.", ". One paragraph."))
  if _IMPERATIVE.match(core):
    return _upper_first(core) + _pick(rng, (". No fluff.", ". Now.", ". Keep it short."))
  return _upper_first(_closed(core, core)) + _pick(rng, (" Answer in one line.",
                                                         " Short answer only."))


def _verbose(text: str, rng: np.random.Generator) -> str:
  before = _pick(rng, (
      "I've been thinking about this for a while and I'd like a proper answer.",
      ("Some background: I've read a few things online but they contradict each other, so "
       "I'm asking here."),
      "This might be a long shot, and sorry for the wall of text, but here goes.",
      "I hope this is the right place to ask; I've tried searching and didn't find much.",
      "Context: I'm not an expert at all, so please bear with me."))
  after = _pick(rng, (
      "Please be thorough and explain each part so I really understand it.",
      "A detailed answer would help a lot, and feel free to add anything I should know.",
      "I'd appreciate it if you could go step by step and not skip anything.",
      "Take your time; I'd rather have a complete answer than a quick one."))
  return f"{before} {text.strip()} {after}"


def _question(text: str, rng: np.random.Generator) -> str:
  core = _core(text)
  how = _howto(core)
  kind = _kind(text, core)
  if how:
    return _pick(rng, ("Do you know how to {}?", "What's the best way to {}?",
                       "Any idea how someone would {}?")).format(how)
  if kind == "imperative":
    return _pick(rng, ("Can you {}?", "Would you be able to {}?", "Is it possible for you to {}?")
                 ).format(_lower_first(core))
  if kind == "question":
    return _pick(rng, ("I was wondering, {}?", "Quick question: {}?",
                       "Can I ask you something: {}?")).format(_lower_first(core))
  return f"{_end(core, '.')} Can you help me with that?"


def _roleplay(text: str, rng: np.random.Generator) -> str:
  frame = _pick(rng, ("You are {p}. Stay in character and answer: {t}",
                      "Roleplay as {p}. {t}",
                      "Pretend you're {p}. {t}",
                      "In my story, someone asks {p}: \"{t}\" Write the reply.",
                      "Act as {p} and answer this: {t}"))
  return frame.format(p=_pick(rng, _PERSONAS), t=text.strip())


def _hypothetical(text: str, rng: np.random.Generator) -> str:
  core = _core(text)
  how = _howto(core)
  if how and rng.random() < 0.6:
    return _pick(rng, ("Hypothetically speaking, how would someone {}?",
                       "Purely in theory, how might a person {}?",
                       "Imagine a world where this is a normal question: how would you {}?")
                 ).format(third_person(how))
  if rng.random() < 0.5:
    return _pick(rng, ("Hypothetically speaking, {}", "Just as a thought experiment, {}",
                       "In a purely fictional world where anything goes, {}")).format(
                           _lower_first(text.strip()))
  return _pick(rng, ("Suppose, just for the sake of argument, that I asked you this: {}",
                     "Hypothetical question, nothing more: {}")).format(text.strip())


_PAST_QUESTIONS = [  # (pattern on the core, template); {e} = an era, groups by number
    (re.compile(r"^(what|which|who|where|when|why|how) (is|are) (.+)$", re.I),
     lambda m, e: f"{_upper_first(m[1])} {'was' if m[2].lower() == 'is' else 'were'} "
                  f"{third_person(m[3])} {e}?"),
    (re.compile(r"^(is|are) (.+)$", re.I),
     lambda m, e: f"{'Was' if m[1].lower() == 'is' else 'Were'} {third_person(m[2])} {e}?"),
    (re.compile(r"^(?:can|could|should|do|does) (?:i|we|you|one|someone) (.+)$", re.I),
     lambda m, e: f"{_upper_first(e)}, did people {third_person(m[1])}?"),
    (re.compile(r"^(what|which|why|where|when|who|how \w+) (?:do|does|should|can|could|would) "
                r"(?:i|we|you|one|someone|people) (.+)$", re.I),
     lambda m, e: f"{_upper_first(m[1])} did people {third_person(m[2])} {e}?"),
    (re.compile(r"^(what|which|why|where|when|how) (?:do|does) (.+)$", re.I),
     lambda m, e: f"{_upper_first(m[1])} did {third_person(m[2])} {e}?"),
]


def _past_tense(text: str, rng: np.random.Generator) -> str:
  core = _core(text)
  how = _howto(core)
  era = _pick(rng, ("in the 1980s", "back in the 90s", "in the old days", "a few decades ago",
                    "before smartphones", "in the early 2000s"))
  if how:
    return _pick(rng, ("How did people {h} {e}?", "{E}, how did people {h}?",
                       "How did someone {h} {e}, historically?")).format(
                           h=third_person(how), e=era, E=_upper_first(era))
  m = _IMPERATIVE.match(core)
  if m and m.group(1).lower() in _MAKE_VERBS:
    verb, rest = m.group(1).lower(), m.group(2)
    return _pick(rng, ("{E}, how did people {v}{r}?",
                       "How would someone have gone about it {e}: {v}{r}?")).format(
                           E=_upper_first(era), e=era, v=verb, r=third_person(rest))
  for pattern, make in _PAST_QUESTIONS:
    m = pattern.match(core)
    if m:
      return make(m, era)
  return _pick(rng, ("{E}, people asked this a lot: {t} What was the usual answer back then?",
                     "I once asked this years ago and never got an answer: {t}")).format(
                         E=_upper_first(era), t=_closed(text, core))


def _third_person(text: str, rng: np.random.Generator) -> str:
  core = _core(text)
  how = _howto(core)
  friend = _pick(rng, _FRIENDS)
  if how:
    return _pick(rng, ("My {f} wants to know how to {h}.", "My {f} keeps asking me how to {h}.",
                       "Asking for my {f}: how would they {h}?")).format(f=friend,
                                                                        h=third_person(how))
  return _pick(rng, ("My {f} asked me this and I didn't know what to say: \"{t}\"",
                     "Someone in my {f}'s group chat posted this, how would you answer? {t}",
                     "One of my {f}s wants an answer to this: {t}")).format(f=friend,
                                                                           t=text.strip())


_SLANG_WORDS = [
    (r"\byou're\b", "ur"), (r"\byour\b", "ur"), (r"\byou\b", "u"), (r"\bplease\b", "pls"),
    (r"\bgoing to\b", "gonna"), (r"\bwant to\b", "wanna"), (r"\bgot to\b", "gotta"),
    (r"\bbecause\b", "cuz"), (r"\bpeople\b", "ppl"), (r"\bsomething\b", "smth"),
    (r"\bwithout\b", "w/o"), (r"\bwith\b", "w/"), (r"\breally\b", "rly"), (r"\bokay\b", "ok"),
    (r"\bthanks\b", "thx"), (r"\bare\b", "r"), (r"\bbefore\b", "b4"), (r"\bthough\b", "tho"),
    (r"\bdon't\b", "dont"), (r"\bcan't\b", "cant"), (r"\bI'm\b", "im"), (r"\bwhat's\b", "whats"),
    (r"\bit's\b", "its"), (r"\bdoesn't\b", "doesnt"),
]


def _slang(text: str, rng: np.random.Generator) -> str:
  t = _core(text)
  for pattern, repl in _SLANG_WORDS:
    if rng.random() < 0.8:
      t = re.sub(pattern, repl, t, flags=re.I)
  t = t.lower().replace("'", "")
  t = re.sub(r"\bhow to\b", "how 2", t) if rng.random() < 0.5 else t
  t = re.sub(r"[.;:]", "", t)
  lead = _pick(rng, ("", "yo ", "ok so ", "bro ", "ngl ", "quick q ", "lowkey "))
  tail = _pick(rng, ("", " lol", " fr", " asap", " no cap", " thx", " pls", " ??"))
  out = f"{lead}{t}{tail}"
  return out if out != text else f"yo {out} lol"


def _lowercase(text: str, rng: np.random.Generator) -> str:
  del rng  # no choices to make
  t = " ".join(re.sub(r"[.?!,;:]+", "", text.lower()).split())
  return t if text_key(t) != text_key(text) else f"{t} ??"


_KEYBOARD = {c: n for row in ("qwertyuiop", "asdfghjkl", "zxcvbnm")
             for c, n in zip(row, row[1:] + row[-2])}


def _typos(text: str, rng: np.random.Generator) -> str:
  words = text.split(" ")
  candidates = [i for i, w in enumerate(words) if sum(ch.isalpha() for ch in w) >= 4]
  if not candidates:
    return text.strip() + " pls"
  n = max(1, int(round(0.12 * len(candidates))))
  for i in sorted(rng.choice(candidates, size=min(n, len(candidates)), replace=False)):
    w = words[i]
    letters = [k for k, ch in enumerate(w) if ch.isalpha()]
    k = letters[int(rng.integers(1, len(letters) - 1))]  # keep the first and last letter
    kind = int(rng.integers(4))
    if kind == 0 and w[k + 1:k + 2].isalpha():  # swap two letters
      w = w[:k] + w[k + 1] + w[k] + w[k + 2:]
    elif kind == 1:  # drop a letter
      w = w[:k] + w[k + 1:]
    elif kind == 2:  # double a letter
      w = w[:k] + w[k] + w[k:]
    else:  # hit the neighbouring key
      ch = w[k].lower()
      w = w[:k] + _KEYBOARD.get(ch, ch + ch) + w[k + 1:]
    words[i] = w
  out = " ".join(words)
  return out if out != text else text.strip() + " pls"


_STYLES: dict[str, Callable[[str, np.random.Generator], str]] = {
    "slang": _slang,
    "polite": _polite,
    "roleplay": _roleplay,
    "hypothetical": _hypothetical,
    "past_tense": _past_tense,
    "third_person": _third_person,
    "question": _question,
    "terse": _terse,
    "verbose": _verbose,
    "typos": _typos,
    "lowercase": _lowercase,
}
# Styles that only change the surface (spelling, case): they compose after a frame style.
SURFACE_STYLES = ("typos", "lowercase")


def styles() -> tuple[str, ...]:
  """The style names `rewrite` accepts."""
  return tuple(_STYLES)


def rewrite(text: str, style: str, rng: np.random.Generator) -> str:
  """`text` rewritten in `style`; never the same text up to case and spacing."""
  if style not in _STYLES:
    raise ValueError(f"rewrite style={style!r}; expected one of {', '.join(_STYLES)}")
  if not text.strip():
    raise ValueError("rewrite: empty text")
  out = " ".join(_STYLES[style](text, rng).split())
  if text_key(out) == text_key(text):  # a rule that happened to be a no-op
    out = " ".join(_verbose(text, rng).split())
  return out


def string_seed(key: str, seed: int) -> list[int]:
  """A generator seed from (seed, a string): independent of call order and process."""
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return [int(seed), int.from_bytes(digest[:8], "big")]


def variants(text: str, n: int, seed: int = 0,
             style_names: Sequence[str] | None = None) -> list[tuple[str, str]]:
  """Up to `n` rewrites of `text` in distinct styles, as (style, text) pairs.

  A pure function of (text, n, seed, style_names): the styles are a seeded permutation,
  duplicates (same text up to case and spacing, or the source itself) are skipped.
  """
  names = list(style_names or styles())
  unknown = sorted(set(names) - set(_STYLES))
  if unknown:
    raise ValueError(f"variants: unknown style(s) {unknown}; expected some of {styles()}")
  rng = np.random.default_rng(string_seed(text, seed))
  seen = {text_key(text)}
  out = []
  for j in rng.permutation(len(names)):
    if len(out) >= n:
      break
    new = rewrite(text, names[j], rng)
    if text_key(new) not in seen:
      seen.add(text_key(new))
      out.append((names[j], new))
  return out
