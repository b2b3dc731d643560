"""A plain ViT image encoder whose blocks take optional AIM adapters.

With `adapters=None` this is exactly the image model (OpenAI CLIP's visual tower
by default; the ImageNet-21K timm ViT with `family='vit_in21k'` switches). AIM
is the *same* module with adapter factories set on its blocks: see
`aim_jax.models.aim.inject`.

Layout: a video enters as `(B, T, H, W, C)` (channels last, already normalised)
and the activations stay `(B, T, L, D)` through every block, so the spatial
attention runs over L with batch axes (B, T) and the temporal attention over T
with batch axes (B, L): no `(b t)` folding or sequence-first permutes. For a fused
attention kernel (`attention_impl` 'cudnn' / 'pallas') the token axis L may carry
padding after the real tokens (`attention_pad_mode='stream'`), masked out of the
spatial attention and sliced off before `ln_post` (see `VisionTransformer.token_padding`).

Parameter tree (loop layout; `scan_layers=True` stacks the blocks under
`resblocks` with a leading layer axis, see `aim_jax.models.layout`):

  conv1/kernel (p, p, 3, D)           <- conv1.weight (D, 3, p, p).transpose(2, 3, 1, 0)
  conv1/bias (D,)                     <- patch bias (every family but CLIP)
  class_embedding (D,)                (not SigLIP: class_token=False)
  positional_embedding (L, D)         (L = 1 + grid**2; grid**2 without a class token)
  register_tokens (R, D)              (dinov2_reg: after the class token, no position)
  temporal_embedding (1, T, D)        (AIM only)
  ln_pre/{scale, bias}                <- ln_pre.{weight, bias}   (CLIP only)
  resblocks_{i}/ln_1, ln_2/{scale, bias}
  resblocks_{i}/attn/qkv/kernel (D, 3, H, hd)  <- in_proj_weight.T.reshape(D, 3, H, hd)
  resblocks_{i}/attn/qkv/bias (3, H, hd)       <- in_proj_bias.reshape(3, H, hd)
  resblocks_{i}/attn/out/kernel (H, hd, D)     <- out_proj.weight.T.reshape(H, hd, D)
  resblocks_{i}/attn/out/bias (D,)
  resblocks_{i}/mlp/c_fc, c_proj/{kernel, bias} <- Linear weight.T, bias
  resblocks_{i}/{S,T,MLP}_Adapter[, T_Adapter_in]/D_fc1, D_fc2/{kernel, bias}
  resblocks_{i}/ls1, ls2 (D,)         (DINOv2 layer scale)
  ln_post/{scale, bias}
  MAPHead/probe (1, D), MAPHead/attn/{query,key,value,out}, MAPHead/ln, MAPHead/mlp
                                      (SigLIP pool='map'; frozen, pools each frame)
  proj (D, E)                         (CLIP image projection; not used by AIM)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from aim_jax.models.adapters import AdapterSpec, DropPath, ModuleFactory, trunc_normal_02
from aim_jax.models.norm import (DenseActivation, DenseWeights, LayerNorm, folded_bias,
                                 gelu_exact, mlp_with_adapter)

LP = nn.with_logical_partitioning
init = nn.initializers
Dtype = Any


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    'quick_gelu': quick_gelu,                                        # OpenAI CLIP
    'gelu': gelu_exact,                                              # timm / exact erf
    'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),   # SigLIP (big_vision)
}

# Switches that make the same encoder a given image-model family.
FAMILIES = {
    'clip': dict(patch_bias=False, pre_norm=True, ln_eps=1e-5, mlp_act='quick_gelu',
                 drop_path_mode='token'),
    # OpenCLIP models trained with nn.GELU (LAION ViT-B-16, ViT-L-14, ViT-H-14: every
    # OpenCLIP config without '-quickgelu'); otherwise CLIP.
    'clip_gelu': dict(patch_bias=False, pre_norm=True, ln_eps=1e-5, mlp_act='gelu',
                      drop_path_mode='token'),
    'vit_in21k': dict(patch_bias=True, pre_norm=False, ln_eps=1e-6, mlp_act='gelu',
                      drop_path_mode='frame'),
    # SigLIP / SigLIP 2 image towers (big_vision ViT): no class token, MAP-head pooling.
    'siglip': dict(patch_bias=True, pre_norm=False, ln_eps=1e-6, mlp_act='gelu_tanh',
                   class_token=False, pool='map', drop_path_mode='frame'),
    # DINOv2 (Oquab et al. 2023): layer scale; the `_reg` models add 4 register tokens.
    'dinov2': dict(patch_bias=True, pre_norm=False, ln_eps=1e-6, mlp_act='gelu',
                   layer_scale=True, drop_path_mode='frame'),
    'dinov2_reg': dict(patch_bias=True, pre_norm=False, ln_eps=1e-6, mlp_act='gelu',
                       layer_scale=True, num_registers=4, drop_path_mode='frame'),
}


def constrain(x, names):
  return nn.with_logical_constraint(x, names)


class Projection(nn.Module):
  """A full-shape kernel (and bias) applied with one `jnp.einsum`.

  Why not `nn.DenseGeneral`: it initialises a flat 2-D kernel and reshapes it, so
  under a global mesh (`jax.set_mesh`) the logical constraint that
  `with_logical_partitioning` puts on the kernel at init would meet a 2-D array
  with 4-D names and fail. Here the kernel is created in its final shape. The
  parameters are exactly DenseGeneral's (`kernel`, `bias`; same shapes, same
  initial values), and so is the arithmetic: inputs, kernel and bias are cast to
  `dtype` (flax `promote_dtype`), stored in `param_dtype`.
  """
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[Optional[str], ...]
  bias_shape: tuple[int, ...]
  bias_axes: tuple[Optional[str], ...]
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, spec: str, x: Optional[jax.Array], select: Optional[int] = None,
               add_bias: bool = True, input_offset: Optional[jax.Array] = None):
    # spec: einsum 'input,kernel->output' ('...' leading); the output ends with bias_shape.
    # select: use kernel[:, select] and bias[select] only (a slice of the weights, e.g.
    # q, k or v of a (D, 3, H, hd) kernel); spec then names the sliced kernel.
    # add_bias=False: leave the bias out (the caller accounts for it).
    # input_offset: a constant c the input should have had added: einsum(x + c) is
    # computed as einsum(x) + einsum(c), the second term folded into the bias.
    # x=None: return the parameters (kernel, bias or None) as stored, for a caller that
    # applies them itself.
    kernel = self.param('kernel', LP(trunc_normal_02, self.kernel_axes), self.kernel_shape,
                        self.param_dtype)
    bias = (self.param('bias', LP(init.zeros, self.bias_axes), self.bias_shape,
                       self.param_dtype) if self.use_bias else None)
    if x is None:
      return kernel, bias
    if select is not None:
      kernel = kernel[:, select]
      bias = None if bias is None else bias[select]
    if not add_bias:
      bias = None
    if input_offset is not None:
      bias = folded_bias(spec, input_offset, kernel, bias)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    c = _dense_axes(spec)
    if bias is not None and c:
      # As one (rows, in) @ (in, out) product with a (out,) bias, then split: the form in
      # which XLA puts the bias into a cuBLAS product's epilogue (on the stream's shape,
      # the bias added over the heads' two axes stays a kernel of its own).
      lead = x.shape[:x.ndim - c]
      y = jnp.dot(x.reshape(lead + (-1,)), kernel.reshape(math.prod(kernel.shape[:c]), -1))
      return (y + bias.reshape(-1)).reshape(lead + kernel.shape[c:])
    y = jnp.einsum(spec, x, kernel)
    return y if bias is None else y + bias


def _dense_axes(spec: str) -> int:
  """How many trailing input axes an einsum spec contracts if it is a dense layer over
  them, '...C,CO->...O' (the input's trailing axes C contracted with the kernel's leading
  ones, the kernel's other axes O the output's trailing ones, in order); 0 if it is not."""
  ins, out = spec.split('->')
  lhs, rhs = ins.split(',')
  if not lhs.startswith('...') or not out.startswith('...'):
    return 0
  c = lhs[3:]
  return len(c) if c and rhs.startswith(c) and out[3:] == rhs[len(c):] else 0


def attend_over_axis1(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Softmax attention along axis 1 of `(B, S, A, H, hd)`, batched over (B, A, H).

  The temporal attention of `(B, T, L, ...)` activations without moving T next to
  the heads first. Same numerics as `jax.nn.dot_product_attention`'s XLA path:
  logits accumulated in (at least) float32, scaled by hd**-0.5, softmax in
  float32, probabilities cast back to the value dtype.
  """
  hd = q.shape[-1]
  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
  precision = (jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16 else
               jax.lax.DotAlgorithmPreset.F16_F16_F32 if q.dtype == jnp.float16 else None)
  logits = jnp.einsum('bqahd,bkahd->bahqk', q, k, precision=precision,
                      preferred_element_type=logits_dtype)      # (B, A, H, S, S)
  logits = logits * jnp.asarray(hd ** -0.5, logits.dtype)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum('bahqk,bkahd->bqahd', probs, v)           # (B, S, A, H, hd)


