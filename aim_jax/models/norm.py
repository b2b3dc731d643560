"""LayerNorm and activations whose backward pass keeps little, and the other element-wise
savings of the training step (an exact GELU XLA computes cheaply, biases folded into the
next product).

Under `jax.grad` a LayerNorm written with plain jnp ops leaves float32 copies of its
input behind for the backward pass: x**2, x - mean and the scaled x_hat, three
activation-sized float32 tensors per norm (6x a bfloat16 activation). An
unrolled program lets XLA fuse most of them away, but a scanned one (`scan_layers`)
stacks every one of them for every layer: that is what made the L/14 scanned step
need 173 GiB at batch 32. The same goes, in bfloat16, for the intermediates of
an activation (the logistic and product of QuickGELU, the erfc and exp of the exact
GELU).

`LayerNorm` here computes the same forward values as `flax.linen.LayerNorm`
(`use_fast_variance=False`, float32 statistics: the same operations in the same
order) and has the same parameters (`scale`, `bias`), but its backward pass keeps
only the input (in its own dtype) and recomputes the row statistics and the normalised
input from it: in a scanned model (`scan_layers`) the statistics the forward pass would
otherwise stack for the backward one keep XLA from fusing the forward norm into one
kernel (BENCHMARKS.md, "LayerNorm statistics in the form XLA fuses"); unrolled, XLA
computes them once either way. `recompute_activation` makes an
activation keep only its input. Gradients are the analytic ones; they equal
automatic differentiation of the flax layer to float32 rounding.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _stats(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """(mean, 1/sqrt(var + eps)) over the last axis, in float32.

  The variance is the mean square of x - mean (flax's `use_fast_variance=False`, and the
  variance torch's LayerNorm computes), not E[x^2] - E[x]^2: it loses no digits to
  cancellation when a row's mean is large against its spread, and on GPUs XLA fuses
  the whole norm (both means, the normalisation) into one Triton kernel, where the
  fast form's two sums of one pass leave it a reduction kernel and a normalising one
  (BENCHMARKS.md, "LayerNorm statistics in the form XLA fuses").
  """
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mu = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jax.lax.square(xf - mu), axis=-1, keepdims=True)
  return mu, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float,
               dtype: Dtype) -> jax.Array:
  """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * scale + bias, in `dtype`.

  Statistics and arithmetic in (at least) float32, as flax.linen.LayerNorm.
  """
  return _forward(x, scale, bias, eps, dtype)[0]


def _forward(x, scale, bias, eps, dtype):
  mu, rstd = _stats(x, eps)
  y = x - mu
  y = y * (rstd * scale.astype(mu.dtype))
  y = y + bias.astype(mu.dtype)
  return y.astype(dtype), (x, scale, bias)


def _backward(eps, dtype, res, dy):
  del dtype
  x, scale, bias = res
  mu, rstd = _stats(x, eps)
  acc = mu.dtype
  x_hat = (x.astype(acc) - mu) * rstd
  dyf = dy.astype(acc)
  g = dyf * scale.astype(acc)
  n = x.shape[-1]
  mean_g = jnp.sum(g, axis=-1, keepdims=True) / n
  mean_gx = jnp.sum(g * x_hat, axis=-1, keepdims=True) / n
  dx = rstd * (g - mean_g - x_hat * mean_gx)
  return (dx.astype(x.dtype),) + scale_bias_grads(x_hat, dyf, scale, bias)


def scale_bias_grads(x_hat: jax.Array, dy: jax.Array, scale: jax.Array,
                     bias: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A LayerNorm's scale and bias gradients from its normalised input and the output's
  cotangent (float32), summed over every axis but the last, in the parameters' dtypes."""
  axes = tuple(range(x_hat.ndim - 1))
  return (jnp.sum(dy * x_hat, axis=axes).astype(scale.dtype),
          jnp.sum(dy, axis=axes).astype(bias.dtype))


layer_norm.defvjp(_forward, _backward)


# model.norm_impl: how the LayerNorms that read a ViT block's residual stream run.
#   'xla': `layer_norm` below, fused by XLA; 'pallas': one Pallas Triton kernel each way
#   (fused_norm.py; interpreted, slowly, on a CPU).
NORM_IMPLS = ('xla', 'pallas')


def check_norm_impl(impl: str | None) -> str:
  impl = impl or 'xla'
  if impl not in NORM_IMPLS:
    raise ValueError(f"model.norm_impl must be one of {list(NORM_IMPLS) + ['auto']}, "
                     f'got {impl!r}')
  return impl


class LayerNorm(nn.Module):
  """`flax.linen.LayerNorm` over the last axis (same parameters, same forward values)
  whose backward pass keeps only the input (it recomputes the row statistics). Its
  parameters are laid out along the model's 'embed' axis (logical partitioning).

  `norm(x, stream=True)` returns `(x, norm(x))` for a caller that continues the residual
  stream `x` with the first output: with `impl='pallas'` the norm runs as one Pallas kernel
  each way and its backward kernel also adds the stream's cotangent
  (`fused_norm.residual_layer_norm`); with 'xla' it is `(x, norm(x))` as written.
  `copies=n` returns `(x, y, ..., y)` with n copies of the output for n consumers (q, k
  and v's products), whose cotangents the backward kernel then sums itself.
  """
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scale_init: Callable = nn.with_logical_partitioning(nn.initializers.ones, ('embed',))
  bias_init: Callable = nn.with_logical_partitioning(nn.initializers.zeros, ('embed',))
  impl: str = 'xla'               # model.norm_impl: 'xla' | 'pallas' (NORM_IMPLS)

  @nn.compact
  def __call__(self, x: jax.Array, stream: bool = False, copies: int = 1):
    d = x.shape[-1]
    scale = self.param('scale', self.scale_init, (d,), self.param_dtype)
    bias = self.param('bias', self.bias_init, (d,), self.param_dtype)
    dtype = self.dtype or jnp.promote_types(x.dtype, self.param_dtype)
    if not stream:
      return layer_norm(x, scale, bias, self.epsilon, dtype)
    if check_norm_impl(self.impl) == 'pallas':
      from aim_jax.models import fused_norm   # imports Pallas: only when asked for
      rows = fused_norm.row_sharding(x.shape)
      if rows != fused_norm.KEEP_XLA:
        return fused_norm.residual_layer_norm(x, scale, bias, self.epsilon, dtype, rows,
                                              copies)
    return (x,) + (layer_norm(x, scale, bias, self.epsilon, dtype),) * copies


def gelu_exact(x: jax.Array) -> jax.Array:
  """The exact (erf) GELU in PyTorch's form, `x * 0.5 * (1 + erf(x / sqrt(2)))`, in float32
  for half-precision inputs (as PyTorch computes it), cast back.

  `jax.nn.gelu(approximate=False)` writes the same function with `erfc`, which XLA expands
  into two branches of polynomials: 131 operations per element against 26 here (compiled
  on a CPU), 4.4x slower on a CPU, and on an H200 the adapters' GELU kernels measured at
  2.4x their memory time. The values are PyTorch's (`torch.nn.functional.gelu`) to 1.5e-6
  absolute in float32 (tested).
  """
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return (xf * 0.5 * (1.0 + jax.lax.erf(xf * 0.7071067811865476))).astype(x.dtype)


def folded_bias(spec: str, offset: jax.Array, kernel: jax.Array,
                bias: jax.Array | None) -> jax.Array:
  """The bias of a product whose input lacks a constant `offset`: `einsum(x + offset, kernel)
  + bias` is `einsum(x, kernel) + folded_bias(...)`, computed once on the weights (float32)."""
  folded = jnp.einsum(spec, offset.astype(jnp.float32), kernel.astype(jnp.float32))
  return folded if bias is None else bias.astype(jnp.float32) + folded


def recompute_activation(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """`fn` whose backward pass keeps only its inputs (its intermediates are recomputed)."""
  return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)


class DenseActivation(nn.Dense):
  """`activation(nn.Dense(x))`: the same parameters and values, with the bias add and
  the activation recomputed in the backward pass from the matrix product's output.

  What the backward pass keeps is the product's output (which the compiler writes
  anyway, the bias and activation being a separate element-wise kernel), not the
  biased pre-activation or any intermediate of the activation. Recomputing from the
  biased pre-activation instead would make the forward kernel write one more
  activation-sized tensor (~1.8 ms per B/16 train step on an H200, by `gpu_aot`).
  `input_offset` (a bias the caller left out of the input) is folded into the bias, and
  `input_kernel` (a projection the caller left out) into the kernel.
  """
  activation: Callable[[jax.Array], jax.Array] = gelu_exact
  # False: plain `activation(dense(x))`, the compiler choosing what to keep (see Mlp).
  recompute: bool = True

  @nn.compact
  def __call__(self, inputs: jax.Array, input_offset: jax.Array | None = None,
               input_kernel: jax.Array | None = None) -> jax.Array:
    # input_offset: a constant vector c the input should have had added (a bias the caller
    # left out): dense(x + c) is computed as x @ kernel + (bias + c @ kernel).
    # input_kernel: a (F, D) matrix P the input should have gone through (a projection the
    # caller left out): dense(x @ P) is computed as x @ (P @ kernel), the (F, features)
    # product formed once on the weights in float32, so x @ P is never needed here.
    width = jnp.shape(inputs)[-1] if input_kernel is None else input_kernel.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (width, self.features), self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    if input_offset is not None:
      bias = folded_bias('d,df->f', input_offset, kernel, bias)
    if input_kernel is not None:
      kernel = jnp.einsum('fd,dk->fk', input_kernel.astype(jnp.float32),
                          kernel.astype(jnp.float32))
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                            precision=self.precision)
    act = self.activation if bias is None else (
        lambda y, b: self.activation(y + jnp.reshape(b, (1,) * (y.ndim - 1) + (-1,))))
    args = (y,) if bias is None else (y, bias)
    return recompute_activation(act)(*args) if self.recompute else act(*args)


