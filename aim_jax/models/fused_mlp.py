"""The fused MLP's first product with its bias and activations, as one Pallas kernel.

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

from aim_jax.models import norm

# (BM, BN, BK, GROUP, warps, pipeline stages): a common Hopper bf16 tile for Triton GEMMs.
# Not yet timed on a GPU: benchmarks/mlp_kernels.py times the kernel against XLA per tile.
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


def _kernel(x_ref, w_ref, b_ref, s_ref, *out_refs, f: int, act: Callable,
            adapter_act: Callable, bm: int, bn: int, bk: int, group: int):
  m, k = x_ref.shape
  n = w_ref.shape[1]
  # Program -> (row block, column block), GROUP row blocks at a time.
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
  dtype = out_refs[0].dtype
  y = acc.astype(dtype)
  bias = plgpu.load(b_ref.at[c], mask=c_ok, other=0.)
  z = (y.astype(jnp.float32) + bias.astype(jnp.float32)[None, :]).astype(dtype)
  z = z.astype(jnp.float32)
  s = plgpu.load(s_ref.at[r], mask=r_ok, other=0.)
  hidden = jnp.where(c[None, :] < f, act(z), adapter_act(z) * s[:, None])
  mask = r_ok[:, None] & c_ok[None, :]
  plgpu.store(out_refs[0].at[r[:, None], c[None, :]], hidden.astype(dtype), mask=mask)
  if len(out_refs) > 1:
    plgpu.store(out_refs[1].at[r[:, None], c[None, :]], y, mask=mask)


def first_layer(x2: jax.Array, w: jax.Array, b: jax.Array, s_rows: jax.Array, f: int,
                act: Callable, adapter_act: Callable, keep_product: bool,
                tile: Tile = None) -> tuple[jax.Array, ...]:
  """`(hidden,)`, or `(hidden, y)` with `keep_product`, of rows `x2` (M, K) against `w`
  (K, N) with bias `b` (N,): columns below `f` through `act`, the others through
  `adapter_act` times the row's `s_rows` (M,) float32. Arrays in the compute dtype."""
  m, k = x2.shape
  n = w.shape[1]
  bm, bn, bk, group, warps, stages = tile or TILE
  bk = min(bk, k)
  if k % bk:
    raise ValueError(f'fused MLP: the input width {k} is not a multiple of the tile\'s {bk}')
  out = [jax.ShapeDtypeStruct((m, n), x2.dtype)] * (2 if keep_product else 1)
  kernel = functools.partial(_kernel, f=f, act=_in_kernel(act),
                             adapter_act=_in_kernel(adapter_act), bm=bm, bn=bn,
                             bk=bk, group=group)
  run = functools.partial(
      pl.pallas_call, kernel, out_shape=out, grid=(pl.cdiv(m, bm) * pl.cdiv(n, bn),),
      name='mlp_matmul_act',
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages))
  args = (x2, w, b, s_rows.astype(jnp.float32))
  # The kernel for the platform the program is lowered for; the interpreter on a CPU.
  return tuple(jax.lax.platform_dependent(*args, cpu=run(interpret=True), default=run()))
