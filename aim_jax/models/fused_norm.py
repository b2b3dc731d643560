"""LayerNorm as one Pallas kernel each way, with the residual stream passed through.

`model.norm_impl='pallas'` runs every LayerNorm of a ViT block that reads the residual
stream (`ln_1` twice, `ln_2`) through `residual_layer_norm`. It computes the same function
as `norm.layer_norm` (flax's LayerNorm: float32 statistics, the variance as the mean square
of x - mean, the same parameters), in one Triton kernel each way instead of XLA's several:

* forward: one kernel reads each row once and writes the normalised row and its float32
  mean and 1/std. (XLA fuses the norm into one Triton kernel of its own too; in an
  unrolled training step it also computes the statistics its backward pass uses in a
  second kernel, and a scanned one recomputes them in the backward pass.)
* backward: XLA reduces the two row sums of the output's cotangent in one kernel, then
  reads the stream, the cotangent and the residual branch's cotangent again to write the
  input's gradient; here one kernel does both from one read of each.

The second point needs the residual's cotangent inside the norm's backward pass: the
function is `x -> (x, layer_norm(x))`, the caller continuing the residual stream with the
first output, so the backward pass receives both cotangents and writes their sum
`d_stream + layer_norm_vjp(dy)` in the kernel (`x + branch(ln(x))` would otherwise add
them in an XLA kernel of its own around the custom call, which XLA cannot fuse into).

Likewise, with `copies=3` the output goes to q, k and v's products as three copies (one
array in the forward pass): their cotangents reach the backward pass apart and the kernel
sums them as it reads them, where XLA would first write their sum.

The scale and bias gradients (for a trainable norm) are XLA reductions beside the kernel;
the compiler drops them when the norm is frozen (AIM's `ln_1`, `ln_2`).

Rows are tiled `ROWS` to a program, the width padded to a power of two (Triton's tensor
sizes) and masked. On a CPU the kernels run in Pallas's interpreter (slowly: for tests).
Under a mesh whose batch axes shard the activations (the logical axis 'activation_batch'),
each device runs the kernel on its own rows (`jax.shard_map`). A mesh that also splits the
model (a 'model' axis of more than one device: tensor parallelism) keeps the XLA norm, which
XLA partitions with the rest: compiled for 8 H200s at data=4, model=2, the kernels' per-device
calls cost 105 ms a step (478 -> 584 ms) in gathers around them.
`benchmarks/norm_kernels.py` times the kernels against XLA's norm per tile.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from aim_jax.models import norm

Dtype = Any

# Rows per program and warps per program. A ViT row (768 to 1280 wide, padded to 1024 or
# 2048) in bfloat16 is 2-4 KiB: 8 rows keep 16-32 KiB of each input in flight per
# program, 12,800 programs for a B/16 8x224 batch of 64.
ROWS = 8
NUM_WARPS = 4
Tile = Optional[tuple[int, int]]
# row_sharding's answer when the mesh splits the model over devices: the norm stays XLA's.
KEEP_XLA = 'xla'


def row_sharding(shape: tuple[int, ...]) -> Any:
  """How the current mesh lays out a (B, ..., D) activation of the model, for the kernel:
  None (no mesh, or the batch replicated, or a batch the batch axes do not divide: one
  kernel call on all rows), the mesh axes of the leading dimension, or KEEP_XLA when a mesh
  axis other than the batch's has more than one device (the model is split: XLA's norm)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  ndim = len(shape)
  names = ('activation_batch',) + (None,) * (ndim - 2) + ('activation_embed',)
  spec = tuple(nn.logical_to_mesh_axes(names))
  spec += (None,) * (ndim - len(spec))
  size = lambda axes: math.prod(mesh.shape[a] for a in
                                ((axes,) if isinstance(axes, str) else axes or ()))
  batch = (spec[0],) if isinstance(spec[0], str) else tuple(spec[0] or ())
  if size(spec[-1]) > 1 or math.prod(n for a, n in mesh.shape.items() if a not in batch) > 1:
    return KEEP_XLA
  n = size(spec[0])
  return spec[0] if n > 1 and shape[0] % n == 0 else None