def attend_over_axis1_elementwise(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`attend_over_axis1` with broadcast multiplies and sums instead of batched dots.

  Every operand keeps the `(B, S, A, H, hd)` layout and every intermediate is
  `(B, Sq, Sk, A, H[, hd])`: reductions over hd or Sk only, so the compiler needs
  no transposes (a batched dot wants its batch axes (B, A, H) leading). The
  products are formed in float32 inside the reduction (no S x S x D tensor is
  stored once XLA fuses the multiply into the sum). Meant for short clips
  (S = T frames), where a dot of S x hd x S is far too small to use a matrix unit.
  """
  hd = q.shape[-1]
  acc = jnp.promote_types(q.dtype, jnp.float32)
  logits = jnp.sum(q[:, :, None].astype(acc) * k[:, None].astype(acc), axis=-1)  # (B,Sq,Sk,A,H)
  logits = logits * jnp.asarray(hd ** -0.5, acc)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=2).astype(v.dtype)
  y = jnp.sum(probs[..., None].astype(acc) * v[:, None].astype(acc), axis=2)       # (B,Sq,A,H,hd)
  return y.astype(v.dtype)


def temporal_pallas(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`attend_over_axis1_elementwise`'s function as models/temporal_kernel.py's Pallas kernels
  (on a CPU, interpreted), on each device's clips under a mesh that shards the batch; a mesh
  that splits the model keeps the element-wise form."""
  from aim_jax.models import fused_norm, temporal_kernel   # imports Pallas: only when asked
  rows = fused_norm.row_sharding(q.shape)
  if rows == fused_norm.KEEP_XLA:
    return attend_over_axis1_elementwise(q, k, v)
  return temporal_kernel.temporal_attention(q, k, v, rows)


# jax.checkpoint_policies that are policies themselves (the others build one from names).
REMAT_POLICIES = ('everything_saveable', 'nothing_saveable', 'dots_saveable', 'checkpoint_dots',
                  'dots_with_no_batch_dims_saveable', 'checkpoint_dots_with_no_batch_dims')


def remat_policy(name: str):
  """model.remat_policy -> a jax.checkpoint policy: 'full' (None: recompute everything)
  or one of REMAT_POLICIES ('dots_saveable': keep only the matrix products' outputs)."""
  if name == 'full':
    return None
  if name not in REMAT_POLICIES:
    raise ValueError(f"model.remat_policy must be 'none', 'full' or one of "
                     f'{list(REMAT_POLICIES)}, got {name!r}')
  return getattr(jax.checkpoint_policies, name)


TEMPORAL_ATTENTION = ('einsum', 'elementwise', 'pallas', 'dot_product_attention')

# model.attention_impl: how attention over a folded (N, S, H, hd) sequence runs.
#   'xla' (or '' / None): jax.nn.dot_product_attention's XLA path, on every backend.
#   'cudnn': cuDNN flash attention (NVIDIA GPUs; BTNH layout, no transposes).
#   'pallas': the Pallas Triton flash attention of jax.experimental.pallas.ops.gpu
#     (NVIDIA GPUs; interpreted, slowly, on CPU so tests can check it).
ATTENTION_IMPLS = ('xla', 'cudnn', 'pallas')
# Token padding multiple per implementation when model.attention_pad_multiple is 0:
# cuDNN refuses odd lengths under grad; the Pallas kernel tiles the sequence by >= 16.
DEFAULT_PAD_MULTIPLE = {'xla': 1, 'cudnn': 8, 'pallas': 32}
PAD_MODES = ('stream', 'call')
QKV_PROJECTIONS = ('fused', 'split')


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def check_attention_impl(impl: Optional[str]) -> str:
  impl = impl or 'xla'
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'model.attention_impl must be one of {list(ATTENTION_IMPLS)} (or \'\'), '
                     f'got {impl!r}')
  return impl


