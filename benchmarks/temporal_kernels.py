"""The temporal attention kernels of `model.temporal_attention='pallas'` against XLA's
element-wise form (the default's), on the device.

  python -m benchmarks.temporal_kernels --out temporal_kernels.json     # on a GPU (~1 min)
  python -m benchmarks.temporal_kernels --cpu-smoke --out x.json        # tiny shapes, interpreter

For one layer's temporal attention of each model, `(B, T, L, H, hd)` in bfloat16 (B/16 8x224
batch 64: 64 x 8 x 200 x 12 x 64, the stream padded for cuDNN; L/14 batch 32: 32 x 8 x 264 x
16 x 64):

* forward: `vit.attend_over_axis1_elementwise` (XLA) against the Pallas forward kernel;
* backward: the three input gradients from the output's cotangent (the step's backward pass:
  XLA's forward is recomputed inside its vjp where the compiler chooses to; the Pallas
  backward kernel recomputes the probabilities from q and k).

Each Pallas case runs for every tile ((token, head) rows per program, warps per program) in
`--tiles`. Times are medians of `--iters` calls after a compile; `gbps` is the bytes the
attention must move (forward: q, k, v in and y out; backward: q, k, v, dy in and dq, dk, dv
out) over the time, to hold against the H200's ~4.8 TB/s. On 2026-12-04 the H200 ran XLA's
form at 24 ms per B/16 train step (12 layers), 1.6 TB/s. Each Pallas result is checked against
XLA's (`max_abs_diff`, bfloat16). One JSON object goes to --out; the exit status is 0 when
every case ran and matched.
"""

from __future__ import annotations

import sys

from benchmarks import kernel_bench

SHAPES = {'b16_8x224_b64': (64, 8, 200, 12, 64), 'l14_8x224_b32': (32, 8, 264, 16, 64)}
SMOKE_SHAPES = {'tiny': (2, 4, 5, 3, 16)}
TILES = '4x2,8x4,16x4,32x8'
# bfloat16 outputs of values of order one.
TOLERANCE = {'fwd': 0.05, 'bwd': 0.25}


def run_shape(b: int, t: int, tokens: int, heads: int, hd: int, tiles: list[tuple[int, int]],
              iters: int) -> dict:
  """XLA and each Pallas tile on one layer's q, k, v; see the module docstring."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from aim_jax.models import temporal_kernel, vit

  shape = (b, t, tokens, heads, hd)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, dy = (jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16)
                 for key in keys)
  n = b * t * tokens * heads * hd * 2                     # bytes of one operand
  fwd_bytes, bwd_bytes = 4 * n, 7 * n

  def fwd_of(attend):
    return lambda q, k, v: attend(q, k, v)

  def bwd_of(attend):
    def bwd(q, k, v, dy):
      _, vjp = jax.vjp(attend, q, k, v)
      return vjp(dy)
    return bwd

  def timed(fn, args, nbytes):
    ms = kernel_bench.median_ms(jax.jit(fn), args, iters)
    return dict(ms=round(ms, 4), gbps=round(nbytes / ms / 1e6, 1))

  xla = vit.attend_over_axis1_elementwise
  out = dict(shape=list(shape), dtype='bfloat16', fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes,
             xla=dict(fwd=timed(fwd_of(xla), (q, k, v), fwd_bytes),
                      bwd=timed(bwd_of(xla), (q, k, v, dy), bwd_bytes)),
             pallas=[])
  f32 = lambda a: np.asarray(a, np.float32)
  ref_fwd = jax.jit(fwd_of(xla))(q, k, v)
  ref_bwd = jax.jit(bwd_of(xla))(q, k, v, dy)
  diff = lambda got, ref: max(float(np.max(np.abs(f32(a) - f32(b))))
                              for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
  for tile in tiles:
    row = dict(tile=list(tile))
    try:
      attend = lambda q, k, v, tile=tile: temporal_kernel.temporal_attention(q, k, v, None, tile)
      fwd, bwd = fwd_of(attend), bwd_of(attend)
      row['fwd'] = timed(fwd, (q, k, v), fwd_bytes)
      row['bwd'] = timed(bwd, (q, k, v, dy), bwd_bytes)
      row['max_abs_diff'] = dict(fwd=diff(jax.jit(fwd)(q, k, v), ref_fwd),
                                 bwd=diff(jax.jit(bwd)(q, k, v, dy), ref_bwd))
      row['ok'] = all(row['max_abs_diff'][m] <= TOLERANCE[m] for m in TOLERANCE)
    except Exception as e:  # noqa: BLE001 - a tile that fails to compile or run is a result
      row.update(ok=False, error=f'{type(e).__name__}: {str(e).splitlines()[0][:300]}')
    out['pallas'].append(row)
  good = [r for r in out['pallas'] if r.get('ok')]
  if good:
    best = min(good, key=lambda r: r['fwd']['ms'] + r['bwd']['ms'])
    out['best'] = dict(tile=best['tile'], fwd_ms=best['fwd']['ms'], bwd_ms=best['bwd']['ms'],
                       vs_xla=round((out['xla']['fwd']['ms'] + out['xla']['bwd']['ms'])
                                    / (best['fwd']['ms'] + best['bwd']['ms']), 3))
  return out


def main(argv=None) -> int:
  from aim_jax.models import temporal_kernel
  return kernel_bench.main(
      argv, description=__doc__.split('\n')[0], shapes=SHAPES, smoke_shapes=SMOKE_SHAPES,
      tiles=TILES, tile_format='ROWSxWARPS', tile_example='8x4,16x8',
      smoke_tile=lambda: (temporal_kernel.BLOCK, temporal_kernel.NUM_WARPS),
      run_shape=run_shape)


if __name__ == '__main__':
  sys.exit(main())
