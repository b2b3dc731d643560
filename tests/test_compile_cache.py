"""Compiled steps kept between runs (config.compilation_cache_dir, aim_jax/compile_cache.py)."""
import os
import pathlib
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from conftest import cpu_env
from aim_jax import checkpoints, compile_cache
from aim_jax import params as P
from configs import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
USE = re.compile(r'compilation cache (\S+): (\d+) compiled program\(s\) loaded .*, (\d+) compiled '
                 r'and stored')


def test_the_environment_variable_wins_then_the_field(monkeypatch):
  monkeypatch.setenv(compile_cache.ENV, '/somewhere/else')
  assert compile_cache.resolve('~/x') == ('/somewhere/else', compile_cache.ENV)
  monkeypatch.delenv(compile_cache.ENV)
  assert compile_cache.resolve('') == (None, 'config')
  assert compile_cache.resolve('~/x') == (os.path.expanduser('~/x'), 'config')
  assert compile_cache.resolve('rel/x') == (os.path.abspath('rel/x'), 'config')
  assert compile_cache.resolve('gs://bucket/xla') == ('gs://bucket/xla', 'config')


def test_every_training_config_keeps_compiled_steps_by_default():
  assert tiny.get_config().compilation_cache_dir == '~/.cache/aim_jax/xla'
  assert 'compilation_cache_dir' in checkpoints.RUNTIME_FIELDS   # resuming may change it


def test_a_directory_that_cannot_be_made_is_a_warning_and_no_cache(tmp_path, monkeypatch, caplog):
  before = jax.config.jax_compilation_cache_dir
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  config = ml_collections.ConfigDict({'compilation_cache_dir': str(blocker / 'xla')})
  try:
    with caplog.at_level('WARNING'):
      use = compile_cache.configure(config)
    assert use.directory is None and jax.config.jax_compilation_cache_dir is None
    assert any(str(blocker / 'xla') in r.getMessage() and 'compilation_cache_dir' in
               r.getMessage() for r in caplog.records), caplog.text
    assert use.describe() == 'compilation cache: off'
    assert float(jax.jit(lambda x: x + 1)(1.0)) == 2.0         # still compiles and runs
  finally:
    monkeypatch.undo()
    compile_cache.configure(ml_collections.ConfigDict({'compilation_cache_dir': ''}))
  assert jax.config.jax_compilation_cache_dir == before


def _train(workdir, cache, *overrides):
  env = cpu_env(1)
  env.pop(compile_cache.ENV, None)                 # the tests' own cache: not this one
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'   # the tiny programs count too
  cmd = [sys.executable, '-m', 'aim_jax.train', '--config', 'configs/tiny.py', '--workdir',
         str(workdir), '--config.progress_bar=False', '--config.total_steps=20',
         f'--config.compilation_cache_dir={cache}', *overrides]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stderr


@pytest.mark.slow
def test_a_second_run_loads_the_compiled_steps_and_computes_the_same(tmp_path):
  cache = tmp_path / 'xla'
  first = USE.search(_train(tmp_path / 'a', cache))
  assert first and first.group(1) == str(cache), 'no cache line in the first run'
  assert int(first.group(3)) > 0, first.group(0)
  entries = sorted(p.name for p in cache.iterdir())
  assert any(n.startswith('jit_train_step-') for n in entries), entries

  second = USE.search(_train(tmp_path / 'b', cache))
  assert second and int(second.group(3)) == 0, second.group(0)  # nothing compiled anew
  assert int(second.group(2)) >= int(first.group(3)), (first.group(0), second.group(0))
  assert sorted(p.name for p in cache.iterdir()) == entries
  a, _ = checkpoints.restore_params_from_workdir(str(tmp_path / 'a'))
  b, _ = checkpoints.restore_params_from_workdir(str(tmp_path / 'b'))
  for name, value in P.flatten(a).items():
    np.testing.assert_array_equal(P.flatten(b)[name], value, err_msg=name)

  off = _train(tmp_path / 'c', '')
  assert 'compilation cache: off' in off and not USE.search(off)
  assert sorted(p.name for p in cache.iterdir()) == entries
