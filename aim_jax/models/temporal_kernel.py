"""AIM's temporal attention (over the T frames of each token and head) as one Pallas kernel
each way: `model.temporal_attention='pallas'`.

The temporal branch attends, for every token l and head h of a clip, over its T frames: a
T x T softmax attention with head dim hd, `B * L * H` of them (B/16 8x224, batch 64: 153,600
problems of 8 x 8). That is far too small for a matrix unit; it is memory-bound work. On the
H200 (BENCHMARKS.md, "GPU", 2026-12-04) cuDNN's flash kernel spent 76 ms per train step on it
(tiles of 64 query rows, 8 used), and XLA's element-wise form (`'elementwise'`, the default
with cuDNN) 24 ms: its reduction kernels move 27.3 GB at 1.1 TB/s, and the two that reduce
over the middle axis of size T run at 0.55 TB/s. The traffic the attention needs is q, k, v
and y once forward, and q, k, v, dy, dq, dk, dv once backward: ~1.9 GB a layer at B/16,
batch 64, or ~5 ms for 12 layers at the H200's bandwidth.

Here, each program takes `block` (token, head) rows of one clip and all T frames: T tiles of
(block, hd) from each of q, k, v (the stream's own `(B, T, L, H, hd)` layout, read as rows of
hd: no transpose), the T x T logits as row sums of products, the softmax in float32 over the
T key frames, each output frame a sum of T products. Everything is unrolled over T in
Python (T is static), so every tensor is 2-D and no size needs to be a power of two but
hd's (padded and masked). The backward kernel recomputes the probabilities from q and k and
writes dq, dk and dv from one read of q, k, v and dy. Same numerics as `'elementwise'`:
products and sums in float32, the probabilities cast to the value dtype before they weigh
the values.

On a CPU the kernels run in Pallas's interpreter (slowly: for tests). Under a mesh that
shards the activations' batch axis, each device runs the kernel on its own clips
(`fused_norm.per_device`); a mesh that splits the model keeps the element-wise form.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from aim_jax.models import fused_norm

# (token, head) rows per program and warps per program. A program holds T tiles of
# (BLOCK, hd) of each operand: 8 frames x 8 rows x 64 in float32 is 16 KiB per operand.
BLOCK = 8
NUM_WARPS = 4


def _program(block: int, n_rows: int):
  nblocks = pl.cdiv(n_rows, block)
  p = pl.program_id(0)
  b, j = p // nblocks, p % nblocks
  n = j * block + jnp.arange(block)
  return b, n, n < n_rows


def _probabilities(qs, ks, scale):
  """[[p_ij]] (each (block,), float32): softmax over j of scale * <q_i, k_j>."""
  frames = len(qs)
  out = []
  for i in range(frames):
    logits = [jnp.sum(qs[i] * ks[j], axis=1) * scale for j in range(frames)]
    m = functools.reduce(jnp.maximum, logits)
    e = [jnp.exp(x - m) for x in logits]
    total = functools.reduce(lambda a, b: a + b, e)
    out.append([x / total for x in e])
  return out


def _forward_kernel(q_ref, k_ref, v_ref, y_ref, *, frames: int, n_rows: int, block: int,
                    cols: int, scale: float):
  hd = q_ref.shape[1]
  b, n, ok = _program(block, n_rows)
  c = jnp.arange(cols)
  c_ok = c < hd
  rows = lambda t: (b * frames + t) * n_rows + n
  mask = ok[:, None] & c_ok[None, :]
  load = lambda ref, t: plgpu.load(ref.at[rows(t)[:, None], c[None, :]], mask=mask,
                                   other=0.).astype(jnp.float32)
  qs = [load(q_ref, t) for t in range(frames)]
  ks = [load(k_ref, t) for t in range(frames)]
  vs = [load(v_ref, t) for t in range(frames)]
  p = _probabilities(qs, ks, scale)
  cast = lambda x: x.astype(y_ref.dtype).astype(jnp.float32)   # as the value dtype holds it
  for i in range(frames):
    y = functools.reduce(lambda a, b: a + b,
                         [cast(p[i][j])[:, None] * vs[j] for j in range(frames)])
    plgpu.store(y_ref.at[rows(i)[:, None], c[None, :]], y.astype(y_ref.dtype), mask=mask)


def _backward_kernel(q_ref, k_ref, v_ref, dy_ref, dq_ref, dk_ref, dv_ref, *, frames: int,
                     n_rows: int, block: int, cols: int, scale: float):
  hd = q_ref.shape[1]
  b, n, ok = _program(block, n_rows)
  c = jnp.arange(cols)
  c_ok = c < hd
  rows = lambda t: (b * frames + t) * n_rows + n
  mask = ok[:, None] & c_ok[None, :]
  load = lambda ref, t: plgpu.load(ref.at[rows(t)[:, None], c[None, :]], mask=mask,
                                   other=0.).astype(jnp.float32)
  store = lambda ref, t, x: plgpu.store(ref.at[rows(t)[:, None], c[None, :]],
                                        x.astype(ref.dtype), mask=mask)
  qs = [load(q_ref, t) for t in range(frames)]
  ks = [load(k_ref, t) for t in range(frames)]
  vs = [load(v_ref, t) for t in range(frames)]
  dys = [load(dy_ref, t) for t in range(frames)]
  p = _probabilities(qs, ks, scale)
  cast = lambda x: x.astype(dv_ref.dtype).astype(jnp.float32)
  add = lambda xs: functools.reduce(lambda a, b: a + b, xs)
  # y_i = sum_j cast(p_ij) v_j: dv_j = sum_i cast(p_ij) dy_i, dp_ij = <dy_i, v_j>; then the
  # softmax's backward ds_ij = p_ij (dp_ij - sum_j' p_ij' dp_ij'), and the logits' scale.
  for j in range(frames):
    store(dv_ref, j, add([cast(p[i][j])[:, None] * dys[i] for i in range(frames)]))
  ds = []
  for i in range(frames):
    dp = [jnp.sum(dys[i] * vs[j], axis=1) for j in range(frames)]
    mean = add([p[i][j] * dp[j] for j in range(frames)])
    ds.append([p[i][j] * (dp[j] - mean) * scale for j in range(frames)])
  for i in range(frames):
    store(dq_ref, i, add([ds[i][j][:, None] * ks[j] for j in range(frames)]))
  for j in range(frames):
    store(dk_ref, j, add([ds[i][j][:, None] * qs[i] for i in range(frames)]))


def _call(kernel, outs, clips: int, frames: int, n_rows: int, hd: int, name: str, tile,
          *args):
  block, num_warps = tile or (BLOCK, NUM_WARPS)
  kernel = functools.partial(kernel, frames=frames, n_rows=n_rows, block=block,
                             cols=pl.next_power_of_2(hd), scale=hd ** -0.5)
  programs = clips * pl.cdiv(n_rows, block)
  return fused_norm.run_kernel(kernel, outs, programs, name, num_warps, 1, args)


def _rows(x):
  """(B, T, L, H, hd) -> ((B*T*L*H, hd), (B, T, L*H, hd))."""
  b, t, *mid, hd = x.shape
  n = 1
  for m in mid:
    n *= m
  return x.reshape(b * t * n, hd), (b, t, n, hd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def temporal_attention(q: jax.Array, k: jax.Array, v: jax.Array, batch_axes: Any = None,
                       tile: Any = None) -> jax.Array:
  """Softmax attention along axis 1 of `(B, T, L, H, hd)` q, k, v (every other axis a batch
  axis) in one Pallas kernel each way; the output in v's dtype. `batch_axes`: the mesh axes
  that shard B, or None without a mesh. `tile`: (rows per program, warps), default
  (BLOCK, NUM_WARPS)."""
  return _fwd(q, k, v, batch_axes, tile)[0]


def _fwd(q, k, v, batch_axes, tile):
  def local(q, k, v):
    (q2, (b, t, n, hd)), (k2, _), (v2, _) = _rows(q), _rows(k), _rows(v)
    out = jax.ShapeDtypeStruct(v2.shape, v.dtype)
    y = _call(_forward_kernel, out, b, t, n, hd, 'temporal_attention_fwd', tile, q2, k2, v2)
    return (y.reshape(v.shape),)
  y, = fused_norm.per_device(local, batch_axes, 3, 0, 1)(q, k, v)
  return y, (q, k, v)


def _bwd(batch_axes, tile, res, dy):
  q, k, v = res

  def local(q, k, v, dy):
    (q2, (b, t, n, hd)), (k2, _), (v2, _), (dy2, _) = _rows(q), _rows(k), _rows(v), _rows(dy)
    outs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q2, k2, v2)]
    dq, dk, dv = _call(_backward_kernel, outs, b, t, n, hd, 'temporal_attention_bwd', tile,
                       q2, k2, v2, dy2)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
  return fused_norm.per_device(local, batch_axes, 4, 0, 3)(q, k, v, dy.astype(v.dtype))


temporal_attention.defvjp(_fwd, _bwd)
