"""Where a conversion's output goes: checked before anything is read, written whole.

An existing `--out` is never replaced silently; a training workdir or the source never; a
parameter checkpoint or an output file only with `--overwrite`, and only once the new one is
complete (`write_output`: a sibling `OUT.tmp-<pid>`, renamed into place).
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

from aim_jax.errors import ConversionError

WORKDIR = 'a training workdir'
PARAMS = 'a parameter checkpoint'
FILE = 'a file'
EMPTY_DIR = 'an empty directory'
OTHER_DIR = 'a non-empty directory'
BROKEN_LINK = 'a broken symbolic link'


def _remote(path: str) -> bool:
  return '://' in path


def _holds_run_config(config_file) -> bool:
  try:
    blob = json.loads(config_file.read_text())
  except (OSError, ValueError):
    return False
  return isinstance(blob, dict) and 'config' in blob       # checkpoints.start_run writes it


def output_kind(out: str) -> str | None:
  """What is at `out`: None (nothing) or one of WORKDIR, PARAMS, FILE, EMPTY_DIR, OTHER_DIR,
  BROKEN_LINK. A training workdir is recognised by its lock, its checkpoint directories
  (`aim_jax.checkpoints`) or a config.json that holds the run's config."""
  from etils import epath

  from aim_jax import checkpoints
  path = epath.Path(out)
  if not path.exists():
    return BROKEN_LINK if not _remote(out) and os.path.islink(out) else None
  if not path.is_dir():
    return FILE
  try:
    names = {child.name for child in path.iterdir()}
  except OSError as e:
    raise ConversionError(f'--out {out}: cannot list the directory ({e.strerror or e})') from None
  if not names:
    return EMPTY_DIR
  if (names & {checkpoints.CHECKPOINTS, checkpoints.FROZEN, checkpoints.BEST,
               checkpoints.LOCK_FILE}
      or checkpoints.CONFIG_FILE in names and _holds_run_config(path / checkpoints.CONFIG_FILE)):
    return WORKDIR
  if checkpoints.CONFIG_FILE in names and checkpoints.PARAMS_DIR in names:
    return PARAMS
  return OTHER_DIR


def _same_path(a: str, b: str) -> bool:
  if _remote(a) or _remote(b):
    return a.rstrip('/') == b.rstrip('/')
  if os.path.exists(a) and os.path.exists(b):
    return os.path.samefile(a, b)
  return os.path.abspath(a) == os.path.abspath(b)


def _inside(path: str, directory: str) -> bool:
  if _remote(path) or _remote(directory):
    return path.startswith(directory.rstrip('/') + '/')
  return os.path.realpath(path).startswith(os.path.realpath(directory).rstrip(os.sep) + os.sep)


def check_output(out: str, src: str, *, file: bool = False, overwrite: bool = False) -> str | None:
  """Refuse an --out that cannot, or must not, be written; -> what is there (`output_kind`).

  `file`: the output is a file (export-aim), else a directory. Refused always: --src
  itself or a directory holding it, a training workdir, a path under a file, a file where
  a directory goes (and the reverse), a non-empty directory that is no parameter
  checkpoint. Refused without `overwrite`: an existing parameter checkpoint or file.
  """
  out, src = os.fspath(out), os.fspath(src)
  what = output_kind(out)
  if what is None:
    if not _remote(out):
      parent = os.path.dirname(os.path.abspath(out))
      while not os.path.exists(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
      if not os.path.isdir(parent):
        raise ConversionError(f'--out {out}: {parent} is a file, not a directory')
    return None
  if _same_path(out, src):
    raise ConversionError(f'--out {out} is --src itself ({what}): choose a new path')
  if what in (EMPTY_DIR, OTHER_DIR, PARAMS, WORKDIR) and _inside(src, out):
    raise ConversionError(f'--out {out} ({what}) holds --src {src}: choose a new path')
  if what == WORKDIR:
    raise ConversionError(f'--out {out} exists ({what}): a workdir is never replaced, not '
                          'even with --overwrite; choose a new path')
  if file and what != FILE:
    hint = (f'name the file to write, e.g. {os.path.join(out, "model.pth")}'
            if what == EMPTY_DIR else 'choose a new path')
    raise ConversionError(f'--out {out} exists ({what}) and the output is a file: {hint}')
  if not file and what == EMPTY_DIR:
    return what
  if not file and what in (FILE, BROKEN_LINK):
    raise ConversionError(f'--out {out} exists ({what}) and the output is a directory: '
                          'choose a new path')
  if what == OTHER_DIR:
    raise ConversionError(f'--out {out} exists ({what}, not a parameter checkpoint): choose a '
                          'new path (--overwrite replaces only a parameter checkpoint)')
  if not overwrite:
    raise ConversionError(f'--out {out} exists ({what}): choose a new path, or --overwrite to '
                          'replace it')
  if _remote(out):
    raise ConversionError(f'--out {out} exists ({what}): --overwrite replaces local paths '
                          'only; remove it first or choose a new path')
  return what


def _free_name(stem: str) -> str:
  name, n = stem, 0
  while os.path.lexists(name):
    n += 1
    name = f'{stem}-{n}'
  return name


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.unlink(path)


def write_output(out: str, write_to: Callable[[str], None], log: Callable[[str], None] = print
                 ) -> None:
  """`write_to(path)` writes the whole output at `path`; here it lands at `out`.

  A new local output is written to a sibling `OUT.tmp-<pid>` and renamed to `out` when
  complete; an existing one (allowed by `check_output`) is swapped out only then, so a
  failed write leaves it as it was. An existing empty directory (a mount point, say) is
  written into; gs:// paths are written in place.
  """
  if _remote(out) or os.path.isdir(out) and not os.listdir(out):
    write_to(out)
    return
  target = os.path.realpath(out) if os.path.exists(out) else os.path.abspath(out)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = _free_name(f'{target}.tmp-{os.getpid()}')
  try:
    write_to(tmp)
    if os.path.isdir(target):
      old = _free_name(f'{target}.old-{os.getpid()}')
      os.rename(target, old)
      try:
        os.rename(tmp, target)
      except OSError:
        os.rename(old, target)
        raise
      try:
        shutil.rmtree(old)
      except OSError as e:
        log(f'NOTICE: {out} was replaced, but the old copy {old} could not be removed: '
            f'{e.strerror or e}')
    else:
      os.replace(tmp, target)       # a file over a file, or a new path: atomic
  except BaseException:
    _remove(tmp)
    raise
