"""What the Pallas kernel benchmarks share (`norm_kernels`, `mlp_kernels`): the timing and
the command line (shapes, tiles, a CPU smoke run, one JSON object, the exit status)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable, Mapping


def median_ms(fn, args, iters: int) -> float:
  """The median time of `iters` calls of `fn(*args)` after one call that compiles."""
  import jax
  jax.block_until_ready(fn(*args))           # compiles
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * sorted(times)[len(times) // 2]


def main(argv, *, description: str, shapes: Mapping[str, tuple], smoke_shapes: Mapping,
         tiles: str, tile_format: str, tile_example: str, smoke_tile: Callable[[], tuple],
         run_shape: Callable[..., dict],
         check: Callable[[], tuple[bool, str]] | None = None) -> int:
  """Parse `--out --tiles --iters --cpu-smoke`, run `run_shape(*shape, tiles, iters)` for
  each shape, print XLA's times and the best tile, write the JSON. `tile_format` names a
  tile's fields ('ROWSxWARPS'); `smoke_tile()` is the default tile for --cpu-smoke.
  `check()`: a device check whose (ok, why) goes into the JSON as `auto_check` and, when not
  ok, makes the exit status 1."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument('--out', required=True)
  p.add_argument('--tiles', default=tiles, help=f'{tile_format},... (default %(default)s)')
  p.add_argument('--iters', type=int, default=20)
  p.add_argument('--cpu-smoke', action='store_true',
                 help='tiny shapes, the default tile, Pallas\'s interpreter: checks the script')
  a = p.parse_args(argv)
  fields = len(tile_format.split('x'))
  try:
    chosen = [tuple(int(v) for v in t.split('x')) for t in a.tiles.split(',')]
    if any(len(t) != fields or min(t) < 1 for t in chosen):
      raise ValueError
  except ValueError:
    p.error(f'--tiles {a.tiles!r}: expected {tile_format},... (e.g. {tile_example})')
  if a.cpu_smoke:
    shapes, chosen, a.iters = smoke_shapes, [smoke_tile()], 2

  import jax
  result = dict(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
                jax=jax.__version__, iters=a.iters, shapes={})

  def write():
    with open(a.out, 'w') as f:
      json.dump(result, f, indent=1)

  for name, shape in shapes.items():
    r = result['shapes'][name] = run_shape(*shape, chosen, a.iters)
    xla_ms = ', '.join(f'{mode} {v["ms"]}' for mode, v in r['xla'].items())
    print(f'{name}: xla {xla_ms} ms; best Pallas {r.get("best")}', flush=True)
    write()          # after each shape: a time limit later does not cost what was measured
  # (and the timings before the check: a time limit during the check does not cost them)
  if check is not None:
    ok, why = check()
    result['auto_check'] = dict(ok=ok, why=why)
    print(f'auto_check: {result["auto_check"]}', flush=True)
    write()
  ok = all(r.get('ok') for s in result['shapes'].values() for r in s['pallas'])
  return 0 if ok and result.get('auto_check', {}).get('ok', True) else 1