def _block(m: int, d: int, rows: int, cols: int):
  """This program's row and column indices (as (rows, 1) and (1, cols)) and masks."""
  r = pl.program_id(0) * rows + jnp.arange(rows)
  c = jnp.arange(cols)
  r_ok, c_ok = r < m, c < d
  return r[:, None], c[None, :], r_ok[:, None] & c_ok[None, :], r, r_ok, c, c_ok


def _forward_kernel(x_ref, scale_ref, bias_ref, y_ref, mu_ref, rstd_ref, *, eps: float,
                    rows: int, cols: int):
  m, d = x_ref.shape
  ri, ci, mask, r, r_ok, c, c_ok = _block(m, d, rows, cols)
  x = plgpu.load(x_ref.at[ri, ci], mask=mask, other=0.).astype(jnp.float32)
  # norm._stats: the mean, then the mean square of x - mean (the padding's zeros add
  # nothing to the first sum and are kept out of the second).
  mu = jnp.sum(x, axis=1) / d
  xc = jnp.where(mask, x - mu[:, None], 0.)
  var = jnp.sum(xc * xc, axis=1) / d
  rstd = jax.lax.rsqrt(var + eps)
  scale = plgpu.load(scale_ref.at[c], mask=c_ok, other=0.).astype(jnp.float32)
  bias = plgpu.load(bias_ref.at[c], mask=c_ok, other=0.).astype(jnp.float32)
  y = xc * (rstd[:, None] * scale[None, :]) + bias[None, :]
  plgpu.store(y_ref.at[ri, ci], y.astype(y_ref.dtype), mask=mask)
  plgpu.store(mu_ref.at[r], mu, mask=r_ok)
  plgpu.store(rstd_ref.at[r], rstd, mask=r_ok)


def _backward_kernel(x_ref, *refs, copies: int, rows: int, cols: int):
  dy_refs, (dstream_ref, scale_ref, mu_ref, rstd_ref, dx_ref) = refs[:copies], refs[copies:]
  m, d = x_ref.shape
  ri, ci, mask, r, r_ok, c, c_ok = _block(m, d, rows, cols)
  load = lambda ref: plgpu.load(ref.at[ri, ci], mask=mask, other=0.).astype(jnp.float32)
  x, dstream = load(x_ref), load(dstream_ref)
  dy = functools.reduce(lambda a, b: a + b, [load(ref) for ref in dy_refs])
  scale = plgpu.load(scale_ref.at[c], mask=c_ok, other=0.).astype(jnp.float32)
  mu = plgpu.load(mu_ref.at[r], mask=r_ok, other=0.)[:, None]
  rstd = plgpu.load(rstd_ref.at[r], mask=r_ok, other=0.)[:, None]
  # norm._backward: dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = dy * scale
  # (zero in the padding, so the sums are the row's).
  x_hat = (x - mu) * rstd
  g = dy * scale[None, :]
  mean_g = jnp.sum(g, axis=1, keepdims=True) / d
  mean_gx = jnp.sum(g * x_hat, axis=1, keepdims=True) / d
  dx = rstd * (g - mean_g - x_hat * mean_gx) + dstream
  plgpu.store(dx_ref.at[ri, ci], dx.astype(dx_ref.dtype), mask=mask)


def run_kernel(kernel, out_shape, programs: int, name: str, num_warps: int, num_stages: int,
               args: tuple):
  """`kernel` as a Pallas Triton call over `programs` programs, on `args`: compiled for the
  platform the program is lowered for (an ahead-of-time compile for a GPU target runs on a
  host without one), in Pallas's interpreter on a CPU. Also fused_mlp's kernels."""
  run = functools.partial(
      pl.pallas_call, kernel, out_shape=out_shape, grid=(programs,), name=name,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages))
  return jax.lax.platform_dependent(*args, cpu=run(interpret=True), default=run())


