r"""What a run's start costs, and what the persistent compilation cache gives back.

  python -m benchmarks.compile_time --config configs/k400.py:b16_f8 --mode train --batch 1
  python -m benchmarks.compile_time --config configs/k400.py:l14_f8 --mode train --batch 32 \
      --config.model.scan_layers=False --out l14_unrolled_compile.json

Builds the step exactly as training does (`benchmarks.step_benchmark.build`: the sharded state,
the jitted step with the config's compiler options), then times its tracing and lowering and its
compilation, in two fresh processes that share one compilation cache directory
(`config.compilation_cache_dir`, `aim_jax/compile_cache.py`): the `first` finds it empty, compiles
and stores the executable; the `second` finds the executable and loads it, as a restarted,
resumed or repeated run does. With `--cache_dir` a cache that already holds the program
(`benchmarks/gpu.sh` passes the one its other parts filled), both rows are loads. Each row
says how many programs were loaded and stored and JAX's own estimate of the compile time
saved. Lowering is not cached: a process traces its steps again. Nothing runs on the device
but the state's initialisation.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS


def measure(config, mode: str, batch: int) -> dict:
  """In this process: configure the cache, build the step, time lower and compile."""
  import jax

  from aim_jax import compile_cache, sharding
  from benchmarks.step_benchmark import build
  compile_cache.configure(config)
  b = build(config, batch, mode)
  with sharding.mesh_context(b['mesh'], b['rules']):
    t0 = time.perf_counter()
    if mode == 'train':
      lowered = b['step'].lower(b['state'], {'video': b['video'], 'label': b['labels']})
    else:
      lowered = b['step'].lower(b['params'], b['video'])
    t1 = time.perf_counter()
    before = compile_cache.usage()
    lowered.compile()
    t2 = time.perf_counter()
  use = compile_cache.usage()
  return dict(mode=mode, batch=batch, device_kind=jax.devices()[0].device_kind,
              devices=jax.device_count(), lower_s=round(t1 - t0, 2),
              compile_s=round(t2 - t1, 2), loaded=use.loaded - before.loaded,
              stored=use.stored - before.stored, saved_s=round(use.saved_s - before.saved_s, 2))


def _passed_on(args: list[str]) -> list[str]:
  """The command line without the parent's own flags (--out, --cache_dir, with their values)."""
  kept, skip = [], False
  for a in args:
    if skip:
      skip = False
    elif a in ('--out', '--cache_dir'):
      skip = True
    elif not a.startswith(('--out=', '--cache_dir=')):
      kept.append(a)
  return kept


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.child:
    print('ROW ' + json.dumps(measure(FLAGS.config, FLAGS.mode, FLAGS.batch or
                                      FLAGS.config.batch_size)), flush=True)
    return
  from benchmarks.step_benchmark import versions
  cache = FLAGS.cache_dir or tempfile.mkdtemp(prefix='aim-compile-time-')
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache)
  rows = []
  try:
    for run in ('first', 'second'):
      cmd = [sys.executable, '-m', 'benchmarks.compile_time', '--child'] + _passed_on(
          sys.argv[1:])
      out = subprocess.run(cmd, env=env, capture_output=True, text=True)
      found = [line[4:] for line in out.stdout.splitlines() if line.startswith('ROW ')]
      if out.returncode or not found:
        raise SystemExit(f'compile_time: the {run} run failed (exit {out.returncode}): '
                         f'{(out.stderr.strip().splitlines() or ["no output"])[-1]}')
      rows.append(dict(json.loads(found[0]), run=run))
  finally:
    if not FLAGS.cache_dir:
      shutil.rmtree(cache, ignore_errors=True)
  print('| run | mode | batch | device | lower s | compile s | loaded | stored | saved s (JAX) |')
  print('|---|---|---:|---|---:|---:|---:|---:|---:|')
  for r in rows:
    print(f'| {r["run"]} | {r["mode"]} | {r["batch"]} | {r["device_kind"]} | {r["lower_s"]} | '
          f'{r["compile_s"]} | {r["loaded"]} | {r["stored"]} | {r["saved_s"]} |')
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump(dict(rows=rows, versions=versions(), argv=sys.argv[1:],
                     date=time.strftime('%Y-%m-%d %H:%M:%S %Z')), f, indent=1)


def _define_flags():
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'config file (configs/NAME.py[:ARG])',
                                  lock_config=True)
  flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'which step to compile')
  flags.DEFINE_integer('batch', 0, "global batch (default: the config's batch_size)")
  flags.DEFINE_string('cache_dir', '', 'the cache directory of both runs (default: a fresh '
                      'temporary one, removed afterwards; a given one is kept, and a warm one '
                      'makes both runs loads)')
  flags.DEFINE_string('out', '', 'write both rows as JSON here')
  flags.DEFINE_bool('child', False, 'internal: measure in this process and print the row')
  flags.mark_flags_as_required(['config'])


def run(argv=None):
  _define_flags()
  app.run(main, argv=argv)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  run()
