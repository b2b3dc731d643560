"""The fused MLP's products with its activations (and their slopes) in their epilogues.

`model.mlp_impl='pallas'` computes the first half of `norm.mlp_with_adapter` (the frozen MLP
and the joint adapter beside it, one MLP of width F + F/16) in one Triton kernel:

    y = xn @ [w_fc | w_1]                       the product, written for the backward pass
    hidden = [act(y + b_fc) | s * gelu(y + b_1)]   its activations, in the product's epilogue

XLA writes `y` from its GEMM and then reads it again in an element-wise kernel for the
activations: its GEMM epilogues take only chains of single-input operations (a bias add, an
exp), and `z * sigmoid(1.702 z)` reads the product twice (BENCHMARKS.md, "What XLA's Triton
GEMMs fuse"). Here each program computes a (BM, BN) tile of the product in float32 and
applies the bias and the activations before writing, so `y` is not read back; in evaluation
(no backward pass) it is not written at all.

The backward pass's first product is a second kernel of the same kind
(`hidden_gradient`): `dz = (g @ w_out.T) * slopes(y + b)`, the slopes of both activations
(the adapter's times `s`) computed in the epilogue from the kept product, where XLA writes
the product `g @ w_out.T` and reads it back with `y` in an element-wise kernel.

The numerics are those of the XLA path: the product rounded to the compute dtype, the bias
added and rounded again (so the backward pass, which recomputes `y + b` from the written
`y`, sees the same value), each activation computed in float32 and rounded once.

Tiles are (BM, BN) of the output with a K loop of BK columns, programs in groups of GROUP
row blocks so that neighbouring programs share their weight columns in L2 (the usual Triton
ordering); rows and columns are masked at the edges. On a CPU the kernel runs in Pallas's
interpreter (for the tests). Under a mesh that shards the batch, each device runs it on its
own rows (as the fused LayerNorm, `fused_norm`); a mesh that splits the model keeps XLA.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from aim_jax.models import fused_norm, norm

# (BM, BN, BK, GROUP, warps, pipeline stages): a common Hopper bf16 tile for Triton GEMMs.
# On the H200 (2026-12-04) the products ran at half cuBLAS's speed with this tile (no
# mlp_kernels part had time in that run): benchmarks/mlp_kernels.py times the tiles.
TILE = (128, 128, 64, 8, 8, 3)
Tile = Optional[tuple[int, int, int, int, int, int]]


def _erf(x: jax.Array) -> jax.Array:
  """erf in float32 for the kernel (Pallas's Triton lowering has no erf): Abramowitz and
  Stegun 7.1.26 (|error| <= 1.5e-7; within 5e-7 of XLA's float32 erf, tested), far below
  the bfloat16 rounding of the result."""
  t = 1.0 / (1.0 + 0.3275911 * jnp.abs(x))
  poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                        + t * 1.061405429))))
  return jnp.sign(x) * (1.0 - poly * jnp.exp(-x * x))


def _gelu_exact(x: jax.Array) -> jax.Array:
  """norm.gelu_exact's formula (PyTorch's erf GELU) with the kernel's erf."""
  return x * 0.5 * (1.0 + _erf(x * 0.7071067811865476))


def _in_kernel(fn: Callable) -> Callable:
  """The form of an activation the kernel computes: the exact GELU with its own erf."""
  return _gelu_exact if fn is norm.gelu_exact else fn


def _tile_product(x_ref, w_ref, bm: int, bn: int, bk: int, group: int):
  """This program's (BM, BN) tile of `x @ w` in float32, with its row and column indices
  and masks; programs go through the row blocks GROUP at a time."""
  m, k = x_ref.shape
  n = w_ref.shape[1]
  pid = pl.program_id(0)
  n_m, n_n = pl.cdiv(m, bm), pl.cdiv(n, bn)
  per_group = group * n_n
  first = (pid // per_group) * group
  size = jnp.minimum(n_m - first, group)
  pid_m = first + (pid % per_group) % size
  pid_n = (pid % per_group) // size
  r = pid_m * bm + jnp.arange(bm)
  c = pid_n * bn + jnp.arange(bn)
  r_ok, c_ok = r < m, c < n

  def step(i, acc):
    kk = i * bk + jnp.arange(bk)
    a = plgpu.load(x_ref.at[r[:, None], kk[None, :]], mask=r_ok[:, None], other=0.)
    w = plgpu.load(w_ref.at[kk[:, None], c[None, :]], mask=c_ok[None, :], other=0.)
    return acc + jnp.dot(a, w, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, k // bk, step, jnp.zeros((bm, bn), jnp.float32))
  return acc, r, c, r_ok, c_ok


def _biased(y, b_ref, c, c_ok, dtype):
  """`y + b` as XLA computes it in `dtype` (rounded), in float32."""
  bias = plgpu.load(b_ref.at[c], mask=c_ok, other=0.)
  return (y.astype(jnp.float32) + bias.astype(jnp.float32)[None, :]).astype(dtype).astype(
      jnp.float32)


def _kernel(x_ref, w_ref, b_ref, s_ref, *out_refs, f: int, act: Callable,
            adapter_act: Callable, bm: int, bn: int, bk: int, group: int):
  acc, r, c, r_ok, c_ok = _tile_product(x_ref, w_ref, bm, bn, bk, group)
  dtype = out_refs[0].dtype
  y = acc.astype(dtype)
  z = _biased(y, b_ref, c, c_ok, dtype)
  s = plgpu.load(s_ref.at[r], mask=r_ok, other=0.)
  hidden = jnp.where(c[None, :] < f, act(z), adapter_act(z) * s[:, None])
  mask = r_ok[:, None] & c_ok[None, :]
  plgpu.store(out_refs[0].at[r[:, None], c[None, :]], hidden.astype(dtype), mask=mask)
  if len(out_refs) > 1:
    plgpu.store(out_refs[1].at[r[:, None], c[None, :]], y, mask=mask)


def _slope_kernel(g_ref, w_ref, b_ref, s_ref, y_ref, dz_ref, *, f: int, act: Callable,
                  adapter_act: Callable, bm: int, bn: int, bk: int, group: int):
  acc, r, c, r_ok, c_ok = _tile_product(g_ref, w_ref, bm, bn, bk, group)
  dtype = dz_ref.dtype
  d_hidden = acc.astype(dtype).astype(jnp.float32)       # the product as XLA writes it
  mask = r_ok[:, None] & c_ok[None, :]
  y = plgpu.load(y_ref.at[r[:, None], c[None, :]], mask=mask, other=0.)
  z = _biased(y, b_ref, c, c_ok, dtype)
  s = plgpu.load(s_ref.at[r], mask=r_ok, other=0.)
  slope = jnp.where(c[None, :] < f, norm._slope(act, z)[1],
                    norm._slope(adapter_act, z)[1] * s[:, None])
  plgpu.store(dz_ref.at[r[:, None], c[None, :]], (d_hidden * slope).astype(dtype), mask=mask)


def _run(kernel, name, out, m, n, k, tile, args, **kw):
  bm, bn, bk, group, warps, stages = tile or TILE
  bk = min(bk, k)
  if k % bk:
    raise ValueError(f'fused MLP: the input width {k} is not a multiple of the tile\'s {bk}')
  return fused_norm.run_kernel(functools.partial(kernel, bm=bm, bn=bn, bk=bk, group=group, **kw),
                               out, pl.cdiv(m, bm) * pl.cdiv(n, bn), name, warps, stages, args)


def hidden_gradient(g2: jax.Array, w_t: jax.Array, b: jax.Array, s_rows: jax.Array,
                    y2: jax.Array, f: int, act: Callable, adapter_act: Callable,
                    tile: Tile = None) -> jax.Array:
  """The backward pass's `dz = (g2 @ w_t) * [act'(y2 + b) | s * adapter_act'(y2 + b)]`: the
  hidden's gradient from the output's cotangent `g2` (M, D) and the second layer's weights
  transposed `w_t` (D, N), times the activations' slopes at the kept product `y2` (M, N), in
  the product's epilogue (XLA writes the product and reads it back in an element-wise
  kernel with `y2`)."""
  m, k = g2.shape
  n = w_t.shape[1]
  out = jax.ShapeDtypeStruct((m, n), y2.dtype)
  return _run(_slope_kernel, 'mlp_matmul_slope', out, m, n, k, tile,
              (g2, w_t, b, s_rows.astype(jnp.float32), y2), f=f, act=_in_kernel(act),
              adapter_act=_in_kernel(adapter_act))


def first_layer(x2: jax.Array, w: jax.Array, b: jax.Array, s_rows: jax.Array, f: int,
                act: Callable, adapter_act: Callable, keep_product: bool,
                tile: Tile = None) -> tuple[jax.Array, ...]:
  """`(hidden,)`, or `(hidden, y)` with `keep_product`, of rows `x2` (M, K) against `w`
  (K, N) with bias `b` (N,): columns below `f` through `act`, the others through
  `adapter_act` times the row's `s_rows` (M,) float32. Arrays in the compute dtype."""
  m, k = x2.shape
  n = w.shape[1]
  out = [jax.ShapeDtypeStruct((m, n), x2.dtype)] * (2 if keep_product else 1)
  return tuple(_run(_kernel, 'mlp_matmul_act', out, m, n, k, tile,
                    (x2, w, b, s_rows.astype(jnp.float32)), f=f, act=_in_kernel(act),
                    adapter_act=_in_kernel(adapter_act)))
