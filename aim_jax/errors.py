"""The errors a user can cause, and how every command reports them.

Each is a `UserError`: the command line prints one line naming the file, key or
field and exits non-zero (`EXIT_USER_ERROR`), without a traceback; set
`AIM_JAX_TRACEBACK=1` (or pass `--verbosity=1` to the absl commands) to see it.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import sys

# Exit codes shared by every command and by the launchers (launch/, docs/launch.md).
EXIT_OK = 0
EXIT_USER_ERROR = 2          # bad config, checkpoint, data or arguments: do not retry
EXIT_NONFINITE = 3           # training diverged (NaN/inf): do not retry as is
EXIT_PREEMPTED = 75          # SIGTERM: a checkpoint was written; requeue and resume (EX_TEMPFAIL)


def first_line(e: BaseException) -> str:
  """'Type: the first line of its message' (at most 300 characters): an error of a library
  quoted inside one of ours."""
  text = str(e).strip().split('\n')[0]
  return f'{type(e).__name__}: {text[:300]}'


def is_int(v) -> bool:
  """A config value that is an integer (Python or NumPy), not a bool."""
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v) -> bool:
  """A config value that is a finite real number (int or float, Python or NumPy), not a
  bool."""
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


class UserError(ValueError):
  """An input the user can fix; the message names the file, key or field."""


class ConfigError(UserError):
  """A config that cannot run; the message names the field."""


class CheckpointError(UserError):
  """A checkpoint directory that is missing, incomplete, damaged or of another model."""


class ConversionError(UserError):
  """A source checkpoint that cannot be converted as asked."""


class DataError(UserError):
  """Input data (videos, records, annotation lists) that cannot be used as asked."""


def show_traceback() -> bool:
  return os.environ.get('AIM_JAX_TRACEBACK', '') not in ('', '0')


def report(error: BaseException, prog: str) -> int:
  """Print `prog: ErrorType: message` on one line (stderr) and return the exit code."""
  message = ' '.join(str(error).split('\n'))
  print(f'{prog}: {type(error).__name__}: {message}', file=sys.stderr, flush=True)
  return EXIT_USER_ERROR


# orbax warnings that every read-only restore of a workdir prints (a manager opened to read,
# an item directory without its own metadata file, as orbax itself writes them): not news.
_ORBAX_ROUTINE = ('CheckpointManagerOptions.read_only=True, setting',
                  'Given directory is read only=', 'Metadata file does not exist: ')


class _QuietLibraries(logging.Filter):
  """Drops orbax's per-save/restore INFO chatter and its routine read-only warnings; other
  warnings and errors still pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    if '/orbax/' not in record.pathname or record.levelno >= logging.ERROR:
      return True
    return (record.levelno >= logging.WARNING
            and not str(record.msg).startswith(_ORBAX_ROUTINE))


def quiet_library_logs() -> None:
  """Every command's log shows the project's lines, not orbax's INFO chatter."""
  from absl import logging as absl_logging
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
