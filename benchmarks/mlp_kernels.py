"""The fused MLP's kernels of `model.mlp_impl='pallas'` against XLA's, on the device.

  python -m benchmarks.mlp_kernels --out mlp_kernels.json        # on a GPU (~1 min)
  python -m benchmarks.mlp_kernels --cpu-smoke --out x.json       # tiny shapes, interpreter

For each model's MLP with the joint adapter beside it (B/16 8x224 batch 64: 64*8*200 rows of
768 into 3072 + 192 columns; L/14 batch 32: 32*8*264 rows of 1024 into 4096 + 256), in
bfloat16, what `norm.mlp_with_adapter` computes first, the product `xn @ [w_fc | w_1]`, its
bias, QuickGELU on the MLP's columns and the exact GELU times the drop-path scale on the
adapter's. Three modes:

* `train`: the product is also written (the backward pass keeps it);
* `eval`: only the activations are written;
* `bwd`: what its backward pass computes first, the hidden's gradient: the output's
  cotangent times the second layer's weights transposed, times both activations' slopes at
  the kept product.

XLA runs its GEMM and an element-wise kernel; the Pallas kernels (fused_mlp.first_layer,
fused_mlp.hidden_gradient) run once per tile in `--tiles` (BMxBNxBKxGROUPxWARPSxSTAGES).
Times are medians of `--iters` calls after a compile; `tflops` is the product's 2*M*K*N
over the time, to hold against the rate `benchmarks.hlo_kernels` predicts GEMMs at
(770 TFLOP/s). Each Pallas result is checked against XLA's (`max_abs_diff`, bfloat16).
One JSON object goes to --out; the exit status is 0 when every case ran and matched.
"""

from __future__ import annotations

import sys

from benchmarks import kernel_bench

# (rows, input width, MLP width, adapter width)
SHAPES = {'b16_8x224_b64': (64 * 8 * 200, 768, 3072, 192),
          'l14_8x224_b32': (32 * 8 * 264, 1024, 4096, 256)}
SMOKE_SHAPES = {'tiny': (40, 32, 64, 8)}
TILES = '128x128x64x8x8x3,128x256x64x8x8x3,256x128x64x8x8x3,128x128x64x8x4x4,64x128x64x8x4x3'
# bfloat16 activations and gradients of order one: a few roundings apart.
TOLERANCE = 0.1


def run_shape(m: int, k: int, f: int, a: int, tiles: list[tuple[int, ...]],
              iters: int) -> dict:
  """XLA and each Pallas tile on one shape, both modes; see the module docstring."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from aim_jax.models import fused_mlp, norm, vit

  keys = jax.random.split(jax.random.key(0), 4)
  bf = jnp.bfloat16
  x = jax.random.normal(keys[0], (m, k)).astype(bf)
  w = (jax.random.normal(keys[1], (k, f + a)) / np.sqrt(k)).astype(bf)
  b = (0.1 * jax.random.normal(keys[2], (f + a,))).astype(bf)
  s = jax.random.uniform(keys[3], (m,))
  acts = (vit.quick_gelu, norm.gelu_exact)
  flop = 2.0 * m * k * (f + a)
  f32 = lambda v: np.asarray(v, np.float32)

  g = jax.random.normal(keys[0], (m, k)).astype(bf)        # the output's cotangent
  w_out = (jax.random.normal(keys[1], (f + a, k)) / np.sqrt(f + a)).astype(bf)
  y = jax.random.normal(keys[2], (m, f + a)).astype(bf)     # the kept product
  # mode: (XLA's program, the kernel's for a tile, arguments)
  modes = {
      mode: (lambda x, w, b, s, keep=keep: norm._first_layer(*acts, 'xla', keep, x, w, b,
                                                             s[:, None], f),
             lambda tile, keep=keep: lambda x, w, b, s: fused_mlp.first_layer(
                 x, w, b, s, f, *acts, keep, tile),
             (x, w, b, s))
      for mode, keep in (('train', True), ('eval', False))}
  modes['bwd'] = (
      lambda g, w_out, b, s, y: norm._hidden_gradient(*acts, 'xla', g, w_out, b, y, s[:, None],
                                                      f)[:1],
      lambda tile: lambda g, w_out, b, s, y: (fused_mlp.hidden_gradient(
          g, w_out.T, b, s, y, f, *acts, tile),),
      (g, w_out, b, s, y))

  def timed(fn, args):
    ms = kernel_bench.median_ms(fn, args, iters)
    return dict(ms=round(ms, 4), tflops=round(flop / ms / 1e9, 1))

  out = dict(rows=m, width=k, mlp=f, adapter=a, dtype='bfloat16', gflop=round(flop / 1e9, 1),
             xla={}, pallas=[])
  refs = {}
  for mode, (xla_fn, _, args) in modes.items():
    fn = jax.jit(xla_fn)
    out['xla'][mode] = timed(fn, args)
    refs[mode] = fn(*args)
  for tile in tiles:
    row = dict(tile=list(tile), max_abs_diff={})
    try:
      for mode, (_, make, args) in modes.items():
        fn = jax.jit(make(tile))
        row[mode] = timed(fn, args)
        got = fn(*args)              # the program just timed: no second compile
        row['max_abs_diff'][mode] = max(float(np.max(np.abs(f32(v) - f32(r))))
                                        for v, r in zip(got, refs[mode]))
      row['ok'] = all(v <= TOLERANCE for v in row['max_abs_diff'].values())
    except Exception as e:  # noqa: BLE001 - a tile that fails to compile or run is a result
      row.update(ok=False, error=f'{type(e).__name__}: {str(e).splitlines()[0][:300]}')
    out['pallas'].append(row)
  good = [r for r in out['pallas'] if r.get('ok')]
  if good:
    best = min(good, key=lambda r: sum(r[mode]['ms'] for mode in modes))
    out['best'] = dict(tile=best['tile'], **{f'{mode}_ms': best[mode]['ms'] for mode in modes},
                       vs_xla={mode: round(out['xla'][mode]['ms'] / best[mode]['ms'], 3)
                               for mode in modes})
  return out


def main(argv=None) -> int:
  from aim_jax.models import fused_mlp
  return kernel_bench.main(
      argv, description=__doc__.split('\n')[0], shapes=SHAPES, smoke_shapes=SMOKE_SHAPES,
      tiles=TILES, tile_format='BMxBNxBKxGROUPxWARPSxSTAGES', tile_example='128x128x64x8x8x3',
      smoke_tile=lambda: fused_mlp.TILE, run_shape=run_shape)


if __name__ == '__main__':
  sys.exit(main())