def pad_multiple_for(impl: Optional[str], multiple: int = 0) -> int:
  """The token padding multiple: `multiple` if set (> 0), else the implementation's need."""
  if multiple < 0:
    raise ValueError(f'model.attention_pad_multiple must be >= 0, got {multiple}')
  return multiple or DEFAULT_PAD_MULTIPLE[check_attention_impl(impl)]


def _pallas_attention(q, k, v, valid: int) -> jax.Array:
  from jax.experimental.pallas.ops.gpu import attention as pallas_gpu  # GPU-only module
  n, s, _, hd = q.shape
  block = next((b for b in (128, 64, 32, 16) if s % b == 0), None)
  if block is None:
    raise ValueError(f"attention_impl='pallas' needs a sequence length that is a multiple of 16, "
                     f'got {s} (set model.attention_pad_multiple to 16, 32 or 64)')
  bwd = min(block, 32)
  sizes = pallas_gpu.BlockSizes(block_q=block, block_k=block, block_q_dkv=bwd, block_kv_dkv=bwd,
                                block_q_dq=bwd, block_kv_dq=bwd)
  # Padded keys get segment 0, real tokens 1: a real query never attends to padding.
  seg = None if valid == s else jnp.broadcast_to(
      (jnp.arange(s) < valid).astype(jnp.int32), (n, s))
  run = functools.partial(pallas_gpu.mha, segment_ids=seg, sm_scale=hd ** -0.5,
                          block_sizes=sizes)
  # The kernel for the platform the program is lowered for (not the default backend:
  # an ahead-of-time compile for a GPU target runs on a host without one); the
  # interpreter on a CPU.
  return jax.lax.platform_dependent(q, k, v, cpu=functools.partial(run, interpret=True),
                                    default=functools.partial(run, interpret=False))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: Optional[str] = None,
              valid_len: Optional[int] = None, pad_multiple: int = 1) -> jax.Array:
  """Softmax attention over axis 1 of `(N, S, H, hd)` q, k, v (BTNH, the layout of every kernel).

  Keys at positions >= `valid_len` (padding carried by the stream) get no weight;
  their query rows are computed but meaningless. With `pad_multiple` > 1 the
  sequence is padded here to a multiple (masked the same way) and the output sliced
  back: the per-call alternative to padding the stream once.
  """
  impl = check_attention_impl(impl)
  n, s = q.shape[:2]
  valid = s if valid_len is None else valid_len
  s_pad = round_up(s, pad_multiple)
  if s_pad != s:
    widths = ((0, 0), (0, s_pad - s), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
  if impl == 'pallas':
    y = _pallas_attention(q, k, v, valid)
  else:
    lengths = None if valid == s_pad else np.full((n,), valid, np.int32)   # a constant
    y = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                     implementation=impl)
  return y[:, :s] if s_pad != s else y


