"""The LayerNorm kernels of `model.norm_impl='pallas'` against XLA's norm, on the device.

  python -m benchmarks.norm_kernels --out norm_kernels.json        # on a GPU (~1 min)
  python -m benchmarks.norm_kernels --cpu-smoke --out x.json       # tiny shapes, interpreter

For the residual stream of each model (B/16 8x224 batch 64: 64*8*200 rows of 768, the stream
padded for cuDNN; L/14 batch 32: 32*8*264 rows of 1024), in bfloat16:

* forward: XLA's `norm.layer_norm` (its output: XLA's backward pass recomputes the row
  statistics) against the Pallas forward kernel (the output and the float32 row statistics
  its backward kernel reads);
* backward: what the block's backward pass computes around `ln_1` with the split q/k/v
  projection: the input's gradient from the three products' cotangents and the stream's.
  XLA sums the three, then runs its norm backward and the add; the Pallas kernel reads the
  five arrays once.

Each Pallas case runs for every tile (rows per program, warps per program) in `--tiles`.
Times are medians of `--iters` calls after a compile; `gbps` is the bytes the kernel must move
(each input read once, each output written once) over the time, the figure to hold against
the H200's ~4.8 TB/s and the rate `benchmarks.hlo_kernels` predicts them at (reductions: 3.6 TB/s).
Each Pallas result is checked against XLA's (`max_abs_diff`, bfloat16). One JSON object goes
to --out; the exit status is 0 when every case ran and matched.
"""

from __future__ import annotations

import sys

from benchmarks import kernel_bench

SHAPES = {'b16_8x224_b64': (64 * 8 * 200, 768), 'l14_8x224_b32': (32 * 8 * 264, 1024)}
SMOKE_SHAPES = {'tiny': (40, 96)}
TILES = '1x1,2x2,4x4,8x4,8x8,16x8'
# bfloat16 outputs of values of order one (the gradient sums five terms).
TOLERANCE = {'fwd': 0.05, 'bwd': 0.25}


def _cases(m: int, d: int, seed: int = 0):
  import jax
  import jax.numpy as jnp
  k = jax.random.split(jax.random.key(seed), 6)
  bf = lambda key: jax.random.normal(key, (m, d), jnp.float32).astype(jnp.bfloat16)
  x, dstream, *dys = (bf(key) for key in k[:5])
  scale = 1 + 0.1 * jax.random.normal(k[5], (d,))
  bias = jnp.zeros((d,), jnp.float32)
  return x, scale, bias, dstream, dys


def run_shape(m: int, d: int, tiles: list[tuple[int, int]], iters: int) -> dict:
  """XLA and each Pallas tile on one (rows, width) stream; see the module docstring."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from aim_jax.models import fused_norm, norm

  eps = 1e-5
  x, scale, bias, dstream, dys = _cases(m, d)
  bf = 2
  fwd_bytes = 2 * m * d * bf + 2 * m * 4                 # x in; y, mean, 1/std out
  xla_fwd_bytes = 2 * m * d * bf                          # x in; y out
  bwd_bytes = (2 + len(dys)) * m * d * bf + m * d * bf   # x, dstream, 3 dy in; dx out

  def xla_fwd(x, scale, bias):
    return norm.layer_norm(x, scale, bias, eps, jnp.bfloat16)

  def xla_bwd(x, scale, bias, dstream, *dys):
    fn = lambda x: (x,) + (norm.layer_norm(x, scale, bias, eps, jnp.bfloat16),) * len(dys)
    _, vjp = jax.vjp(fn, x)
    return vjp((dstream,) + tuple(dys))[0]

  def pallas_fwd(tile):
    return lambda x, scale, bias: fused_norm._rows_forward(x, scale, bias, eps, jnp.bfloat16,
                                                           tile)

  stats = jax.jit(lambda x: fused_norm._rows_forward(x, scale, bias, eps, jnp.bfloat16)[1:])(x)
  fwd_args, bwd_args = (x, scale, bias), (x, scale, dstream, *dys)
  xla_bwd_args = (x, scale, bias, dstream, *dys)
  f32 = lambda a: np.asarray(a, np.float32)
  ref_fwd = jax.jit(xla_fwd)(*fwd_args)
  ref_bwd = jax.jit(xla_bwd)(*xla_bwd_args)

  def timed(fn, args, nbytes):
    ms = kernel_bench.median_ms(jax.jit(fn), args, iters)
    return dict(ms=round(ms, 4), gbps=round(nbytes / ms / 1e6, 1))

  out = dict(rows=m, width=d, dtype='bfloat16', copies=len(dys),
             fwd_bytes=fwd_bytes, xla_fwd_bytes=xla_fwd_bytes, bwd_bytes=bwd_bytes,
             xla=dict(fwd=timed(xla_fwd, fwd_args, xla_fwd_bytes),
                      bwd=timed(xla_bwd, xla_bwd_args, bwd_bytes)),
             pallas=[])
  # The backward kernel alone: the row statistics of the forward kernel (default tile) handed
  # in, not recomputed in the timing.
  mu, rstd = stats
  # Checked on the programs just timed (`jax.jit` of the same function: no second compile).
  diff = lambda out, ref: float(np.max(np.abs(f32(out) - f32(ref))))
  for tile in tiles:
    row = dict(tile=list(tile))
    try:
      fwd = pallas_fwd(tile)
      bwd = lambda x, s, ds, *dys, tile=tile: fused_norm._rows_backward(
          x, list(dys), ds, s, mu, rstd, tile)
      row['fwd'] = timed(fwd, fwd_args, fwd_bytes)
      row['bwd'] = timed(bwd, bwd_args, bwd_bytes)
      row['max_abs_diff'] = dict(fwd=diff(jax.jit(fwd)(*fwd_args)[0], ref_fwd),
                                 bwd=diff(jax.jit(bwd)(*bwd_args), ref_bwd))
      row['ok'] = all(row['max_abs_diff'][k] <= TOLERANCE[k] for k in TOLERANCE)
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
  from aim_jax.models import fused_norm, kernel_choice
  # Also the device check model.norm_impl / mlp_impl 'auto' runs before it takes the Pallas
  # kernels (both sets, in a small ViT, against XLA): `auto_check` in the JSON.
  return kernel_bench.main(
      argv, description=__doc__.split('\n')[0], shapes=SHAPES, smoke_shapes=SMOKE_SHAPES,
      tiles=TILES, tile_format='ROWSxWARPS', tile_example='8x4,16x8',
      smoke_tile=lambda: (fused_norm.ROWS, fused_norm.NUM_WARPS), run_shape=run_shape,
      check=kernel_choice.compare_with_xla)


if __name__ == '__main__':
  sys.exit(main())
