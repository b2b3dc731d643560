"""Model configs -> Flax modules.

A model config is a flat-ish mapping (ml_collections ConfigDict or dict) with
exactly the keys of `default_model_config()`; unknown keys are an error that
names the key (a misspelt field must never be silently ignored).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from absl import logging

from aim_jax.errors import is_int, is_number
from aim_jax.models import attention_choice, kernel_choice
from aim_jax.models.adapters import AdapterSpec, layer_selection
from aim_jax.models.attention_choice import AUTO
from aim_jax.models.norm import MLP_IMPLS, NORM_IMPLS
from aim_jax.models.aim import VideoClassifier, inject
from aim_jax.models.swin import SwinTransformer
from aim_jax.models import vit
from aim_jax.models.vit import FAMILIES, TEMPORAL_ATTENTION, VisionTransformer

# Width, depth, heads by ViT size (Dosovitskiy et al. 2021, Table 1; CLIP uses the same).
VIT_SIZES = {
    'Ti': (192, 12, 3), 'S': (384, 12, 6), 'B': (768, 12, 12), 'L': (1024, 24, 16),
    'H': (1280, 32, 16), 'g': (1408, 40, 16), 'So400m': (1152, 27, 16),
}

# The fields that decide the parameter tree (its names and shapes), one list for every
# check: init_from, resume, evaluation against a checkpoint, conversion.
ARCH_FIELDS = ('backbone', 'width', 'layers', 'heads', 'patch_size', 'mlp_ratio')

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def default_model_config() -> dict:
  """Every model field with its default (ViT-B/16 CLIP, AIM K400 8 frames)."""
  return dict(
      backbone='clip',          # 'clip' | 'clip_gelu' | 'vit_in21k' | 'siglip' | 'dinov2' | ...
      variant='',               # e.g. 'B/16', 'L/14'; overrides width/layers/heads/patch_size
      patch_size=16, width=768, layers=12, heads=12, image_size=224, mlp_ratio=4.0,
      output_dim=0,             # CLIP image projection (0 = none; AIM drops it)
      num_frames=8,
      num_classes=400,
      dropout_rate=0.5,         # I3D head dropout
      drop_path_rate=0.2,
      drop_path_mode='',        # '' = the family's official mode ('token' CLIP, 'frame' IN-21K)
      adapters=dict(
          enabled=True,         # False: frozen image model + temporal embedding + head
          spatial=True, temporal=True, joint=True,
          num_tadapter=1, ratio=0.25, scale=0.5,
          position='all',       # 'all' | 'bottom' | 'top' | 'every_other' (Table 7)
          position_count=0,     # k for 'bottom' / 'top'
      ),
      scan_layers=False,
      remat_policy='none',      # 'none' | 'full' | any jax.checkpoint_policies name
      dtype='float32',          # compute dtype; params stay param_dtype
      param_dtype='float32',
      # 'auto' (on NVIDIA GPUs in bf16/fp16 the first of cuDNN, the Pallas flash attention
      # to pass a device check, else XLA: models/attention_choice.py) | 'xla' (or '') |
      # 'cudnn' | 'pallas' (vit.ATTENTION_IMPLS)
      attention_impl='auto',
      # Token padding for fused attention kernels (models/vit.py token_padding):
      # multiple 0 = the implementation's need (1 XLA, 8 cuDNN, 32 Pallas); mode
      # 'stream' pads once after ln_pre, 'call' pads inside each spatial attention.
      attention_pad_multiple=0,
      attention_pad_mode='stream',
      # 'auto' (the attention kernel's layout) | 'fused' one (D, 3D) product | 'split' q, k, v
      qkv_projection='auto',
      # How the temporal branch attends over T (same numbers each way, see
      # models/vit.py MultiHeadAttention): 'einsum' batched dots on the (B, T, L, D)
      # layout | 'elementwise' multiplies and sums, no dots, no transposes | 'pallas' the
      # same in one Pallas kernel each way (models/temporal_kernel.py) |
      # 'dot_product_attention': L folded into the heads, through attention_impl; 'auto':
      # the attention kernel's choice (attention_choice.COMPANIONS).
      temporal_attention='auto',
      # The frozen MLP and the joint adapter beside it: 'auto' (one MLP of width 4D + D/4
      # in bf16/fp16, the separate modules in float32) | 'fused' | 'separate'. Same
      # parameters and function (models/norm.py mlp_with_adapter).
      joint_mlp='auto',
      # The LayerNorms that read a ViT block's residual stream (ln_1, ln_2): 'auto' (XLA
      # since the H200 timed the Pallas kernels slower: models/kernel_choice.py) | 'xla' |
      # 'pallas': one Pallas Triton kernel each way, the stream's gradient added in the
      # backward kernel (models/fused_norm.py). Same parameters and function.
      norm_impl='auto',
      # The fused MLP's first product and its activations (joint_mlp fused, half
      # precision): 'auto' (XLA: the H200 timed it slower, models/kernel_choice.py) | 'xla' |
      # 'pallas': one Pallas Triton kernel with the bias and activations in the product's
      # epilogue (models/fused_mlp.py). Same parameters and function.
      mlp_impl='auto',
      # backbone='swin' only (width/layers/heads/variant are unused; patch_size is p).
      swin=dict(
          embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),   # Swin-B
          window_size=7,
          patch_size_t=2,       # Conv3d time kernel pt: T' = num_frames / pt
          t_relative=True,      # False: absolute temporal_embedding (official option)
      ),
  )


def _as_dict(cfg: Any) -> dict:
  if hasattr(cfg, 'to_dict'):
    return cfg.to_dict()
  return copy.deepcopy(dict(cfg))


# model.joint_mlp -> the encoders' fuse_joint_adapter (None: by the compute dtype).
JOINT_MLP = {AUTO: None, 'fused': True, 'separate': False}


def _check_ranges(out: Mapping) -> None:
  """Sizes and rates a model can be built with; each bad value names its field."""
  def fail(field: str, value: Any, want: str) -> None:
    raise ValueError(f'model.{field}={value!r} must be {want}')
  for k in ('width', 'layers', 'heads', 'patch_size', 'image_size', 'num_frames', 'num_classes'):
    if not is_int(out[k]) or out[k] < 1:
      fail(k, out[k], 'a positive integer')
  if out['backbone'] != 'swin' and out['image_size'] % out['patch_size']:
    fail('image_size', out['image_size'], f'a multiple of model.patch_size={out["patch_size"]}')
  if not is_int(out['output_dim']) or out['output_dim'] < 0:
    fail('output_dim', out['output_dim'], '>= 0 (0 = no projection)')
  if not (is_number(out['mlp_ratio']) and out['mlp_ratio'] > 0):
    fail('mlp_ratio', out['mlp_ratio'], '> 0')
  for k in ('dropout_rate', 'drop_path_rate'):
    if not (is_number(out[k]) and 0 <= out[k] < 1):
      fail(k, out[k], 'in [0, 1)')
  a = out['adapters']
  if not (is_number(a['ratio']) and a['ratio'] > 0):
    fail('adapters.ratio', a['ratio'], '> 0 (the bottleneck width over model.width)')
  if not is_number(a['scale']):
    fail('adapters.scale', a['scale'], 'a finite number')
  if not is_int(a['num_tadapter']) or a['num_tadapter'] not in (1, 2):
    fail('adapters.num_tadapter', a['num_tadapter'], '1 or 2')


def resolve_model_config(cfg: Mapping | Any) -> dict:
  """Fill defaults, check for unknown keys, decode the variant."""
  given = _as_dict(cfg)
  out = default_model_config()
  for key, value in given.items():
    if key not in out:
      raise KeyError(f'unknown model config field model.{key!s} '
                     f'(known: {", ".join(sorted(out))})')
    if key in ('adapters', 'swin'):
      value = dict(value)
      for k in value:
        if k not in out[key]:
          raise KeyError(f'unknown model config field model.{key}.{k} '
                         f'(known: {", ".join(sorted(out[key]))})')
      out[key].update(value)
    else:
      out[key] = value
  if out['variant'] and out['backbone'] == 'swin':
    raise ValueError(f'model.variant {out["variant"]!r} names a ViT size; a Swin is sized by '
                     'model.swin.* and model.patch_size (set model.variant to \'\')')
  if out['variant']:
    size, _, patch = str(out['variant']).partition('/')
    if size not in VIT_SIZES or not patch.isdigit():
      raise ValueError(f'model.variant {out["variant"]!r} is not SIZE/PATCH with SIZE in '
                       f'{sorted(VIT_SIZES)}')
    sized = dict(zip(('width', 'layers', 'heads'), VIT_SIZES[size]), patch_size=int(patch))
    defaults = default_model_config()
    for k, v in sized.items():
      # An explicit value that contradicts the variant is an error, not an override.
      if k in given and given[k] != defaults[k] and given[k] != v:
        raise ValueError(f'model.variant {out["variant"]!r} means model.{k}={v}, but '
                         f'model.{k}={given[k]!r} is also set: set model.variant=\'\' to size '
                         'the model by width/layers/heads/patch_size, or drop the field')
    out.update(sized)
  for k in ('depths', 'num_heads'):   # JSON round trips give lists
    out['swin'][k] = tuple(int(v) for v in out['swin'][k])
  if out['backbone'] not in ENCODERS:
    raise ValueError(f'model.backbone {out["backbone"]!r} is not one of {sorted(ENCODERS)}')
  _check_ranges(out)
  if out['width'] % out['heads']:
    raise ValueError(f'model.width {out["width"]} is not divisible by model.heads {out["heads"]}')
  for k in ('dtype', 'param_dtype'):
    if out[k] not in DTYPES:
      raise ValueError(f'model.{k} must be one of {sorted(DTYPES)}, got {out[k]!r}')
  if out['temporal_attention'] not in TEMPORAL_ATTENTION + (AUTO,):
    raise ValueError(f'model.temporal_attention must be one of '
                     f'{list(TEMPORAL_ATTENTION + (AUTO,))}, got {out["temporal_attention"]!r}')
  if out['attention_impl'] != AUTO:
    vit.check_attention_impl(out['attention_impl'])
  if out['remat_policy'] != 'none':
    vit.remat_policy(out['remat_policy'])
  if out['attention_pad_multiple'] < 0:
    raise ValueError(f'model.attention_pad_multiple must be >= 0, got '
                     f'{out["attention_pad_multiple"]}')
  for k, allowed in (('attention_pad_mode', vit.PAD_MODES),
                     ('qkv_projection', vit.QKV_PROJECTIONS + (AUTO,)),
                     ('joint_mlp', tuple(JOINT_MLP)),
                     ('norm_impl', NORM_IMPLS + (AUTO,)),
                     ('mlp_impl', MLP_IMPLS + (AUTO,))):
    if out[k] not in allowed:
      raise ValueError(f'model.{k} must be one of {list(allowed)}, got {out[k]!r}')
  if out['backbone'] == 'swin' and out['norm_impl'] not in (AUTO, 'xla'):
    raise ValueError(f"model.norm_impl={out['norm_impl']!r} is for ViT backbones; a Swin's "
                     "norms are XLA's (set model.norm_impl to 'auto')")
  if out['mlp_impl'] == 'pallas' and not vit.fuse_joint_adapter(JOINT_MLP[out['joint_mlp']],
                                                                 DTYPES[out['dtype']]):
    raise ValueError(f"model.mlp_impl='pallas' runs the fused joint MLP's first product, which "
                     f"model.joint_mlp={out['joint_mlp']!r} with model.dtype={out['dtype']!r} "
                     "does not use: set model.joint_mlp='fused' (or 'auto' with bfloat16)")
  if out['backbone'] == 'swin' and out['mlp_impl'] not in (AUTO, 'xla'):
    raise ValueError(f"model.mlp_impl={out['mlp_impl']!r} is for ViT backbones; a Swin's "
                     "MLPs are XLA's (set model.mlp_impl to 'auto')")
  return out


def norm_impl(cfg: Mapping) -> str:
  """model.norm_impl made concrete ('auto': 'xla')."""
  return 'xla' if cfg['norm_impl'] == AUTO else cfg['norm_impl']


def mlp_impl(cfg: Mapping) -> str:
  """model.mlp_impl made concrete ('auto': 'xla')."""
  return 'xla' if cfg['mlp_impl'] == AUTO else cfg['mlp_impl']


def adapter_spec(cfg: Mapping) -> AdapterSpec | None:
  a = cfg['adapters']
  if not a['enabled'] or not (a['spatial'] or a['temporal'] or a['joint']):
    return None
  check_adapter_position(a['position'], a['position_count'], num_blocks(cfg))
  return AdapterSpec(
      spatial=a['spatial'], temporal=a['temporal'], joint=a['joint'],
      num_tadapter=a['num_tadapter'], ratio=a['ratio'], scale=a['scale'],
      layers=layer_selection(a['position'], num_blocks(cfg), a['position_count']))


def check_adapter_position(position: str, count: int, blocks: int) -> None:
  """'bottom'/'top' need 1 <= position_count <= blocks; the others take no count.

  Without this, 'bottom' with the default count 0 adapts no block at all and a
  count above the depth is silently clamped to every block.
  """
  if position in ('bottom', 'top'):
    if not 1 <= count <= blocks:
      raise ValueError(f'model.adapters.position_count={count} must be in 1..{blocks} (the '
                       f'number of blocks) with model.adapters.position={position!r}')
  elif count:
    raise ValueError(f'model.adapters.position_count={count} is only used with '
                     f"model.adapters.position 'bottom' or 'top', not {position!r}: set it to 0")


def num_blocks(cfg: Mapping) -> int:
  """Blocks that adapter positions index: all stages' blocks for Swin."""
  if cfg['backbone'] == 'swin':
    return int(sum(cfg['swin']['depths']))
  return cfg['layers']