class MultiHeadAttention(nn.Module):
  """Self-attention over axis `axis` of `(B, A1, A2, D)` activations.

  One module called on two layouts shares its weights: AIM's temporal branch
  re-uses the frozen spatial attention along time (official vit_clip.py).
  Spatial attention (axis 2) folds the batch axes (B, T) (a free reshape) and
  runs `attention` on `(B*T, L, H, hd)`, the BTNH layout every fused kernel takes.
  Temporal attention (axis 1), `temporal_attention`:
    'einsum': batched dots over T on the `(B, T, L, H, hd)` layout (`attend_over_axis1`);
    'elementwise': the same by broadcast multiplies and sums (`attend_over_axis1_elementwise`);
    'pallas': the same function in one Pallas kernel each way (models/temporal_kernel.py);
    'dot_product_attention': the L axis folded into the heads, `(B, T, L*H, hd)`
      (a free reshape), through `attention` with `attention_impl` ('pallas' runs
      this one on XLA: its kernel tiles sequences by >= 16 frames).
  `qkv_projection`: 'fused' one (D, 3*D) product then q/k/v slices; 'split' three
  (D, D) products on slices of the same kernel (contiguous q, k, v for a fused
  kernel, no activation slicing; only q adds its bias: k's cannot change the softmax
  and v's is folded into the output bias). Same parameters, same function.
  """
  num_heads: int
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None   # see ATTENTION_IMPLS; None = 'xla'
  temporal_attention: str = 'einsum'     # see TEMPORAL_ATTENTION
  qkv_projection: str = 'fused'          # 'fused' | 'split'
  pad_multiple: int = 1                  # per-call token padding of the spatial attention

  @nn.compact
  def __call__(self, x: jax.Array, axis: int = 2, bias: Optional[jax.Array] = None,
               valid_len: Optional[int] = None, fold_out_bias: bool = False,
               project: bool = True):
    # x: (B, A1, A2, D); attention runs along `axis` (2: spatial L, 1: temporal T). With
    # qkv_projection='split' it may be three copies of one array (q, k, v's inputs: a
    # norm's copies, whose cotangents reach it apart, norm.LayerNorm `copies`).
    # valid_len: along L, the real tokens when the stream carries padding after them.
    # fold_out_bias: return (output without its bias, that bias (D,) in float32) for a
    # consumer that folds the bias in (an adapter), instead of the output.
    # project=False (with fold_out_bias): return (the attention's output before the output
    # projection, (B, A1, A2, H*hd), that projection's kernel (H*hd, D) as stored, the bias)
    # for a consumer that applies the projection itself (Adapter's input_kernel).
    if axis not in (1, 2):
      raise ValueError(f'MultiHeadAttention: axis must be 1 (temporal) or 2 (spatial), got {axis}')
    if self.temporal_attention not in TEMPORAL_ATTENTION:
      raise ValueError(f'model.temporal_attention must be one of {TEMPORAL_ATTENTION}, '
                       f'got {self.temporal_attention!r}')
    if self.qkv_projection not in QKV_PROJECTIONS:
      raise ValueError(f'model.qkv_projection must be one of {list(QKV_PROJECTIONS)}, '
                       f'got {self.qkv_projection!r}')
    impl = check_attention_impl(self.attention_impl)
    if isinstance(x, (tuple, list)):
      if self.qkv_projection != 'split' or len(x) != 3:
        raise ValueError('MultiHeadAttention: three inputs (q, k, v) need '
                         "qkv_projection='split'")
      inputs, x = tuple(x), x[0]
    else:
      inputs = (x,) * 3
    d = x.shape[-1]
    h = self.num_heads
    hd = d // h
    proj = functools.partial(Projection, dtype=self.dtype, param_dtype=self.param_dtype)
    qkv_proj = proj((d, 3, h, hd), ('embed', None, 'heads', 'kv'), (3, h, hd),
                    (None, 'heads', 'kv'), use_bias=self.qkv_bias, name='qkv')
    out_proj = proj((h, hd, d), ('heads', 'kv', 'embed'), (d,), ('embed',), name='out')
    b, a1, a2, _ = x.shape
    v_bias = None
    if self.qkv_projection == 'split':
      # (B, A1, A2, H, hd) each. Only q gets its bias: softmax over the keys is unchanged by
      # k's bias (q.b_k is the same for every key of a query), and since every row of
      # attention weights sums to 1, v's bias comes out of the attention unchanged and is
      # folded into the output projection's bias. Same function, two bias passes fewer.
      q = qkv_proj('...d,dhk->...hk', inputs[0], select=0)
      k, v = (qkv_proj('...d,dhk->...hk', inputs[i], select=i, add_bias=False) for i in (1, 2))
      if self.qkv_bias:
        v_bias = nn.unbox(qkv_proj.variables['params']['bias'])[2]     # (H, hd)
    else:
      qkv = qkv_proj('...d,dchk->...chk', x)           # (B, A1, A2, 3, H, hd)
      q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    if bias is not None:
      if axis != 2:
        raise ValueError('MultiHeadAttention: an attention bias is only supported along L (axis=2)')
      fold = lambda t: t.reshape(b * a1, a2, h, hd)
      y = jax.nn.dot_product_attention(fold(q), fold(k), fold(v), bias=bias,
                                       implementation='xla' if impl == 'pallas' else impl)
      y = y.reshape(b, a1, a2, h, hd)
    elif axis == 2:
      fold = lambda t: t.reshape(b * a1, a2, h, hd)    # (B, T, L, H, hd) -> (B*T, L, H, hd)
      y = attention(fold(q), fold(k), fold(v), impl=impl, valid_len=valid_len,
                    pad_multiple=self.pad_multiple)
      y = y.reshape(b, a1, a2, h, hd)
    elif self.temporal_attention == 'dot_product_attention':
      fold = lambda t: t.reshape(b, a1, a2 * h, hd)    # (B, T, L, H, hd) -> (B, T, L*H, hd)
      timpl = 'xla' if impl == 'pallas' else impl
      y = attention(fold(q), fold(k), fold(v), impl=timpl,
                    pad_multiple=2 if timpl == 'cudnn' else 1)
      y = y.reshape(b, a1, a2, h, hd)
    elif self.temporal_attention == 'pallas':
      y = temporal_pallas(q, k, v)                     # (B, T, L, H, hd)
    elif self.temporal_attention == 'elementwise':
      y = attend_over_axis1_elementwise(q, k, v)       # (B, T, L, H, hd)
    else:
      y = attend_over_axis1(q, k, v)                   # (B, T, L, H, hd)
    if not fold_out_bias:
      return out_proj('...hk,hkd->...d', y, input_offset=v_bias)   # (B, A1, A2, D)
    kernel, out_bias = out_proj('', None)
    b_out = (out_bias.astype(jnp.float32) if v_bias is None else
             folded_bias('hk,hkd->d', v_bias, kernel, out_bias))
    if not project:
      return y.reshape(y.shape[:-2] + (d,)), kernel.reshape(d, d), b_out
    return out_proj('...hk,hkd->...d', y, add_bias=False), b_out


