"""Errors the user can fix (a bad config value, file or workdir).

The command line (`semsafe_jax.main`) prints a `UserError` as one line and exits
with status 2; anything else is a bug and keeps its traceback. Each class also
derives from the builtin a caller would catch (ValueError, FileNotFoundError, ...).
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
  """Bad input; the message alone says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
  """A config value outside what the code accepts (see semsafe_jax/validate.py)."""

  def __init__(self, field: str, value: Any, allowed: str):
    self.field, self.value, self.allowed = field, value, allowed
    super().__init__(f"config.{field}={value!r}: {allowed}")


class WorkdirError(UserError, ValueError):
  """--workdir is empty, a file, or otherwise unusable."""


class InputFileError(UserError, ValueError):
  """An input file (prompts, data) that cannot be read as it is."""


class MissingInputError(UserError, FileNotFoundError):
  """Something the job needs is not there (a checkpoint, a file)."""


class OutputExistsError(UserError, FileExistsError):
  """An output path holds something this project did not write; it is left alone."""


class DamagedCheckpointError(UserError, RuntimeError):
  """A checkpoint step whose files cannot be read back."""