def build_vit_encoder(cfg: Mapping) -> VisionTransformer:
  """The plain image encoder of a ViT family (no adapters, no temporal embedding)."""
  family = dict(FAMILIES[cfg['backbone']])
  if cfg['drop_path_mode']:
    family['drop_path_mode'] = cfg['drop_path_mode']
  return VisionTransformer(
      patch_size=cfg['patch_size'], width=cfg['width'], layers=cfg['layers'],
      heads=cfg['heads'], image_size=cfg['image_size'], mlp_ratio=cfg['mlp_ratio'],
      output_dim=cfg['output_dim'] or None, drop_path_rate=cfg['drop_path_rate'],
      scan_layers=cfg['scan_layers'], remat_policy=cfg['remat_policy'],
      dtype=DTYPES[cfg['dtype']], param_dtype=DTYPES[cfg['param_dtype']],
      attention_impl=cfg['attention_impl'] or None,
      temporal_attention=cfg['temporal_attention'], qkv_projection=cfg['qkv_projection'],
      attention_pad_multiple=cfg['attention_pad_multiple'],
      attention_pad_mode=cfg['attention_pad_mode'],
      fuse_joint_adapter=JOINT_MLP[cfg['joint_mlp']], norm_impl=norm_impl(cfg),
      mlp_impl=mlp_impl(cfg), **family)


