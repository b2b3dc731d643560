"""A Swin Transformer image encoder whose blocks take optional AIM adapters.

With `adapters=None` this is the 2D Swin Transformer of Liu et al. 2021
(Microsoft's `SwinTransformer`, timm's `swin_*`): patch embedding + norm,
stages of (shifted-)window attention blocks with a relative position bias and
the shift mask, and patch merging between stages. AIM (Table 6 of the paper,
official `SwinTransformer2D_Adapter`, swin2d_adapter.py) is the *same* module
with adapter factories set through `aim_jax.models.aim.inject`:

  * temporal (even blocks of every stage only, the unshifted ones): the
    block's own window-attention weights re-used along time, with a
    `temporal_position_bias_table`, then `T_Adapter` (no skip);
  * spatial: `S_Adapter2` (skip) on the window-attention output;
  * joint: `S_Adapter` (no skip) parallel to the MLP, times the scale (the
    official code hard-codes 0.5; `AdapterSpec.scale` defaults to it).
  Official quirk: the names are swapped against the ViT's (S_Adapter is the
  MLP adapter there); the names are kept so the checkpoints map 1:1.

Layout: a video `(B, T, H, W, C)` is embedded by a Conv3d with kernel and
stride (pt, p, p) into `(B, T', H', W', C)`, T' = T / pt, and stays 5-D:
the spatial windows fold (B, T') into the batch, the temporal attention runs
along T' with (B, H', W') as batch. Images `(N, H, W, C)` are a one-frame
video (zero-padded to pt frames, as the official Conv3d pads).

Parameter tree (official names: the mapping only renames and transposes):

  patch_embed/proj/{kernel (pt, p, p, 3, C), bias}   patch_embed/norm/{scale, bias}
  temporal_embedding (1, T', C)                      (t_relative=False with frames only)
  layers_{s}/blocks_{j}/norm1, norm2/{scale, bias}
  layers_{s}/blocks_{j}/attn/qkv/{kernel (Cs, 3Cs), bias}  attn/proj/{kernel, bias}
  layers_{s}/blocks_{j}/attn/relative_position_bias_table ((2ws-1)^2, nh)
  layers_{s}/blocks_{j}/attn/temporal_position_bias_table (2T'-1, nh)   (temporal blocks)
  layers_{s}/blocks_{j}/mlp/fc1, fc2/{kernel, bias}
  layers_{s}/blocks_{j}/{T_Adapter, S_Adapter, S_Adapter2}/D_fc1, D_fc2/{kernel, bias}
  layers_{s}/downsample/norm/{scale, bias}, downsample/reduction/kernel (4Cs, 2Cs)  (s < S-1)
  norm/{scale, bias}

Layer scan is not offered: stages differ in width, heads, window and mask, and
within a stage shifted and unshifted blocks alternate with different parameter
sets (only the even ones own temporal tables). `remat_policy` applies per block.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aim_jax.models.adapters import AdapterSpec, DropPath, ModuleFactory, trunc_normal_02
from aim_jax.models.norm import LayerNorm
from aim_jax.models import vit
from aim_jax.models.vit import Mlp

LP = nn.with_logical_partitioning
init = nn.initializers
Dtype = Any


def constrain(x, names):
  return nn.with_logical_constraint(x, names)


def relative_position_index(window: int) -> np.ndarray:
  """(ws*ws, ws*ws) index into the ((2ws-1)^2, nh) bias table (Swin eq. 4).

  Entry [i, j] = (dh + ws - 1) * (2ws - 1) + (dw + ws - 1), (dh, dw) = pos_i - pos_j,
  positions row-major inside the window.
  """
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing='ij'))
  coords = coords.reshape(2, -1)                       # (2, ws*ws)
  rel = coords[:, :, None] - coords[:, None, :] + (window - 1)   # (2, L, L), shifted to >= 0
  return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int64)


def temporal_position_index(frames: int) -> np.ndarray:
  """(T', T') index into the (2T'-1, nh) temporal table: i - j + T' - 1."""
  t = np.arange(frames)
  return (t[:, None] - t[None, :] + frames - 1).astype(np.int64)


def shift_attention_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """(nW, ws*ws, ws*ws) additive mask of a shifted block: -100 across regions.

  After the cyclic roll by -shift, each window may hold pixels of up to four
  regions that were not adjacent in the image; rows are labelled 0/1/2 for
  [0, H-ws), [H-ws, H-shift), [H-shift, H) (columns likewise) and tokens of
  different labels must not attend to each other.
  """
  def bands(n):
    lab = np.zeros(n, np.int64)
    lab[n - window:n - shift] = 1
    lab[n - shift:] = 2
    return lab
  labels = 3 * bands(height)[:, None] + bands(width)[None, :]      # (H, W)
  labels = window_partition(labels[None, :, :, None], window)[0, :, :, 0]   # (nW, L)
  diff = labels[:, None, :] != labels[:, :, None]
  return np.where(diff, -100.0, 0.0).astype(np.float32)


def window_partition(x, window: int):
  """(N, H, W, C) -> (N, nW, ws*ws, C); windows row-major, tokens row-major inside."""
  n, h, w, c = x.shape
  x = x.reshape(n, h // window, window, w // window, window, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)                    # (N, H/ws, W/ws, ws, ws, C)
  return x.reshape(n, (h // window) * (w // window), window * window, c)


def window_merge(x, window: int, h: int, w: int):
  """(N, nW, ws*ws, C) -> (N, H, W, C); the inverse of `window_partition`."""
  n, _, _, c = x.shape
  x = x.reshape(n, h // window, w // window, window, window, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)                    # (N, H/ws, ws, W/ws, ws, C)
  return x.reshape(n, h, w, c)


class WindowAttention(nn.Module):
  """Multi-head attention with a learned relative position bias.

  One module, two uses that share `qkv` and `proj` (official
  swin2d_adapter.py): `spatial` inside ws x ws windows with the 2D bias (and
  the shift mask), `temporal` along T' with the 1D temporal bias (only when
  `temporal_frames` > 0, which creates `temporal_position_bias_table`).
  """
  dim: int
  num_heads: int
  window_size: int
  temporal_frames: int = 0
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    # The fused (3 * Cs) axis is [q; k; v] x heads x hd, the official Linear layout.
    self.qkv = dense(3 * self.dim, use_bias=self.qkv_bias,
                     kernel_init=LP(trunc_normal_02, ('embed', 'heads')),
                     bias_init=LP(init.zeros, ('heads',)))
    self.proj = dense(self.dim, kernel_init=LP(trunc_normal_02, ('heads', 'embed')),
                      bias_init=LP(init.zeros, ('embed',)))
    self.relative_position_bias_table = self.param(
        'relative_position_bias_table', LP(trunc_normal_02, (None, None)),
        ((2 * self.window_size - 1) ** 2, self.num_heads), self.param_dtype)
    if self.temporal_frames:
      # Official quirk: no substring of the freeze rule matches this name, so it
      # stays frozen at its random init; AIM checkpoints carry the values.
      self.temporal_position_bias_table = self.param(
          'temporal_position_bias_table', LP(trunc_normal_02, (None, None)),
          (2 * self.temporal_frames - 1, self.num_heads), self.param_dtype)

  def _attend(self, x, bias):
    # x: (..., S, C); bias broadcastable to (..., nh, S, S).
    *lead, s, c = x.shape
    h = self.num_heads
    hd = c // h
    qkv = self.qkv(x).reshape(*lead, s, 3, h, hd)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]   # (..., S, nh, hd)
    logits = jnp.einsum('...qhd,...khd->...hqk', q * hd ** -0.5, k)
    logits = logits + bias.astype(logits.dtype)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    y = jnp.einsum('...hqk,...khd->...qhd', weights, v).reshape(*lead, s, c)
    return self.proj(y)

  def spatial(self, x, mask: np.ndarray | None = None):
    # x: (N, nW, ws*ws, C) windows; mask: (nW, ws*ws, ws*ws) or None.
    index = relative_position_index(self.window_size)
    bias = self.relative_position_bias_table[index.reshape(-1)]
    bias = bias.reshape(*index.shape, self.num_heads).transpose(2, 0, 1)   # (nh, L, L)
    if mask is not None:
      bias = bias[None] + jnp.asarray(mask)[:, None]   # (nW, nh, L, L)
    return self._attend(x, bias)

  def temporal(self, x):
    # x: (B, L, T', C), attention along T'.
    t = x.shape[-2]
    if t != self.temporal_frames:
      raise ValueError(f'temporal attention got {t} time tokens but the model was built for '
                       f'{self.temporal_frames} (num_frames / patch_size_t)')
    index = temporal_position_index(t)
    bias = self.temporal_position_bias_table[index.reshape(-1)]
    bias = bias.reshape(t, t, self.num_heads).transpose(2, 0, 1)         # (nh, T', T')
    return self._attend(x, bias)


def _layer_norm(eps, dtype, param_dtype, name):
  return LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


class SwinBlock(nn.Module):
  """A Swin block with optional AIM adapters (None = the image block).

  Order (official swin2d_adapter.py), x: (B, T', H, W, C):
    1. temporal (t_adapter set): x += drop_path(T_Adapter(attn_T(norm1(x)))),
       every spatial position of a clip attending over its T' time tokens;
    2. spatial: x += S_Adapter2(window_attn(roll(norm1(x))))   (no drop path)
    3. joint:   x += mlp(norm2(x)) + drop_path(scale * S_Adapter(norm2(x)))
  The frozen branches have no drop path (as in the official AIM blocks).
  Drop-path masks: per (clip, position) on the temporal branch, per frame on
  the joint adapter (timm DropPath on the official (b n) t c / (b t) n c tensors).
  """
  num_heads: int
  window_size: int
  shift_size: int = 0
  mlp_ratio: float = 4.0
  ln_eps: float = 1e-5
  qkv_bias: bool = True
  temporal_frames: int = 0
  s_adapter: ModuleFactory | None = None
  t_adapter: ModuleFactory | None = None
  mlp_adapter: ModuleFactory | None = None
  mlp_adapter_scale: float = 0.5
  drop_path_rate: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  fuse_joint_adapter: bool = False   # MLP + joint S_Adapter as one MLP (norm.mlp_with_adapter)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    ws, s = self.window_size, self.shift_size
    norm1 = _layer_norm(self.ln_eps, self.dtype, self.param_dtype, 'norm1')
    attn = WindowAttention(
        c, self.num_heads, ws, temporal_frames=self.temporal_frames if self.t_adapter else 0,
        qkv_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype, name='attn')
    drop_path = DropPath('frame')

    if self.t_adapter is not None:
      xt = x.transpose(0, 2, 3, 1, 4).reshape(b, h * w, t, c)   # (B, T', H, W, C) -> (B, L, T', C)
      r = attn.temporal(norm1(xt))
      r = self.t_adapter(name='T_Adapter')(r)
      self.sow('intermediates', 'tbranch', r)
      r = drop_path(r, self.drop_path_rate, self.deterministic)   # one draw per (clip, position)
      x = x + r.reshape(b, h, w, t, c).transpose(0, 3, 1, 2, 4)

    u = norm1(x).reshape(b * t, h, w, c)               # (B*T', H, W, C)
    if s:
      u = jnp.roll(u, (-s, -s), axis=(1, 2))
    mask = shift_attention_mask(h, w, ws, s) if s else None
    u = attn.spatial(window_partition(u, ws), mask)    # (B*T', nW, ws*ws, C)
    u = window_merge(u, ws, h, w)
    if s:
      u = jnp.roll(u, (s, s), axis=(1, 2))
    if self.s_adapter is not None:
      # Token-wise, so applying it after the window merge equals the official per-window call.
      u = self.s_adapter(name='S_Adapter2')(u)
    x = x + u.reshape(b, t, h, w, c)
    x = constrain(x, ('activation_batch', None, None, None, 'activation_embed'))

    xn = _layer_norm(self.ln_eps, self.dtype, self.param_dtype, 'norm2')(x)
    # fc1 (C -> 4C) -> exact GELU -> fc2, the official names.
    mlp = functools.partial(Mlp, int(c * self.mlp_ratio), act='gelu', in_name='fc1',
                            out_name='fc2', dtype=self.dtype, param_dtype=self.param_dtype,
                            name='mlp')
    if self.mlp_adapter is not None and self.fuse_joint_adapter:
      # As the ViT block: the MLP and the joint adapter as one MLP of width 4C + C/4.
      scale = drop_path.scale((b, t, h * w, c), self.drop_path_rate, self.deterministic)
      scale = (self.mlp_adapter_scale if scale is None
               else self.mlp_adapter_scale * scale.reshape(b, t, 1, 1, 1))   # per (clip, frame)
      x = vit.mlp_and_joint_adapter(mlp, functools.partial(self.mlp_adapter, name='S_Adapter'),
                                    'gelu', x, xn, scale, self.dtype)
    else:
      x = x + mlp()(xn)
      if self.mlp_adapter is not None:
        a = self.mlp_adapter_scale * self.mlp_adapter(name='S_Adapter')(xn)
        a = drop_path(a.reshape(b, t, h * w, c), self.drop_path_rate, self.deterministic)
        x = x + a.reshape(b, t, h, w, c)               # one draw per (clip, frame)
    return constrain(x, ('activation_batch', None, None, None, 'activation_embed'))


class PatchMerging(nn.Module):
  """2x2 neighbours -> channels [x(0,0), x(1,0), x(0,1), x(1,1)] (h, w offsets), norm, reduce."""
  ln_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    # x: (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), 2C)
    _n, h, w, c = x.shape
    if h % 2 or w % 2:
      x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                        axis=-1)
    x = _layer_norm(self.ln_eps, self.dtype, self.param_dtype, 'norm')(x)
    return nn.Dense(2 * c, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=LP(trunc_normal_02, ('mlp', 'embed')), name='reduction')(x)


class PatchEmbed3D(nn.Module):
  """Conv3d with kernel = stride = (pt, p, p) and bias, then LayerNorm (`proj`, `norm`)."""
  patch_size_t: int
  patch_size: int
  embed_dim: int
  ln_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    # x: (B, T, H, W, 3) -> (B, T', H', W', C)
    _, t, h, w, _ = x.shape
    pt, p = self.patch_size_t, self.patch_size
    # Official PatchEmbed3D zero-pads T, H, W at the end to multiples of the kernel.
    pad = [(0, 0), (0, -t % pt), (0, -h % p), (0, -w % p), (0, 0)]
    if any(hi for _, hi in pad):
      x = jnp.pad(x, pad)
    x = nn.Conv(self.embed_dim, (pt, p, p), strides=(pt, p, p), padding='VALID',
                dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=LP(init.lecun_normal(), (None, None, None, None, 'embed')),
                bias_init=LP(init.zeros, ('embed',)), name='proj')(x.astype(self.dtype))
    return _layer_norm(self.ln_eps, self.dtype, self.param_dtype, 'norm')(x)


class SwinStage(nn.Module):
  """`blocks_{j}` (keyword sets of `SwinBlock`), then `downsample` (PatchMerging) if set.

  Official (Microsoft) layout: the merge closes a stage, so stage s owns the
  merge into stage s+1 (timm puts it at the start of the next stage).
  """
  blocks: Sequence[dict]
  downsample: bool
  remat_policy: str = 'none'
  ln_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    # x: (B, T', H, W, C)
    block_cls = SwinBlock
    if self.remat_policy != 'none':
      policy = vit.remat_policy(self.remat_policy)
      block_cls = nn.remat(SwinBlock, policy=policy)
    for j, kw in enumerate(self.blocks):
      x = block_cls(**kw, name=f'blocks_{j}')(x)
      self.sow('intermediates', f'block{j}_out', x)
    if self.downsample:
      b, t, h, w, c = x.shape
      x = PatchMerging(self.ln_eps, self.dtype, self.param_dtype, name='downsample')(
          x.reshape(b * t, h, w, c))
      x = x.reshape(b, t, *x.shape[1:])                # (B, T', H/2, W/2, 2C)
      self.sow('intermediates', 'downsample_out', x)
    return x


class SwinTransformer(nn.Module):
  """Swin image encoder; AIM Swin with `adapters` set (see module docstring).

  Returns the final-`norm` feature map: `(N, r, r, C_last)` for images (timm's
  `forward_features`, NHWC) or `(B, T', r, r, C_last)` for videos (the
  official `(B, C, T', H, W)` channels-last); the I3D head averages T', H, W.

  Attributes (architecture): patch_size (spatial p), patch_size_t (pt),
    embed_dim, depths, num_heads, window_size, image_size, mlp_ratio,
    qkv_bias, ln_eps.
  Attributes (AIM): num_frames (input clip length T; T' = T / pt),
    t_relative (False adds an absolute `temporal_embedding` (1, T', C), the
    official alternative; the relative temporal bias is kept either way),
    adapters (AdapterSpec; `layers` index blocks globally over all stages),
    drop_path_rate (linspace over all blocks).
  Attributes (execution): remat_policy, dtype, param_dtype; scan_layers must
    be False (see module docstring).
  """
  patch_size: int = 4
  patch_size_t: int = 2
  embed_dim: int = 128
  depths: Sequence[int] = (2, 2, 18, 2)
  num_heads: Sequence[int] = (4, 8, 16, 32)
  window_size: int = 7
  image_size: int = 224
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  ln_eps: float = 1e-5
  t_relative: bool = True
  num_frames: int = 0
  adapters: AdapterSpec | None = None
  drop_path_rate: float = 0.0
  scan_layers: bool = False
  remat_policy: str = 'none'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # The joint adapter computed with the MLP as one wider MLP; None: on in half precision
  # (as VisionTransformer.fuse_joint_adapter).
  fuse_joint_adapter: bool | None = None

  @property
  def time_tokens(self) -> int:
    """T' = num_frames // pt (official num_Ttokens)."""
    return self.num_frames // self.patch_size_t

  def stage_geometry(self, stage: int) -> tuple[int, int, int]:
    """(resolution, window, shift of odd blocks) of a stage.

    Official rule: when the stage resolution is no larger than the window, the
    window shrinks to the resolution and no block shifts (Swin-B@224: stage 3).
    """
    res = (self.image_size // self.patch_size) // 2 ** stage
    if res <= self.window_size:
      return res, res, 0
    return res, self.window_size, self.window_size // 2

  def block_kwargs(self, stage: int, block: int, layer: int, rate: float,
                   deterministic: bool) -> dict:
    _res, window, shift = self.stage_geometry(stage)
    kw = dict(num_heads=self.num_heads[stage], window_size=window,
              shift_size=0 if block % 2 == 0 else shift, mlp_ratio=self.mlp_ratio,
              ln_eps=self.ln_eps, qkv_bias=self.qkv_bias, drop_path_rate=rate,
              deterministic=deterministic, dtype=self.dtype, param_dtype=self.param_dtype,
              fuse_joint_adapter=vit.fuse_joint_adapter(self.fuse_joint_adapter, self.dtype))
    if self.adapters is not None:
      fields = self.adapters.block_fields(layer, self.dtype, self.param_dtype)
      kw['s_adapter'] = fields['s_adapter']
      kw['mlp_adapter'] = fields['mlp_adapter']
      kw['mlp_adapter_scale'] = self.adapters.scale
      # Official: temporal attention only in the even (unshifted) blocks of a stage.
      if block % 2 == 0 and fields['t_adapter'] is not None:
        kw['t_adapter'] = fields['t_adapter']
        kw['temporal_frames'] = self.time_tokens
    return kw

  def _check(self):
    if self.scan_layers:
      raise ValueError('model.scan_layers is not supported by the Swin backbone (stages differ in '
                       'width and window; use remat_policy for memory)')
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f'swin.depths {tuple(self.depths)} and swin.num_heads '
                       f'{tuple(self.num_heads)} must have one entry per stage')
    if self.adapters is not None:
      if self.adapters.num_tadapter != 1:
        raise ValueError('the official AIM Swin has no T_Adapter_in: '
                         'adapters.num_tadapter must be 1')
      if self.adapters.temporal and self.time_tokens < 1:
        raise ValueError('temporal adapters need model.num_frames >= patch_size_t '
                         f'(got num_frames={self.num_frames}, patch_size_t={self.patch_size_t})')
    for stage in range(len(self.depths)):
      res, window, _ = self.stage_geometry(stage)
      if res % window:
        raise ValueError(f'stage {stage}: resolution {res} is not a multiple of the window '
                         f'{window} (image_size {self.image_size}, patch {self.patch_size})')

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    self._check()
    is_video = x.ndim == 5
    if not is_video:
      x = x[:, None]                                   # (N, H, W, C) -> (N, 1, H, W, C)
    _b, t, hh, ww, _c_in = x.shape
    if is_video and self.num_frames and t != self.num_frames:
      raise ValueError(
          f'input has {t} frames but the model was built with num_frames={self.num_frames} '
          '(model.num_frames must equal the data\'s clip length)')
    if hh != self.image_size or ww != self.image_size:
      raise ValueError(f'input is {hh}x{ww} but model.image_size is {self.image_size}')
    x = PatchEmbed3D(self.patch_size_t, self.patch_size, self.embed_dim, self.ln_eps,
                     self.dtype, self.param_dtype, name='patch_embed')(x)   # (B, T', r0, r0, C)
    if not self.t_relative and self.num_frames:
      temb = self.param('temporal_embedding', LP(init.zeros, (None, None, 'embed')),
                        (1, self.time_tokens, self.embed_dim), self.param_dtype)
      x = x + temb.astype(x.dtype)[:, :, None, None, :]
    x = constrain(x, ('activation_batch', None, None, None, 'activation_embed'))
    self.sow('intermediates', 'after_patch_embed', x)

    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    first = 0
    for s, depth in enumerate(self.depths):
      blocks = [self.block_kwargs(s, j, first + j, rates[first + j], not train)
                for j in range(depth)]
      x = SwinStage(blocks=tuple(blocks), downsample=s < len(self.depths) - 1,
                    remat_policy=self.remat_policy, ln_eps=self.ln_eps, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=f'layers_{s}')(x)
      first += depth
    x = _layer_norm(self.ln_eps, self.dtype, self.param_dtype, 'norm')(x)
    self.sow('intermediates', 'after_norm', x)
    return x if is_video else x[:, 0]