class Mlp(nn.Module):
  """in (D -> hidden) -> activation -> out (hidden -> D), over the last axis of any rank.

  The layer names are the checkpoint's: CLIP's c_fc / c_proj (ViT families,
  MAPHead) or fc1 / fc2 (Swin, with act='gelu').
  """
  hidden: int
  act: str = 'quick_gelu'
  in_name: str = 'c_fc'
  out_name: str = 'c_proj'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  recompute_activation: bool = True
  # True: declare the parameters and return them, ((in kernel, bias), (out kernel, bias)),
  # without applying them (a block that fuses the joint adapter into this MLP).
  weights_only: bool = False

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    in_init = dict(kernel_init=LP(trunc_normal_02, ('embed', 'mlp')),
                   bias_init=LP(init.zeros, ('mlp',)))
    out_init = dict(kernel_init=LP(trunc_normal_02, ('mlp', 'embed')),
                    bias_init=LP(init.zeros, ('embed',)))
    if self.weights_only:
      return (DenseWeights(self.hidden, param_dtype=self.param_dtype, name=self.in_name,
                           **in_init)(d),
              DenseWeights(d, param_dtype=self.param_dtype, name=self.out_name, **out_init)(
                  self.hidden))
    # in + activation; the backward pass keeps the product only (norm.DenseActivation).
    h = DenseActivation(self.hidden, activation=ACTIVATIONS[self.act], dtype=self.dtype,
                        param_dtype=self.param_dtype, recompute=self.recompute_activation,
                        name=self.in_name, **in_init)(x)
    h = constrain(h, ('activation_batch',) + (None,) * (h.ndim - 2) + ('activation_mlp',))
    return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name=self.out_name,
                    **out_init)(h)


def fuse_joint_adapter(fuse: Optional[bool], dtype: Dtype) -> bool:
  """An encoder's `fuse_joint_adapter` for its blocks: None means on for half-precision
  compute (float32 keeps the separate modules and the golden tests' order of sums)."""
  return jnp.dtype(dtype).itemsize < 4 if fuse is None else bool(fuse)


def mlp_and_joint_adapter(mlp: ModuleFactory, adapter: ModuleFactory, act: str, x: jax.Array,
                          xn: jax.Array, scale, dtype: Dtype, impl: str = 'xla') -> jax.Array:
  """`x + mlp(xn) + scale * adapter(xn)` as one MLP of width 4D + D/4
  (norm.mlp_with_adapter), with the two modules' parameters (declared by them with
  `weights_only`): one product in, one kernel for both activations, one product out into
  the residual. `mlp` and `adapter` build the modules with their names; `act` is the MLP's
  activation (ACTIVATIONS), the adapter's is the exact GELU; `impl`: model.mlp_impl."""
  (w_fc, b_fc), (w_proj, b_proj) = mlp(weights_only=True)(xn)
  (w_1, b_1), (w_2, b_2) = adapter(weights_only=True)(xn)
  weights = [w.astype(dtype) for w in (w_fc, b_fc, w_proj, b_proj, w_1, b_1, w_2, b_2)]
  with jax.named_scope('mlp'):     # profiles file its kernels under the MLP
    return mlp_with_adapter(ACTIVATIONS[act], gelu_exact, impl, x, xn.astype(dtype), *weights,
                            scale)


class ProbeAttention(nn.Module):
  """Cross attention with separate query/key/value projections (big_vision layout)."""
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q_in: jax.Array, kv_in: jax.Array) -> jax.Array:
    # q_in: (N, Q, D), kv_in: (N, L, D) -> (N, Q, D)
    d = kv_in.shape[-1]
    h = self.num_heads

    hd = d // h
    proj = functools.partial(Projection, (d, h, hd), ('embed', 'heads', 'kv'), (h, hd),
                             ('heads', 'kv'), dtype=self.dtype, param_dtype=self.param_dtype)
    q = proj(name='query')('nqd,dhk->nqhk', q_in)                             # (N, Q, H, hd)
    k = proj(name='key')('nsd,dhk->nshk', kv_in)                              # (N, S, H, hd)
    v = proj(name='value')('nsd,dhk->nshk', kv_in)
    y = jax.nn.dot_product_attention(q, k, v)                                 # (N, Q, H, hd)
    return Projection((h, hd, d), ('heads', 'kv', 'embed'), (d,), ('embed',), dtype=self.dtype,
                      param_dtype=self.param_dtype, name='out')('nqhk,hkd->nqd', y)


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision `MAPHead`, SigLIP): (N, L, D) -> (N, D).

  A learnt probe attends over the tokens; then `x + mlp(ln(x))`. Parameters:
  probe (1, D), attn/{query,key,value}/kernel (D, H, hd) + bias (H, hd),
  attn/out/kernel (H, hd, D) + bias, ln/{scale,bias}, mlp/{c_fc,c_proj}.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  mlp_act: str = 'gelu_tanh'
  ln_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # x: (N, L, D) -> (N, D)
    d = x.shape[-1]
    probe = self.param('probe', LP(init.xavier_uniform(), (None, 'embed')), (1, d),
                       self.param_dtype)
    q_in = jnp.broadcast_to(probe.astype(x.dtype)[None], (x.shape[0], 1, d))  # (N, 1, D)
    y = ProbeAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                       name='attn')(q_in, x)                        # (N, 1, D)
    z = LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                  name='ln')(y)
    y = y + Mlp(int(d * self.mlp_ratio), act=self.mlp_act, dtype=self.dtype,
                param_dtype=self.param_dtype, name='mlp')(z[:, None])[:, 0]
    return y[:, 0]


def _stream_norm(norm: nn.Module, x: jax.Array, copies: int):
  """`(x, norm(x))` by `norm(x, stream=True)` (x continues the residual stream); with
  `copies` > 1 the output as that many copies, a tuple."""
  x, *h = norm(x, stream=True, copies=copies)
  return x, (h[0] if copies == 1 else tuple(h))