def build_swin_encoder(cfg: Mapping) -> SwinTransformer:
  """The plain 2D Swin image encoder (aim_jax.models.swin)."""
  sw = cfg['swin']
  return SwinTransformer(
      patch_size=cfg['patch_size'], patch_size_t=sw['patch_size_t'], embed_dim=sw['embed_dim'],
      depths=tuple(sw['depths']), num_heads=tuple(sw['num_heads']),
      window_size=sw['window_size'], image_size=cfg['image_size'], mlp_ratio=cfg['mlp_ratio'],
      t_relative=sw['t_relative'], drop_path_rate=cfg['drop_path_rate'],
      scan_layers=cfg['scan_layers'], remat_policy=cfg['remat_policy'],
      dtype=DTYPES[cfg['dtype']], param_dtype=DTYPES[cfg['param_dtype']],
      fuse_joint_adapter=JOINT_MLP[cfg['joint_mlp']])


# Backbone families: name -> function(resolved config) -> image encoder definition.
ENCODERS: dict[str, Callable[[Mapping], Any]] = {
    'clip': build_vit_encoder,
    'clip_gelu': build_vit_encoder,     # OpenCLIP with exact GELU (LAION), else as 'clip'
    'vit_in21k': build_vit_encoder,
    'swin': build_swin_encoder,         # 2D Swin (Table 6), aim_jax.models.swin
    'siglip': build_vit_encoder,        # SigLIP / SigLIP 2 image tower, MAP pooling
    'dinov2': build_vit_encoder,        # DINOv2 (layer scale)
    'dinov2_reg': build_vit_encoder,    # DINOv2 with 4 register tokens
}