class DenseWeights(nn.Module):
  """The parameters an `nn.Dense` of these fields would declare (same names, shapes,
  initialisers and random streams), returned instead of applied: for a module that
  computes with several layers' weights in one function (`mlp_with_adapter`)."""
  features: int
  use_bias: bool = True
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
    kernel = self.param('kernel', self.kernel_init, (in_features, self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    return kernel, bias


class ScaledDense(nn.Dense):
  """`scale * nn.Dense(x)` for a factor that varies at most along the rows (a scalar, or
  drop path's draw per token, clip or frame divided by the keep probability): the same
  parameters and function, computed as `(x * scale) @ kernel + scale * bias`.

  The factor multiplies the narrow input (an adapter's hidden, D/4 wide) and not the
  output, so the backward pass hands the output's cotangent to both products as it is:
  no kernel multiplies the D-wide cotangent by the mask, and the mask multiplies the
  narrow gradient inside the activation's backward kernel instead (T_Adapter: -0.6 ms of
  a B/16 train step on an H200, by `gpu_aot`).
  """

  @nn.compact
  def __call__(self, inputs: jax.Array, scale: jax.Array | float | None = None,
               addend: jax.Array | None = None) -> jax.Array:
    # addend: an array of the output's shape to add (the residual stream): `addend +
    # scale * dense(x)`, summed in the form XLA hands to a cuBLAS product as its addend
    # (`per_row_sum`).
    kernel = self.param('kernel', self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    if scale is not None:
      scale = jnp.asarray(scale, inputs.dtype)
      inputs = inputs * scale
    y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                            precision=self.precision)
    if bias is not None:
      bias = jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
      bias = bias if scale is None else scale * bias
    return per_row_sum(addend, y, bias)


def per_row_sum(addend: jax.Array | None, y: jax.Array, bias: jax.Array | None) -> jax.Array:
  """`addend + y + bias` for a product `y`, a bias that is a vector or varies along the
  rows too (drop path's draw times a vector), and an addend of y's shape or None, in the
  order that lets XLA fold the sums into a cuBLAS product: a vector bias goes into its
  epilogue (`y + bias` first) and the addend is its matrix addend; a per-row bias is added
  to the addend first (one kernel that reads it) rather than broadcast to y's shape on its
  own. The same value up to the order of the sums."""
  if bias is None:
    return y if addend is None else addend + y
  if addend is None:
    return y + bias
  if math.prod(bias.shape[:-1]) == 1:
    return addend + (y + bias)
  return (addend + bias) + y


def _slope(fn: Callable[[jax.Array], jax.Array], z: jax.Array):
  """(fn(z), fn'(z)) of an element-wise function."""
  return jax.jvp(fn, (z,), (jnp.ones_like(z),))


def _side_by_side(u: jax.Array, v: jax.Array) -> jax.Array:
  """[u | v] along the last axis, written as the sum of the two zero-padded parts: XLA
  makes it one element-wise kernel with its producers (as a concatenation it emits a
  concatenation kernel, which a profile files under copies)."""
  pad = lambda a, lo, hi: jax.lax.pad(a, jnp.zeros((), a.dtype),
                                      [(0, 0, 0)] * (a.ndim - 1) + [(lo, hi, 0)])
  return pad(u, 0, v.shape[-1]) + pad(v, u.shape[-1], 0)


# model.mlp_impl: how the fused MLP's first product and its activations run.
MLP_IMPLS = ('xla', 'pallas')


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def mlp_with_adapter(act: Callable, adapter_act: Callable, impl: str, x: jax.Array,
                     xn: jax.Array, w_fc: jax.Array, b_fc: jax.Array, w_proj: jax.Array,
                     b_proj: jax.Array, w_1: jax.Array, b_1: jax.Array, w_2: jax.Array,
                     b_2: jax.Array, scale: jax.Array) -> jax.Array:
  """`x + mlp(xn) + scale * adapter(xn)`: the frozen MLP (`act(xn @ w_fc + b_fc) @ w_proj +
  b_proj`) and the joint adapter beside it (`adapter_act(xn @ w_1 + b_1) @ w_2 + b_2`, no
  skip), computed as one MLP of width F + F/16: one product `xn @ [w_fc | w_1]`, one
  element-wise kernel for both activations (the adapter's columns times `scale`, the joint
  scale and drop path's per-row draw), one product `[h | a] @ [w_proj ; w_2]` whose output
  goes straight into the residual add. Same function.

  `impl` (model.mlp_impl): 'xla', or 'pallas' for the first product and both activations
  as one kernel (fused_mlp.first_layer: the activations in the product's epilogue).

  The backward pass is written out: one product for the hidden's gradient, one kernel for
  both activations' slopes, one product for `xn`'s gradient, and the weight gradients,
  which XLA drops where they are not wanted (the frozen MLP's). It keeps `xn` and the first
  product's output, as the separate modules did. `scale` gets no gradient (a scalar or a
  drop-path draw). Arrays are in the compute dtype; weights as `(in, out)`.
  """
  return _mwa(act, adapter_act, impl, False, x, xn, w_fc, b_fc, w_proj, b_proj, w_1, b_1,
              w_2, b_2, scale)[0]


def _kernel_rows(impl: str, shape: tuple[int, ...], scale):
  """For the Pallas MLP kernels: None when XLA runs (impl 'xla', or a mesh that splits the
  model), else (the mesh axes that shard the rows, or None; the scale per row, float32)."""
  if impl != 'pallas':
    return None
  from aim_jax.models import fused_norm
  batch_axes = fused_norm.row_sharding(shape)
  if batch_axes == fused_norm.KEEP_XLA:
    return None
  lead = shape[:-1]
  return batch_axes, jnp.broadcast_to(jnp.asarray(scale, jnp.float32), lead + (1,))[..., 0]


def _first_layer(act, adapter_act, impl, keep, xn, w, b, s, f):
  """(hidden, y if keep): the first product `y = xn @ w` and `[act(y + b) | s * adapter_act(y
  + b)]` (columns from `f` on), by XLA or by the Pallas kernel (per device under a mesh that
  shards the batch; XLA when the mesh splits the model)."""
  rows = _kernel_rows(impl, xn.shape, s)
  if rows is not None:
    from aim_jax.models import fused_mlp, fused_norm
    (batch_axes, s_rows), (d, n) = rows, w.shape

    def local(xn, s_rows, w, b):
      outs = fused_mlp.first_layer(xn.reshape(-1, d), w, b, s_rows.reshape(-1), f, act,
                                   adapter_act, keep)
      return tuple(o.reshape(xn.shape[:-1] + (n,)) for o in outs)
    return fused_norm.per_device(local, batch_axes, 2, 2, 1 + keep)(xn, s_rows, w, b)
  y = jax.lax.dot_general(xn, w, (((xn.ndim - 1,), (0,)), ((), ())))
  z = y + b
  s = jnp.asarray(s, z.dtype)
  hidden = _side_by_side(act(z[..., :f]), adapter_act(z[..., f:]) * s)
  return (hidden, y) if keep else (hidden,)


def _mwa(act, adapter_act, impl, keep, x, xn, w_fc, b_fc, w_proj, b_proj, w_1, b_1, w_2, b_2,
         scale):
  f = w_fc.shape[1]
  s = jnp.asarray(scale, xn.dtype)
  hidden, *y = _first_layer(act, adapter_act, impl, keep, xn, jnp.concatenate([w_fc, w_1], 1),
                            jnp.concatenate([b_fc, b_1]), scale, f)
  out = jax.lax.dot_general(hidden, jnp.concatenate([w_proj, w_2], 0),
                            (((hidden.ndim - 1,), (0,)), ((), ())))
  out = per_row_sum(x, out.astype(x.dtype), (b_proj + s * b_2).astype(x.dtype))
  return out, ((xn, y[0], w_fc, b_fc, w_proj, b_proj, w_1, b_1, w_2, b_2, scale) if keep
               else None)


def _mwa_forward(act, adapter_act, impl, *args):
  return _mwa(act, adapter_act, impl, True, *args)


def _hidden_gradient(act, adapter_act, impl, g, w_out, b, y, scale, f):
  """`(dz, dz_h, dz_a, h, a)`: `dz`, the gradient of the first product's biased output
  `z = y + b`, is `g @ w_out.T` times the activations' slopes at `z` (the adapter's columns
  times `scale`); `dz_h`, `dz_a` its two parts; `h`, `a` the two activations at `z`, for the
  second layer's weight gradients. By XLA or, with impl='pallas', `dz` by one kernel with
  the slopes in the product's epilogue (fused_mlp.hidden_gradient; per device as in
  _first_layer)."""
  rows = _kernel_rows(impl, y.shape, scale)
  if rows is not None:
    from aim_jax.models import fused_mlp, fused_norm
    (batch_axes, s_rows), (n, d) = rows, w_out.shape

    def local(g, y, s_rows, w_t, b):
      dz = fused_mlp.hidden_gradient(g.reshape(-1, d), w_t, b, s_rows.reshape(-1),
                                     y.reshape(-1, n), f, act, adapter_act)
      return (dz.reshape(y.shape),)
    dz, = fused_norm.per_device(local, batch_axes, 3, 2, 1)(g, y, s_rows, w_out.T, b)
    z = y + b
    return dz, dz[..., :f], dz[..., f:], act(z[..., :f]), adapter_act(z[..., f:])
  # XLA's program as it was before the kernel existed (the same operations in the same
  # order: XLA's fusion follows the graph, and a reordered one compiled 4 ms slower).
  z = y + b
  s = jnp.asarray(scale, z.dtype)
  h, h_slope = _slope(act, z[..., :f])
  a, a_slope = _slope(adapter_act, z[..., f:])
  d_hidden = jax.lax.dot_general(g, w_out, (((g.ndim - 1,), (1,)), ((), ())))
  dz_h = d_hidden[..., :f] * h_slope
  dz_a = d_hidden[..., f:] * (s * a_slope)
  return _side_by_side(dz_h, dz_a), dz_h, dz_a, h, a


def _mwa_backward(act, adapter_act, impl, res, dout):
  xn, y, w_fc, b_fc, w_proj, b_proj, w_1, b_1, w_2, b_2, scale = res
  f = w_fc.shape[1]
  s = jnp.asarray(scale, y.dtype)
  g = dout.astype(y.dtype)
  last = ((g.ndim - 1,), (1,))
  dz, dz_h, dz_a, h, a = _hidden_gradient(act, adapter_act, impl, g,
                                          jnp.concatenate([w_proj, w_2], 0),
                                          jnp.concatenate([b_fc, b_1]), y, scale, f)
  dxn = jax.lax.dot_general(dz, jnp.concatenate([w_fc, w_1], 1), (last, ((), ())))
  rows = tuple(range(g.ndim - 1))
  outer = lambda u, v: jax.lax.dot_general(u, v, ((rows, rows), ((), ())))
  grads = (outer(xn, dz_h), jnp.sum(dz_h, rows), outer(h, g), jnp.sum(g, rows),
           outer(xn, dz_a), jnp.sum(dz_a, rows), outer(a * s, g),
           jnp.sum(jnp.broadcast_to(s, g.shape) * g, rows))
  weights = (w_fc, b_fc, w_proj, b_proj, w_1, b_1, w_2, b_2)
  grads = tuple(gr.astype(w.dtype) for gr, w in zip(grads, weights))
  return (dout, dxn.astype(xn.dtype)) + grads + (jnp.zeros_like(scale),)


mlp_with_adapter.defvjp(_mwa_forward, _mwa_backward)
