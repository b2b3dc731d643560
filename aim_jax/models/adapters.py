"""AIM's bottleneck adapter, drop path, and the spec that says where adapters go.

One `Adapter` serves every backbone family (CLIP ViT, ImageNet-21K ViT, SigLIP,
DINOv2, Swin): the blocks take adapter *factories* as fields and build them by
name, so a block with no factories is the plain image block.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from aim_jax.models.norm import DenseActivation, DenseWeights, ScaledDense, gelu_exact

LP = nn.with_logical_partitioning
init = nn.initializers

# Official `_init_weights`: every nn.Linear is trunc_normal(std=.02) within +-2 (absolute
# bounds, i.e. +-100 std: effectively an untruncated normal at std .02).
trunc_normal_02 = init.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)

ModuleFactory = Callable[..., nn.Module]


class Adapter(nn.Module):
  """`D_fc1` -> exact-erf GELU -> `D_fc2`, optionally plus the input.

  Official init: `D_fc1` trunc_normal(.02), `D_fc2` weight and bias zero, so a
  skip adapter starts as the identity and a no-skip adapter as zero.

  Attributes:
    skip_connect: return `x + f(x)` (S_Adapter, T_Adapter_in) or `f(x)`
      (T_Adapter, MLP_Adapter).
    ratio: bottleneck width as a fraction of the input width, `int(D * ratio)`.
  """
  skip_connect: bool = True
  ratio: float = 0.25
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  # True: declare the parameters and return them, ((D_fc1 kernel, bias), (D_fc2 kernel,
  # bias)), without applying them (a block that fuses the joint adapter into its MLP).
  weights_only: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, input_offset: Optional[jax.Array] = None,
               input_kernel: Optional[jax.Array] = None,
               output_scale: Optional[jax.Array | float] = None,
               residual: Optional[jax.Array] = None) -> jax.Array:
    # input_offset: a bias vector c the caller left out of x (the attention's output bias):
    # the adapter of x + c, with c folded into D_fc1's bias and added to the skip branch,
    # so that no kernel adds c to x on its own.
    # input_kernel: a (F, D) projection P the caller left out of x (the attention's output
    # projection): the adapter of x @ P (+ c). D_fc1 reads x through P @ D_fc1.kernel, so
    # a no-skip adapter never forms x @ P (one (D, D) product fewer each way), and a skip
    # adapter forms it for the skip branch only.
    # output_scale: a factor for the output of a no-skip adapter (the joint adapter's scale,
    # drop path's mask / keep: a scalar or an array broadcast against the rows), applied to
    # the hidden and D_fc2's bias (norm.ScaledDense) rather than to the D-wide output.
    # residual: the residual stream the caller adds the output to: `residual + adapter(x)`
    # is returned, summed as D_fc2's product plus an addend (the skip branch plus the
    # stream, or the stream), the form in which XLA hands the sum to a cuBLAS product.
    if output_scale is not None and self.skip_connect:
      raise ValueError('Adapter: output_scale is for adapters without a skip connection')
    width = x.shape[-1] if input_kernel is None else input_kernel.shape[-1]
    hidden = int(width * self.ratio)
    fc1_init = dict(kernel_init=LP(trunc_normal_02, ('embed', 'adapter')),
                    bias_init=LP(init.zeros, ('adapter',)))
    fc2_init = dict(kernel_init=LP(init.zeros, ('adapter', 'embed')),
                    bias_init=LP(init.zeros, ('embed',)))
    if self.weights_only:
      return (DenseWeights(hidden, param_dtype=self.param_dtype, name='D_fc1', **fc1_init)(width),
              DenseWeights(width, param_dtype=self.param_dtype, name='D_fc2', **fc2_init)(hidden))
    # Exact erf GELU (torch nn.GELU()); jax.nn.gelu's default tanh form is off by ~1e-4.
    # The backward pass keeps D_fc1's product only (norm.DenseActivation).
    h = DenseActivation(hidden, activation=gelu_exact, dtype=self.dtype,
                        param_dtype=self.param_dtype, name='D_fc1',
                        **fc1_init)(x, input_offset, input_kernel)
    fc2 = ScaledDense(width, dtype=self.dtype, param_dtype=self.param_dtype, name='D_fc2',
                      **fc2_init)
    if not self.skip_connect:
      return fc2(h, output_scale, addend=residual)
    h = fc2(h, output_scale)
    if input_kernel is not None:
      x_in, p = promote_dtype(x, input_kernel, dtype=self.dtype)
      x = jnp.einsum('...f,fd->...d', x_in, p)
    skip = x if input_offset is None else x + input_offset.astype(x.dtype)
    if residual is not None:
      skip = residual + skip
    return skip + h


class DropPath(nn.Module):
  """Stochastic depth with a selectable mask granularity.

  Activations are `(B, T, L, D)`. `mode` says which axes get independent draws:
    'token':  one draw per token position L, shared by every clip and frame of the
              batch. Official ViT_CLIP quirk: timm DropPath on sequence-first
              `(L, B*T, D)` tensors (vit_clip.py).
    'frame':  one draw per (clip, frame). Official ViT_ImageNet (batch-first `(B*T, N, D)`).
    'sample': one draw per clip, the textbook stochastic depth.
  Identity when `deterministic` or the rate is 0. The rate may be a traced scalar
  (under `nn.scan` each layer gets its own rate). `valid_len`: the real tokens of a
  token axis padded after them; 'token' draws for those only (the same draws as
  without padding) and keeps the padding.
  """
  mode: str = 'token'

  @nn.compact
  def __call__(self, x: jax.Array, rate, deterministic: bool,
               valid_len: Optional[int] = None) -> jax.Array:
    drawn = self._draw(x.shape, rate, deterministic, valid_len)
    if drawn is None:
      return x
    mask, keep = drawn
    # x / keep * mask (timm's order): the backward pass keeps the small mask, not an
    # activation-sized boolean.
    return x / keep.astype(x.dtype) * mask.astype(x.dtype)

  def scale(self, shape: Sequence[int], rate, deterministic: bool,
            valid_len: Optional[int] = None) -> Optional[jax.Array]:
    """The factor `__call__` would multiply an activation of `shape` by: `mask / keep`
    (float32, broadcastable to `shape`), the same draw as `__call__` in its place, or None
    where drop path is the identity. For a caller that applies it elsewhere (an adapter's
    hidden, `Adapter(output_scale=)`)."""
    drawn = self._draw(shape, rate, deterministic, valid_len)
    if drawn is None:
      return None
    mask, keep = drawn
    return mask.astype(jnp.float32) / keep

  def _draw(self, shape, rate, deterministic, valid_len):
    """(mask, keep) for an activation of `shape`, or None where drop path is the identity."""
    if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
      return None
    b, t, tokens, _ = shape
    lv = tokens if valid_len is None else valid_len
    draws = {'token': (1, 1, lv, 1), 'frame': (b, t, 1, 1), 'sample': (b, 1, 1, 1)}
    if self.mode not in draws:
      raise ValueError(f"drop_path_mode must be one of {sorted(draws)}, got {self.mode!r}")
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, draws[self.mode])
    if self.mode == 'token' and lv != tokens:
      mask = jnp.pad(mask, ((0, 0), (0, 0), (0, tokens - lv), (0, 0)), constant_values=True)
    return mask, keep


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """Which AIM adaptations to inject, and where.

  Attributes:
    spatial: `S_Adapter` (skip) after the spatial attention.
    temporal: the temporal branch: frozen attention re-used along time plus
      `T_Adapter` (no skip). `num_tadapter=2` adds `T_Adapter_in` (skip) before
      the attention (the official SSv2 variant).
    joint: `MLP_Adapter` (no skip) parallel to the frozen MLP, times `scale`.
    ratio: bottleneck ratio (Table 8 of the paper): hidden = int(D * ratio).
    scale: joint adapter scale `s` (0.5 K400, 1.0 SSv2).
    layers: indices of the adapted blocks (Table 7); None = every block.
  """
  spatial: bool = True
  temporal: bool = True
  joint: bool = True
  num_tadapter: int = 1
  ratio: float = 0.25
  scale: float = 0.5
  layers: Optional[Sequence[int]] = None

  def __post_init__(self):
    if self.num_tadapter not in (1, 2):
      raise ValueError(f'AdapterSpec.num_tadapter must be 1 or 2, got {self.num_tadapter}')
    if self.layers is not None:
      object.__setattr__(self, 'layers', tuple(int(i) for i in self.layers))

  def applies_to(self, layer: int) -> bool:
    return self.layers is None or layer in self.layers

  def block_fields(self, layer: int, dtype=jnp.float32, param_dtype=jnp.float32) -> dict:
    """The adapter fields of block `layer` (all None for an unadapted block)."""
    none = dict(s_adapter=None, t_adapter=None, t_adapter_in=None, mlp_adapter=None)
    if not self.applies_to(layer):
      return none
    make = functools.partial(Adapter, ratio=self.ratio, dtype=dtype, param_dtype=param_dtype)
    fields = dict(none)
    if self.spatial:
      fields['s_adapter'] = functools.partial(make, skip_connect=True)
    if self.temporal:
      fields['t_adapter'] = functools.partial(make, skip_connect=False)
      if self.num_tadapter == 2:
        fields['t_adapter_in'] = functools.partial(make, skip_connect=True)
    if self.joint:
      fields['mlp_adapter'] = functools.partial(make, skip_connect=False)
    return fields


def layer_selection(kind: str, num_layers: int, count: int = 0) -> Optional[tuple]:
  """Adapter positions of Table 7: 'all', 'bottom' k, 'top' k, 'every_other'."""
  if kind == 'all':
    return None
  if kind == 'bottom':
    return tuple(range(count))
  if kind == 'top':
    return tuple(range(num_layers - count, num_layers))
  if kind == 'every_other':
    return tuple(range(0, num_layers, 2))
  raise ValueError("adapters.position must be 'all', 'bottom', 'top' or 'every_other', "
                   f'got {kind!r}')