def build_encoder(cfg: Mapping | Any, platform: Optional[str] = None, check: bool = True):
  """The image encoder; 'auto' attention fields are chosen for `platform` (default: JAX's
  default backend), `check=False` without running the cuDNN check (attention_choice)."""
  given = resolve_model_config(cfg)
  platform = platform or jax.default_backend()
  cfg = attention_choice.choose(given, platform, check)
  cfg = kernel_choice.choose(cfg, platform, check, mlp_fusable=vit.fuse_joint_adapter(
      JOINT_MLP[cfg['joint_mlp']], DTYPES[cfg['dtype']]))
  for label, fields in (('attention', attention_choice.FIELDS), ('kernels', kernel_choice.FIELDS)):
    chosen = attention_choice.describe(given, cfg, fields)
    if chosen and platform == 'gpu':
      logging.info('%s: %s', label, chosen)
  if cfg['backbone'] not in ENCODERS:
    raise ValueError(f'model.backbone {cfg["backbone"]!r} is not one of {sorted(ENCODERS)}')
  for field, impl in (('norm_impl', norm_impl(cfg)), ('mlp_impl', mlp_impl(cfg))):
    if impl == 'pallas' and platform not in ('gpu', 'cpu'):
      raise ValueError(f"model.{field}='pallas' runs Triton kernels (NVIDIA GPUs; on a CPU, "
                       f"Pallas's interpreter), not on {platform!r}: set model.{field} to "
                       "'auto'")
  return ENCODERS[cfg['backbone']](cfg)


def build_model(cfg: Mapping | Any, platform: Optional[str] = None,
                check: bool = True) -> VideoClassifier:
  """The AIM video classifier a model config describes (`platform`, `check`: build_encoder)."""
  cfg = resolve_model_config(cfg)
  encoder = build_encoder(cfg, platform, check)
  backbone = inject(encoder, adapter_spec(cfg), cfg['num_frames'])
  return VideoClassifier(backbone=backbone, num_classes=cfg['num_classes'],
                         dropout_rate=cfg['dropout_rate'])


def input_shape(cfg: Mapping | Any, batch: int = 1) -> tuple:
  cfg = resolve_model_config(cfg)
  return (batch, cfg['num_frames'], cfg['image_size'], cfg['image_size'], 3)