class ResidualAttentionBlock(nn.Module):
  """CLIP's residual attention block with optional AIM adapters (None = plain CLIP).

  Order (official vit_clip.py / vit_imagenet.py):
    1. temporal: x += drop_path(T_Adapter(attn_T(ln_1(x)))), attention along T,
       every token (class token too) of a clip attending over its frames;
       num_tadapter=2 puts T_Adapter_in between ln_1 and attn.
    2. spatial:  x += S_Adapter(attn_L(ln_1(x)))     (no drop path)
    3. joint:    x += mlp(ln_2(x)) + drop_path(scale * MLP_Adapter(ln_2(x)))
  `layer_scale` (DINOv2) multiplies the frozen attention and MLP outputs.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  mlp_act: str = 'quick_gelu'
  ln_eps: float = 1e-5
  qkv_bias: bool = True
  layer_scale: bool = False
  s_adapter: Optional[ModuleFactory] = None
  t_adapter: Optional[ModuleFactory] = None
  t_adapter_in: Optional[ModuleFactory] = None
  mlp_adapter: Optional[ModuleFactory] = None
  mlp_adapter_scale: float = 0.5
  drop_path_mode: str = 'token'
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  temporal_attention: str = 'einsum'
  qkv_projection: str = 'fused'
  pad_multiple: int = 1          # per-call padding of the spatial attention (pad mode 'call')
  valid_len: Optional[int] = None  # real tokens when the stream carries padding (mode 'stream')
  scanned: bool = False          # (carry, xs) signature for nn.scan
  fuse_joint_adapter: bool = False  # MLP + MLP_Adapter as one wider MLP (mlp_with_adapter)
  norm_impl: str = 'xla'         # ln_1 / ln_2: 'xla' | 'pallas' (norm.NORM_IMPLS)
  mlp_impl: str = 'xla'          # the fused MLP's first product: 'xla' | 'pallas' (MLP_IMPLS)

  def _norm(self, name):
    return LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                     impl=self.norm_impl, name=name)

  def _gammas(self, d):
    if not self.layer_scale:
      return {}
    return {n: self.param(n, LP(init.constant(1e-5), ('embed',)), (d,), self.param_dtype)
            for n in ('ls1', 'ls2')}

  @staticmethod
  def _scaled(gammas, name, y):
    # Layer scale multiplies the frozen branch output *before* any adapter sees it: the
    # temporal branch re-uses attention + ls1 exactly as the spatial one does, and
    # T_Adapter / S_Adapter act on the scaled output (DINOv2 design choice, see
    # aim_jax/convert/formats/dinov2.py); the joint adapter stays parallel to the scaled MLP.
    return y * gammas[name].astype(y.dtype) if name in gammas else y

  def _attend_and_adapt(self, attn, x, gammas, adapter, name, output_scale=None,
                        residual=None, **attn_kw):
    """attn(x), layer-scaled, then the adapter `adapter` (a factory or None). With an
    adapter and no layer scale, the adapter reads the attention's output before its output
    projection, with that projection's kernel and bias (Adapter's input_kernel and
    input_offset): D_fc1 through the kernel folded into its own (one (D, D) product fewer
    each way for an adapter without a skip branch, T_Adapter), a skip branch through the
    projection, the product that takes the bias and the stream. Same function.
    `output_scale` (drop path's mask / keep) goes to a no-skip adapter, which applies it to
    its hidden (Adapter's output_scale). With `residual` (the stream before this branch) it
    returns `residual + branch`, the adapter adding it as its last product's addend
    (Adapter's residual)."""
    scale_kw = {} if output_scale is None else {'output_scale': output_scale}
    if adapter is None or self.layer_scale:
      y = self._scaled(gammas, 'ls1', attn(x, **attn_kw))
      y = y if adapter is None else adapter(name=name)(y, **scale_kw)
      return y if residual is None else residual + y
    o, out_kernel, b_out = attn(x, fold_out_bias=True, project=False, **attn_kw)
    return adapter(name=name)(o, input_offset=b_out, input_kernel=out_kernel,
                              residual=residual, **scale_kw)

  @nn.compact
  def __call__(self, x: jax.Array, drop_rate=0.0) -> jax.Array:
    # x: (B, T, L, D)
    d = x.shape[-1]
    ln_1 = self._norm('ln_1')
    attn = MultiHeadAttention(self.num_heads, qkv_bias=self.qkv_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              attention_impl=self.attention_impl,
                              temporal_attention=self.temporal_attention,
                              qkv_projection=self.qkv_projection,
                              pad_multiple=self.pad_multiple, name='attn')
    # Drop path on T_Adapter's output is the factor `mask / keep` that the adapter applies
    # to its hidden (Adapter's output_scale): the backward pass then never multiplies a
    # D-wide cotangent by the mask. Same draws (in the same order), same function. The joint
    # adapter's draw goes into the fused MLP's hidden likewise (mlp_with_adapter); unfused
    # (float32) it stays on the adapter's output: scaled inside the adapter alone, XLA
    # merged its D_fc2 input gradient into c_proj's, no faster and 0.5 GiB bigger.
    drop_path = DropPath(self.drop_path_mode)
    path_scale = functools.partial(drop_path.scale, x.shape, drop_rate, self.deterministic,
                                   valid_len=self.valid_len)
    gammas = self._gammas(d)

    # Each norm of the stream is called as `x, h = norm(x, stream=True)`: the same x
    # continues the stream, so a fused norm's backward kernel can add the stream's
    # cotangent (fused_norm.residual_layer_norm). With the split projection, q, k and v's
    # products each take their own copy of ln_1's output, so that kernel also sums their
    # three cotangents as it reads them.
    copies = 3 if self.qkv_projection == 'split' else 1
    norm_1 = functools.partial(_stream_norm, ln_1)
    if self.t_adapter is not None:
      x, xt = norm_1(x, 1 if self.t_adapter_in is not None else copies)
      if self.t_adapter_in is not None:
        xt = self.t_adapter_in(name='T_Adapter_in')(xt)
      # (B, T, L, D), attention over T
      kw = dict(output_scale=path_scale(), axis=1)
      if self.is_mutable_collection('intermediates'):
        xt = self._attend_and_adapt(attn, xt, gammas, self.t_adapter, 'T_Adapter', **kw)
        self.sow('intermediates', 'tbranch', xt)    # drop path applied, in training
        x = x + xt
      else:   # the stream as T_Adapter's last product's addend
        x = self._attend_and_adapt(attn, xt, gammas, self.t_adapter, 'T_Adapter',
                                   residual=x, **kw)

    # (B, T, L, D), attention over L
    x, xs = norm_1(x, copies)
    x = self._attend_and_adapt(attn, xs, gammas, self.s_adapter, 'S_Adapter', axis=2,
                               valid_len=self.valid_len, residual=x)
    x = constrain(x, ('activation_batch', None, None, 'activation_embed'))

    x, xn = self._norm('ln_2')(x, stream=True)
    # Scanned, the recomputed activation keeps the layer's stack lean; unrolled, XLA already
    # keeps only the product, and the checkpoint's barrier would add a copy of it.
    mlp = functools.partial(Mlp, int(d * self.mlp_ratio), act=self.mlp_act, dtype=self.dtype,
                            param_dtype=self.param_dtype, recompute_activation=self.scanned,
                            name='mlp')
    if self.mlp_adapter is not None and self.fuse_joint_adapter and not self.layer_scale:
      # The frozen MLP and the joint adapter beside it as one MLP: same parameters, same
      # function (mlp_and_joint_adapter).
      scale = path_scale()
      scale = self.mlp_adapter_scale if scale is None else self.mlp_adapter_scale * scale
      x = mlp_and_joint_adapter(mlp, functools.partial(self.mlp_adapter, name='MLP_Adapter'),
                                self.mlp_act, x, xn, scale, self.dtype, self.mlp_impl)
    else:
      m = mlp()(xn)
      x = x + self._scaled(gammas, 'ls2', m)
      if self.mlp_adapter is not None:
        a = self.mlp_adapter_scale * self.mlp_adapter(name='MLP_Adapter')(xn)
        x = x + drop_path(a, drop_rate, self.deterministic, valid_len=self.valid_len)
    x = constrain(x, ('activation_batch', None, None, 'activation_embed'))
    return (x, None) if self.scanned else x


class VisionTransformer(nn.Module):
  """CLIP-style ViT. Images `(N, H, W, C)` or videos `(B, T, H, W, C)`.

  Returns the `ln_post` class token, `(N, D)` for images or `(B, T, D)` for
  videos, projected by `proj` when `output_dim` is set (CLIP's image embedding).

  Attributes (architecture): patch_size, width, layers, heads, image_size,
    mlp_ratio, output_dim.
  Attributes (family switches, see FAMILIES): patch_bias, pre_norm, ln_eps,
    mlp_act, qkv_bias, layer_scale, num_registers, class_token, pool.
  Attributes (AIM): num_frames (size of temporal_embedding; 0 = none),
    adapters (AdapterSpec or None), drop_path_rate, drop_path_mode.
  Attributes (execution): scan_layers, remat_policy ('none', 'full',
    'dots_saveable', ...), dtype, param_dtype, attention_impl,
    temporal_attention ('einsum' | 'dot_product_attention', see MultiHeadAttention),
    fuse_joint_adapter, norm_impl, mlp_impl.
  """
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  heads: int = 12
  image_size: int = 224
  mlp_ratio: float = 4.0
  output_dim: Optional[int] = None
  patch_bias: bool = False
  pre_norm: bool = True
  ln_eps: float = 1e-5
  mlp_act: str = 'quick_gelu'
  qkv_bias: bool = True
  layer_scale: bool = False
  num_registers: int = 0
  class_token: bool = True       # False: SigLIP (positional_embedding has grid*grid rows)
  pool: str = 'cls'              # 'cls': ln_post class token; 'map': ln_post then MAPHead
  num_frames: int = 0
  adapters: Optional[AdapterSpec] = None
  drop_path_rate: float = 0.0
  drop_path_mode: str = 'token'
  scan_layers: bool = False
  remat_policy: str = 'none'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  temporal_attention: str = 'einsum'
  qkv_projection: str = 'fused'
  attention_pad_multiple: int = 0   # 0: the implementation's need (DEFAULT_PAD_MULTIPLE)
  attention_pad_mode: str = 'stream'
  # The joint adapter computed with the frozen MLP as one wider MLP (norm.mlp_with_adapter;
  # the same function, another order of float sums). None: on for half-precision compute,
  # off in float32 (the golden tests' program stays as it was).
  fuse_joint_adapter: Optional[bool] = None
  # The blocks' ln_1 / ln_2: 'xla' | 'pallas' (one kernel each way, norm.LayerNorm).
  norm_impl: str = 'xla'
  # The fused MLP's first product: 'xla' | 'pallas' (its activations in the product's
  # epilogue, fused_mlp.first_layer).
  mlp_impl: str = 'xla'

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    """Tokens per frame: class token, registers, patches."""
    return int(self.class_token) + self.num_registers + self.grid * self.grid

  def token_padding(self) -> tuple[int, int]:
    """(stream length, per-call multiple): where the sequence is padded for the kernel.

    Mode 'stream': the token axis is padded once after ln_pre to a multiple of the
    padding multiple and carried through every block (padded keys are masked out of
    the spatial attention; pad rows never mix with real ones and are sliced off
    before ln_post). Mode 'call': each spatial attention pads and slices itself.
    """
    if self.attention_pad_mode not in PAD_MODES:
      raise ValueError(f'model.attention_pad_mode must be one of {list(PAD_MODES)}, '
                       f'got {self.attention_pad_mode!r}')
    m = pad_multiple_for(self.attention_impl, self.attention_pad_multiple)
    n = self.num_tokens
    if self.attention_pad_mode == 'stream':
      return round_up(n, m), 1
    return n, m

  def block_kwargs(self, layer: int, deterministic: bool) -> dict:
    stream_len, call_multiple = self.token_padding()
    kw = dict(num_heads=self.heads, mlp_ratio=self.mlp_ratio, mlp_act=self.mlp_act,
              ln_eps=self.ln_eps, qkv_bias=self.qkv_bias, layer_scale=self.layer_scale,
              drop_path_mode=self.drop_path_mode, deterministic=deterministic,
              dtype=self.dtype, param_dtype=self.param_dtype,
              attention_impl=self.attention_impl, temporal_attention=self.temporal_attention,
              qkv_projection=self.qkv_projection, pad_multiple=call_multiple,
              valid_len=self.num_tokens if stream_len != self.num_tokens else None,
              fuse_joint_adapter=fuse_joint_adapter(self.fuse_joint_adapter, self.dtype),
              norm_impl=self.norm_impl, mlp_impl=self.mlp_impl)
    if self.adapters is not None:
      kw.update(self.adapters.block_fields(layer, self.dtype, self.param_dtype))
      kw['mlp_adapter_scale'] = self.adapters.scale
    return kw

  def _uniform_layers(self) -> bool:
    return self.adapters is None or self.adapters.layers is None

  def _remat(self, cls):
    if self.remat_policy == 'none':
      return cls
    return nn.remat(cls, policy=remat_policy(self.remat_policy), prevent_cse=not self.scan_layers)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    is_video = x.ndim == 5
    if not is_video:
      x = x[:, None]                                   # (N, H, W, C) -> (N, 1, H, W, C)
    b, t, hh, ww, c = x.shape
    if self.num_frames and t != self.num_frames:
      raise ValueError(
          f'input has {t} frames but the model was built with num_frames={self.num_frames} '
          '(model.num_frames must equal the data\'s clip length)')
    if hh != self.image_size or ww != self.image_size:
      raise ValueError(f'input is {hh}x{ww} but model.image_size is {self.image_size}')
    d = self.width

    x = x.reshape(b * t, hh, ww, c).astype(self.dtype)
    x = nn.Conv(d, (self.patch_size,) * 2, strides=(self.patch_size,) * 2, padding='VALID',
                use_bias=self.patch_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=LP(init.lecun_normal(), (None, None, None, 'embed')),
                bias_init=LP(init.zeros, ('embed',)), name='conv1')(x)
    x = x.reshape(b, t, self.grid * self.grid, d)      # row-major patches (h then w)

    scale = d ** -0.5
    if self.class_token:
      cls = self.param('class_embedding', LP(init.normal(scale), ('embed',)), (d,),
                       self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, t, 1, d)), x], axis=2)
    pos = self.param('positional_embedding', LP(init.normal(scale), (None, 'embed')),
                     (self.grid * self.grid + int(self.class_token), d), self.param_dtype)
    x = x + pos.astype(x.dtype)
    if self.num_frames:
      # Added to every token, class token included, before ln_pre (vit_clip.py).
      temb = self.param('temporal_embedding', LP(init.zeros, (None, None, 'embed')),
                        (1, self.num_frames, d), self.param_dtype)
      x = x + temb.astype(x.dtype)[:, :, None, :]
    if self.num_registers:
      reg = self.param('register_tokens', LP(init.normal(1e-6), (None, 'embed')),
                       (self.num_registers, d), self.param_dtype)
      c = int(self.class_token)      # registers follow the class token, without position
      x = jnp.concatenate(
          [x[:, :, :c], jnp.broadcast_to(reg.astype(x.dtype), (b, t) + reg.shape), x[:, :, c:]],
          axis=2)
    if self.pre_norm:
      x = LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                    name='ln_pre')(x)
    x = constrain(x, ('activation_batch', None, None, 'activation_embed'))
    self.sow('intermediates', 'after_ln_pre', x)
    n_tokens = x.shape[2]
    stream_len, _ = self.token_padding()
    if stream_len != n_tokens:                         # padded rows after the real tokens
      x = jnp.pad(x, ((0, 0), (0, 0), (0, stream_len - n_tokens), (0, 0)))

    rates = np.linspace(0.0, self.drop_path_rate, self.layers).tolist()
    deterministic = not train
    if self.scan_layers and self._uniform_layers():
      stack = nn.scan(
          self._remat(ResidualAttentionBlock),
          variable_axes={'params': 0, 'intermediates': 0},
          split_rngs={'params': True, 'dropout': True}, in_axes=0, length=self.layers,
          metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(**self.block_kwargs(0, deterministic), scanned=True, name='resblocks')(
          x, jnp.asarray(rates, jnp.float32))
    else:
      block_cls = self._remat(ResidualAttentionBlock)
      for i in range(self.layers):
        x = block_cls(**self.block_kwargs(i, deterministic), name=f'resblocks_{i}')(x, rates[i])
        self.sow('intermediates', f'block{i}_out', x[:, :, :n_tokens])

    x = x[:, :, :n_tokens]                             # drop the stream padding (if any)

    x = LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                  name='ln_post')(x)
    if self.pool == 'cls':
      if not self.class_token:
        raise ValueError("pool='cls' needs class_token=True")
      x = x[:, :, 0]                                   # class token: (B, T, D)
    elif self.pool == 'map':
      # SigLIP: the frozen MAP head pools each frame's tokens (registers excluded);
      # temporal modelling happened in the blocks, the classifier head averages frames.
      tokens = x[:, :, int(self.class_token) + self.num_registers:]
      x = MAPHead(self.heads, mlp_ratio=self.mlp_ratio, mlp_act=self.mlp_act,
                  ln_eps=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                  name='MAPHead')(tokens.reshape(b * t, -1, d))   # (B*T, L, D) -> (B*T, D)
      x = x.reshape(b, t, d)
    else:
      raise ValueError(f"VisionTransformer.pool must be 'cls' or 'map', got {self.pool!r}")
    if self.output_dim is not None:
      proj = self.param('proj', LP(init.normal(scale), ('embed', None)),
                        (d, self.output_dim), self.param_dtype)
      x = x @ proj.astype(x.dtype)
    return x if is_video else x[:, 0]
