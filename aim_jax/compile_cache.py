"""Compiled steps kept between runs: JAX's persistent compilation cache.

A run compiles its train and eval steps once per process: B/16 8x224 took 40.8 s (train) and
13.8 s (eval) on an H200, the unrolled L/14 about a minute, a TPU pod longer. A restart after a
preemption (exit 75), a resume, a second evaluation or another run of the same config compiles
the same programs again. With `config.compilation_cache_dir` set (the default:
`~/.cache/aim_jax/xla`), JAX writes each executable that took at least a second to compile
there, keyed by the program, the XLA flags and options, the devices and the JAX/XLA versions,
and the next process loads it instead of compiling: the same executable, the same results.

* `JAX_COMPILATION_CACHE_DIR`, when set, takes precedence (JAX reads it itself).
* `''` turns the cache off.
* Only process 0 writes (JAX's rule, so that hosts do not contend for one file); each host
  reads its own directory. On a pod or cluster whose hosts do not share a home directory,
  point every host at one shared location (`gs://bucket/xla_cache` works: JAX writes it
  through etils).
* The directory grows by one entry per distinct program and is never read by anything else:
  deleting it only costs the next run its compile.
* What is in it is run as code: keep it a directory only you write to (JAX's own warning).
  It is not part of a workdir: a workdir received from someone else carries no executables.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Optional

from absl import logging

ENV = 'JAX_COMPILATION_CACHE_DIR'
FIELD = 'compilation_cache_dir'

_HIT = '/jax/compilation_cache/cache_hits'
_STORED = '/jax/compilation_cache/cache_misses'       # recorded when an entry is written
_SAVED = '/jax/compilation_cache/compile_time_saved_sec'


@dataclasses.dataclass
class Use:
  """What the cache did in this process since `configure`."""
  directory: Optional[str] = None
  source: str = ''                 # 'config' or the environment variable's name
  loaded: int = 0                  # executables loaded instead of compiled
  stored: int = 0                  # executables compiled and written
  saved_s: float = 0.0             # compile time the loads saved (JAX's own estimate)

  def describe(self) -> str:
    if not self.directory:
      return 'compilation cache: off'
    return (f'compilation cache {self.directory}: {self.loaded} compiled program(s) loaded '
            f'(~{self.saved_s:.0f} s of compiling saved), {self.stored} compiled and stored')


_use = Use()
_lock = threading.Lock()
_listening = False


def _on_event(event: str, **_: Any) -> None:
  with _lock:
    if event == _HIT:
      _use.loaded += 1
    elif event == _STORED:
      _use.stored += 1


def _on_duration(event: str, duration: float, **_: Any) -> None:
  if event == _SAVED:
    with _lock:
      _use.saved_s += max(float(duration), 0.0)


def _listen() -> None:
  global _listening
  if not _listening:
    import jax.monitoring
    jax.monitoring.register_event_listener(_on_event)
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    _listening = True


def resolve(spec: str) -> tuple[Optional[str], str]:
  """-> (directory or None, where it came from) for config.compilation_cache_dir `spec`."""
  env = os.environ.get(ENV, '')
  if env:
    return env, ENV
  if not spec:
    return None, 'config'
  return (spec if '://' in spec else os.path.abspath(os.path.expanduser(spec))), 'config'


def configure(config: Any) -> Use:
  """Points JAX's persistent compilation cache at config.compilation_cache_dir (before the
  first compilation of a run) and starts counting what it loads and stores. A local
  directory that cannot be created is a warning: the run compiles as without a cache."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc

  spec = str(config.get(FIELD, '') or '') if hasattr(config, 'get') else ''
  directory, source = resolve(spec)
  if directory and '://' not in directory:
    try:
      os.makedirs(directory, exist_ok=True)
      if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f'not writable: {directory}')
    except OSError as e:
      logging.warning('%s=%r: cannot use it (%s); compiling without a persistent cache',
                      FIELD if source == 'config' else ENV, directory, e)
      directory = None
  if jax.config.jax_compilation_cache_dir != directory:
    cc.reset_cache()           # a cache opened for another directory in this process
    cc.set_cache_dir(directory)
  _listen()
  with _lock:
    _use.directory, _use.source = directory, source
    _use.loaded = _use.stored = 0
    _use.saved_s = 0.0
  if directory:
    logging.info('compilation cache: %s (from %s); compiled steps are loaded from it when '
                 'this program was compiled before', directory, source)
  return usage()


def usage() -> Use:
  """A copy of what the cache has done since `configure`."""
  with _lock:
    return dataclasses.replace(_use)
