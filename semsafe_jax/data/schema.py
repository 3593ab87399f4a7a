"""The one prompt record every source is read into, and its validation.

Loaders report bad rows through `RowIssues`, which either raises a `DataError`
naming the file, row and problem (the default) or, when the user opted in with
`config.data.on_bad_rows="warn"`, counts and logs the row and moves on.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable, Sequence

from absl import logging

from semsafe_jax.errors import UserError

# "unlabeled": prompts of unknown harm (a source's ?label=unlabeled, a label column or
# config.data.default_label). Never evaluated; with probe.use="flag_unlabeled" the
# safety probe picks which of them are trained on as harmful (see splits.py).
UNLABELED = "unlabeled"
LABELS = ("harmful", "benign", "borderline", UNLABELED)
# Sources whose prompts may only ever be evaluated on: training on them would make
# the over-refusal numbers meaningless. Config can add more, never remove these.
EVAL_ONLY_SOURCES = frozenset({"xstest"})
BAD_ROW_POLICIES = ("error", "warn")
# How many individual bad rows to log in "warn" mode before only counting.
_MAX_LOGGED_ROWS = 5


class DataError(UserError, ValueError):
  """A data file or record that cannot be used as it is."""


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt. `intent_id` is shared by paraphrases of one harmful request.

  `topic` marks a benign look-alike: a benign or borderline request on the same topic as
  the harmful intent `topic` names (an intent_id), with a legitimate purpose. Splits hold
  look-alikes out together with their topic's intent (see splits.py).
  """

  id: str
  text: str
  label: str  # harmful | benign | borderline | unlabeled
  category: str = ""
  intent_id: str = ""  # empty -> the prompt is its own intent (see `validate_prompt`)
  style: str = ""
  source: str = ""
  topic: str = ""  # benign look-alikes: the intent_id of the harmful intent they resemble

  def to_dict(self) -> dict[str, str]:
    return dataclasses.asdict(self)


def text_key(text: str) -> str:
  """Duplicate-detection key: case and whitespace changes are not new prompts."""
  return " ".join(text.split()).casefold()


def validate_prompt(prompt: Prompt) -> Prompt:
  """Checks one record; returns it with `intent_id` defaulted to its id.

  Raises:
    DataError: empty id/text or a label outside `LABELS` (message without location;
      callers add the file and row).
  """
  if not prompt.id:
    raise DataError("empty id")
  if not prompt.text.strip():
    raise DataError("empty text")
  if "\x00" in prompt.text:
    raise DataError("text contains a NUL byte (corrupt file?)")
  if prompt.label not in LABELS:
    raise DataError(f"unknown label {prompt.label!r} (expected one of {', '.join(LABELS)})")
  if not prompt.intent_id:
    prompt = dataclasses.replace(prompt, intent_id=prompt.id)
  return prompt


def eval_only_sources(extra: Iterable[str] = ()) -> frozenset[str]:
  return EVAL_ONLY_SOURCES | frozenset(extra)


def check_trainable(prompts: Sequence[Prompt], indices: Iterable[int],
                    extra_eval_only: Iterable[str] = ()) -> None:
  """The enforced eval-only rule: raises if any index points at an eval-only source.

  Every builder of a training split calls this; so can anyone handing indices to
  a trainer.
  """
  banned = eval_only_sources(extra_eval_only)
  bad = [prompts[i] for i in indices if prompts[i].source in banned]
  if bad:
    examples = ", ".join(f"{p.id} (source {p.source})" for p in bad[:3])
    raise DataError(
        f"{len(bad)} eval-only prompt(s) would enter training, e.g. {examples}. "
        f"Sources {sorted(banned)} are evaluation-only.")


class RowIssues:
  """Raises on a bad row, or counts and logs it, per the `on_bad_rows` policy."""

  def __init__(self, where: str, on_bad_rows: str = "error"):
    if on_bad_rows not in BAD_ROW_POLICIES:
      raise DataError(f"config.data.on_bad_rows={on_bad_rows!r}; "
                      f"expected one of {BAD_ROW_POLICIES}")
    self.where = where
    self.policy = on_bad_rows
    self.skipped: collections.Counter[str] = collections.Counter()

  def bad_row(self, row: str, problem: str) -> None:
    """Reports `problem` at `row` ("row 3 (line 4)"); returns only in warn mode."""
    message = f"{self.where}, {row}: {problem}"
    if self.policy == "error":
      raise DataError(message + " (set config.data.on_bad_rows='warn' to skip such rows)")
    kind = problem.split(" (", 1)[0].split(":", 1)[0]
    self.skipped[kind] += 1
    if sum(self.skipped.values()) <= _MAX_LOGGED_ROWS:
      logging.warning("Skipping %s", message)

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def log_summary(self, kept: int) -> None:
    detail = ", ".join(f"{n} {k}" for k, n in sorted(self.skipped.items()))
    logging.info("%s: kept %d, skipped %d%s", self.where, kept, self.num_skipped,
                 f" ({detail})" if detail else "")

  def summary(self, kept: int) -> dict[str, Any]:
    return {"where": self.where, "kept": kept, "skipped": self.num_skipped,
            "skipped_by_reason": dict(self.skipped)}