def _call(kernel, out_shape, m: int, d: int, name: str, tile: Tile, *args):
  rows, num_warps = tile or (ROWS, NUM_WARPS)
  kernel = functools.partial(kernel, rows=rows, cols=pl.next_power_of_2(d))
  return run_kernel(kernel, out_shape, pl.cdiv(m, rows), name, num_warps, 1, args)


def _rows_forward(x2, scale, bias, eps, dtype, tile=None):
  m, d = x2.shape
  f32 = jax.ShapeDtypeStruct((m,), jnp.float32)
  out = [jax.ShapeDtypeStruct((m, d), dtype), f32, f32]
  return _call(functools.partial(_forward_kernel, eps=eps), out, m, d, 'layer_norm_fwd', tile,
               x2, scale, bias)


def _rows_backward(x2, dys, dstream2, scale, mu, rstd, tile=None):
  m, d = x2.shape
  out = jax.ShapeDtypeStruct((m, d), dstream2.dtype)
  kernel = functools.partial(_backward_kernel, copies=len(dys))
  return _call(kernel, out, m, d, 'layer_norm_bwd', tile, x2, *dys, dstream2, scale, mu, rstd)


def per_device(local, batch_axes, n_rows_in: int, n_vectors: int, n_out: int):
  """`local` run on each device's rows (`jax.shard_map` over `batch_axes`, the mesh axes
  of the activations' leading dimension), or as it is without a mesh (None)."""
  if batch_axes is None:
    return local
  rows = P(batch_axes)
  return jax.shard_map(local, in_specs=(rows,) * n_rows_in + (P(),) * n_vectors,
                       out_specs=(rows,) * n_out, check_vma=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def residual_layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float,
                        dtype: Dtype, batch_axes: Any = None, copies: int = 1,
                        tile: Tile = None) -> tuple:
  """`(x, y, ..., y)`, `y = layer_norm(x)` over the last axis `copies` times, the norm in one
  Pallas kernel each way (see the module's docstring). `batch_axes`: the mesh axes that
  shard the leading dimension, or None without a mesh.

  `copies`: for consumers that each take their own copy of y (q, k and v's products): the
  backward pass receives their cotangents apart and the kernel sums them as it reads them,
  instead of XLA writing their sum first (the copies are one array in the forward pass).
  `tile`: (rows per program, warps per program), default (ROWS, NUM_WARPS).
  """
  return _fwd(x, scale, bias, eps, dtype, batch_axes, copies, tile)[0]


def _fwd(x, scale, bias, eps, dtype, batch_axes, copies, tile):
  def local(x, scale, bias):
    lead, d = x.shape[:-1], x.shape[-1]
    y, mu, rstd = _rows_forward(x.reshape(-1, d), scale, bias, eps, dtype, tile)
    return y.reshape(x.shape), mu.reshape(lead), rstd.reshape(lead)
  y, mu, rstd = per_device(local, batch_axes, 1, 2, 3)(x, scale, bias)
  return (x,) + (y,) * copies, (x, mu, rstd, scale, bias)


def _bwd(eps, dtype, batch_axes, copies, tile, res, cotangents):
  del eps, dtype
  x, mu, rstd, scale, bias = res
  dstream, *dys = cotangents

  def local(x, dstream, mu, rstd, *rest):
    *dys, scale = rest
    d = x.shape[-1]
    flat = lambda a: a.reshape(-1, d)
    dx = _rows_backward(flat(x), [flat(dy) for dy in dys], flat(dstream), scale,
                        mu.reshape(-1), rstd.reshape(-1), tile)
    return (dx.reshape(x.shape),)
  dx, = per_device(local, batch_axes, 4 + copies, 1, 1)(
      x, dstream.astype(x.dtype), mu, rstd, *dys, scale)
  # The parameters' gradients, by XLA (dropped by the compiler when the norm is frozen).
  dyf = functools.reduce(lambda a, b: a + b, [dy.astype(jnp.float32) for dy in dys])
  x_hat = (x.astype(jnp.float32) - mu[..., None]) * rstd[..., None]
  return (dx,) + norm.scale_bias_grads(x_hat, dyf, scale, bias)


residual_layer_norm.defvjp(_fwd, _bwd)
