"""Swin checkpoints <-> `aim_jax.models.swin.SwinTransformer` params.

Three source layouts, one set of names (official = Microsoft's, the ones our
module uses, so the mapping only renames and transposes):

  * official AIM (`SwinTransformer2D_Adapter` recognizer): `backbone.*`,
    `cls_head.fc_cls.*`; Conv3d patch embedding; exact round trip, buffers
    (`relative_position_index`, `t_relative_coords`, `attn_mask`) checked on
    the way in and regenerated on the way out;
  * Microsoft 2D Swin (`{'model': sd}`, swin_base_patch4_window7_224_22k.pth):
    the Conv2d patch embedding is inflated to Conv3d as the official AIM code
    does (repeat along a new time axis, divide by pt);
  * timm `swin_*` state dicts: PatchMerging sits at the start of stage s+1
    (`layers.{s+1}.downsample`) instead of the end of stage s, the head is
    `head.fc`; buffers are not persistent.

Torch -> Flax: Linear weight (out, in) -> kernel (in, out) = W.T;
Conv3d weight (C, 3, pt, p, p) -> kernel (pt, p, p, 3, C); LayerNorm weight ->
scale; bias tables, biases and embeddings unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from aim_jax import params as P
from aim_jax.convert.registry import Format, Report, register
from aim_jax.models import swin as swin_lib
from aim_jax.errors import ConversionError

# Module names whose `.weight` is a LayerNorm scale.
_NORM = re.compile(r'(^|\.)(norm|norm1|norm2)$')
_BUFFERS = ('relative_position_index', 't_relative_coords', 'attn_mask')


def _is_buffer(key: str) -> bool:
  return key.rsplit('.', 1)[-1] in _BUFFERS


def _our_module(module: str) -> str:
  """'layers.1.blocks.0.attn.qkv' -> 'layers_1/blocks_0/attn/qkv'."""
  module = re.sub(r'(^|\.)layers\.(\d+)', r'\1layers_\2', module)
  module = re.sub(r'(^|\.)blocks\.(\d+)', r'\1blocks_\2', module)
  return module.replace('.', '/')


def _torch_module(name: str) -> str:
  name = re.sub(r'(^|/)layers_(\d+)', r'\1layers.\2', name)
  name = re.sub(r'(^|/)blocks_(\d+)', r'\1blocks.\2', name)
  return name.replace('/', '.')


def encoder_from_state_dict(sd: Mapping[str, Any], report: Report | None = None,
                            prefix: str = '') -> dict:
  """Official-named Swin backbone tensors -> encoder params; buffers are skipped.

  Keys that are neither parameters nor buffers go to `report.unused`.
  `prefix` is prepended to key names in the report ('backbone.').
  """
  report = report if report is not None else Report()
  flat = {}
  for key, value in sd.items():
    value = np.asarray(value)
    if _is_buffer(key):
      continue
    if key.endswith(('relative_position_bias_table', 'temporal_position_bias_table')) \
        or key == 'temporal_embedding':
      name = _our_module(key)
    elif key == 'patch_embed.proj.weight':
      if value.ndim != 5:
        raise ConversionError(f'key {prefix}{key}: expected a Conv3d weight (C, 3, pt, p, p), '
                              f'got shape {value.shape}')
      name, value = 'patch_embed/proj/kernel', value.transpose(2, 3, 4, 1, 0)
    elif key.endswith('.weight'):
      module = key[:-len('.weight')]
      if _NORM.search(module):
        name = _our_module(module) + '/scale'
      else:
        if value.ndim != 2:
          raise ConversionError(f'key {prefix}{key}: expected a Linear weight, got {value.shape}')
        name, value = _our_module(module) + '/kernel', value.T
    elif key.endswith('.bias'):
      name = _our_module(key[:-len('.bias')]) + '/bias'
    else:
      report.unused.append(prefix + key)
      continue
    if not (name.startswith(('patch_embed/', 'layers_', 'norm/')) or name == 'temporal_embedding'):
      report.unused.append(prefix + key)
      continue
    flat[name] = np.ascontiguousarray(value)
    report.mapped.append((prefix + key, name))
  return P.unflatten(flat)


def encoder_to_state_dict(params: Mapping) -> dict[str, np.ndarray]:
  """Encoder params -> official-named tensors (no buffers); exact inverse."""
  out = {}
  for name, value in P.flatten(params).items():
    value = np.asarray(value)
    module, leaf = name.rsplit('/', 1) if '/' in name else ('', name)
    if leaf in ('relative_position_bias_table', 'temporal_position_bias_table',
                'temporal_embedding'):
      out[_torch_module(name)] = value
    elif name == 'patch_embed/proj/kernel':
      out['patch_embed.proj.weight'] = np.ascontiguousarray(value.transpose(4, 3, 0, 1, 2))
    elif leaf == 'kernel':
      out[_torch_module(module) + '.weight'] = np.ascontiguousarray(value.T)
    elif leaf == 'scale':
      out[_torch_module(module) + '.weight'] = value
    elif leaf == 'bias':
      out[_torch_module(module) + '.bias'] = value
    else:
      raise ConversionError(f'parameter {name!r} has no official name')
  return out


def buffers(model_config: Mapping) -> dict[str, np.ndarray]:
  """The persistent buffers the official backbone stores, computed from the config."""
  enc = encoder_definition(model_config)
  spec = _adapter_flags(model_config)
  out = {}
  for s, depth in enumerate(enc.depths):
    res, window, shift = enc.stage_geometry(s)
    for j in range(depth):
      pre = f'layers.{s}.blocks.{j}.'
      out[pre + 'attn.relative_position_index'] = swin_lib.relative_position_index(window)
      if j % 2 == 0 and spec['temporal']:
        tt = model_config['num_frames'] // enc.patch_size_t
        out[pre + 'attn.t_relative_coords'] = swin_lib.temporal_position_index(tt).reshape(-1)
      if j % 2 == 1 and shift:
        out[pre + 'attn_mask'] = swin_lib.shift_attention_mask(res, res, window, shift)
  return out


def _adapter_flags(cfg: Mapping) -> dict:
  a = cfg['adapters']
  on = a['enabled']
  return dict(temporal=on and a['temporal'], spatial=on and a['spatial'], joint=on and a['joint'])


def encoder_definition(model_config: Mapping):
  from aim_jax.models.factory import build_encoder
  return build_encoder(model_config)


# ---------------------------------------------------------------------------
# Architecture inference.

def _infer_swin(sd: Mapping[str, Any], timm_layout: bool = False) -> dict:
  """Swin fields from official/Microsoft-named tensors (no `backbone.` prefix)."""
  if 'patch_embed.proj.weight' not in sd:
    raise ConversionError("missing key 'patch_embed.proj.weight' (not a Swin checkpoint?)")
  w = np.shape(sd['patch_embed.proj.weight'])
  embed_dim, patch = int(w[0]), int(w[-1])
  pt = int(w[2]) if len(w) == 5 else 1
  depths = {}
  for k in sd:
    m = re.match(r'^layers\.(\d+)\.blocks\.(\d+)\.', k)
    if m:
      s, j = int(m.group(1)), int(m.group(2))
      depths[s] = max(depths.get(s, 0), j + 1)
  if not depths or sorted(depths) != list(range(len(depths))):
    raise ConversionError(f'layers.*.blocks.* keys give stages {sorted(depths)}: not a Swin')
  heads, windows = [], []
  for s in range(len(depths)):
    key = f'layers.{s}.blocks.0.attn.relative_position_bias_table'
    if key not in sd:
      raise ConversionError(f'missing key {key!r}')
    rows, nh = np.shape(sd[key])
    heads.append(int(nh))
    ws = (round(np.sqrt(rows)) + 1) // 2
    if (2 * ws - 1) ** 2 != rows:
      raise ConversionError(f'key {key}: {rows} rows is not (2ws-1)^2')
    windows.append(ws)
  window = max(windows)                                  # the last stages may have shrunk
  image_size, why = _implied_image_size(sd, windows, patch)
  mlp = np.shape(sd.get('layers.0.blocks.0.mlp.fc1.weight', np.zeros((4 * embed_dim, 1))))[0]
  return dict(patch_size=patch, image_size=image_size, image_size_why=why,
              mlp_ratio=float(mlp / embed_dim),
              swin=dict(embed_dim=embed_dim, depths=tuple(depths[s] for s in range(len(depths))),
                        num_heads=tuple(heads), window_size=int(window), patch_size_t=pt,
                        t_relative='temporal_embedding' not in sd))


def _implied_image_size(sd: Mapping[str, Any], windows: list, patch: int
                        ) -> tuple[int | None, str]:
  """The input resolution the tensors imply, or (None, '') where none does.

  The stage-0 shift mask (a persistent buffer in Microsoft's and the official AIM
  files) holds (r0 / ws)^2 windows. A stage whose window is smaller than the others
  shrank to its resolution (official rule: window = resolution when the stage is no
  larger than the window), so r_s = its window and r0 = r_s * 2^s.
  """
  window = max(windows)
  mask = sd.get('layers.0.blocks.1.attn_mask')
  if mask is not None:
    size = round(np.sqrt(np.shape(mask)[0])) * window * patch
    return int(size), f'the shift mask layers.0.blocks.1.attn_mask ({np.shape(mask)[0]} windows)'
  for s, ws in enumerate(windows):
    if ws < window:
      return int(ws * 2 ** s * patch), (f'stage {s}\'s window {ws} (smaller than {window}: '
                                        f'the stage resolution)')
  return None, ''


def _source_image_size(fields: dict, given: int | None, report: Report) -> None:
  """Fix fields['image_size']: given (read from a config by the caller), else implied by the
  tensors, else 224 with a notice; a given size the tensors contradict is an error."""
  implied, why = fields.pop('image_size'), fields.pop('image_size_why')
  if given is not None:
    if implied is not None and implied != given:
      raise ConversionError(f'the recorded image_size {given} contradicts {why}, which means '
                            f'{implied}')
    fields['image_size'] = int(given)
  elif implied is not None:
    fields['image_size'] = implied
    report.notices.append(f'image_size={implied} read from {why}')
  else:
    fields['image_size'] = 224
    report.notices.append('image_size=224 assumed: no config, shift mask or window records it; '
                          'pass --image-size')


def _model_config(fields: Mapping, **extra) -> dict:
  from aim_jax.models.factory import resolve_model_config
  cfg = dict(backbone='swin', **fields)
  cfg.update(extra)
  return resolve_model_config(cfg)


def infer_aim_config(sd: Mapping[str, Any], num_frames: int | None = None,
                     adapter_scale: float | None = None, image_size: int | None = None,
                     report: Report | None = None) -> dict:
  """Model config of an official AIM Swin recognizer state dict.

  T' comes from the temporal bias table (2T'-1 rows) or `temporal_embedding`;
  `num_frames` = T' * pt. The joint scale defaults to the official hard-coded 0.5;
  `image_size` (what a config records) to what the shift masks imply (else 224).
  """
  from aim_jax.convert.official_names import split_recognizer
  backbone, head, _ = split_recognizer(sd)
  fields = _infer_swin(backbone)
  _source_image_size(fields, image_size, report if report is not None else Report())
  if 'weight' not in head:
    raise ConversionError('missing key cls_head.fc_cls.weight (not an AIM recognizer checkpoint?)')
  pt = fields['swin']['patch_size_t']
  table = backbone.get('layers.0.blocks.0.attn.temporal_position_bias_table')
  if table is not None:
    frames = (np.shape(table)[0] + 1) // 2 * pt
    if num_frames is not None and num_frames != frames:
      raise ConversionError(f'num_frames={num_frames} but the temporal bias table of '
                            f'{np.shape(table)[0]} rows means {frames} frames')
    num_frames = frames
  elif 'temporal_embedding' in backbone:
    num_frames = np.shape(backbone['temporal_embedding'])[1] * pt
  if num_frames is None:
    raise ConversionError('no temporal table or embedding: pass num_frames')
  blocks = [k for k in backbone if k.startswith('layers.')]
  has = lambda n: any(f'.{n}.' in k for k in blocks)
  adapted = has('T_Adapter') or has('S_Adapter') or has('S_Adapter2')
  ratio = 0.25
  for k in blocks:
    if re.search(r'_Adapter2?\.D_fc1\.weight$', k):
      ratio = np.shape(backbone[k])[0] / np.shape(backbone[k])[1]
      break
  adapters = dict(enabled=adapted, spatial=has('S_Adapter2'), temporal=has('T_Adapter'),
                  joint=has('S_Adapter'), num_tadapter=1, ratio=float(ratio),
                  scale=0.5 if adapter_scale is None else float(adapter_scale),
                  position='all', position_count=0)
  return _model_config(fields, num_frames=int(num_frames),
                       num_classes=int(np.shape(head['weight'])[0]), adapters=adapters)


# ---------------------------------------------------------------------------
# Public conversions.

def aim_params_from_state_dict(sd: Mapping[str, Any], model_config: Mapping | None = None,
                               adapter_scale: float | None = None,
                               image_size: int | None = None) -> tuple[dict, dict, Report]:
  """Official AIM Swin recognizer -> ({'backbone', 'cls_head'} params, model config, report)."""
  from aim_jax.convert.official_names import head_from_state_dict, split_recognizer
  report = Report()
  cfg = model_config if model_config is not None else infer_aim_config(
      sd, adapter_scale=adapter_scale, image_size=image_size, report=report)
  if model_config is None and adapter_scale is None and cfg['adapters']['joint']:
    report.notices.append('adapter scale 0.5 (the official constant; no tensor records it: '
                          'pass --adapter-scale if the model was trained with another)')
  backbone, head, other = split_recognizer(sd)
  report.unused.extend(other)
  enc = encoder_from_state_dict(backbone, report, prefix='backbone.')
  report.mapped = [(a, 'backbone/' + b) for a, b in report.mapped]
  _check_buffers(backbone, cfg, report)
  return {'backbone': enc, 'cls_head': head_from_state_dict(head, report)}, cfg, report


def aim_params_to_state_dict(params: Mapping, model_config: Mapping | None = None
                             ) -> dict[str, np.ndarray]:
  """Inverse of `aim_params_from_state_dict`; with a model config, buffers are added too
  (the official module loads strictly only with them)."""
  sd = {'backbone.' + k: v for k, v in encoder_to_state_dict(params['backbone']).items()}
  if model_config is not None:
    sd.update({'backbone.' + k: v for k, v in buffers(model_config).items()})
  fc = params['cls_head']['fc_cls']
  sd['cls_head.fc_cls.weight'] = np.ascontiguousarray(np.asarray(fc['kernel']).T)
  sd['cls_head.fc_cls.bias'] = np.asarray(fc['bias'])
  return sd


def _check_buffers(backbone: Mapping, cfg: Mapping, report: Report) -> None:
  want = buffers(cfg)
  for key, value in backbone.items():
    if not _is_buffer(key):
      continue
    if key not in want:
      report.unused.append('backbone.' + key)
      continue
    if np.shape(value) != want[key].shape or not np.array_equal(np.asarray(value), want[key]):
      raise ConversionError(f'buffer backbone.{key} differs from the one the model config '
                            f'implies (window, shift or frames do not match)')
  report.notices.append(f'checked {sum(_is_buffer(k) for k in backbone)} buffers '
                        '(relative_position_index, t_relative_coords, attn_mask)')


def unwrap(sd: Mapping[str, Any]) -> Mapping[str, Any]:
  """Microsoft checkpoints are `{'model': state_dict}`."""
  if set(sd) <= {'model', 'state_dict'} and len(sd) == 1:
    return next(iter(sd.values()))
  return sd


def is_timm_layout(keys) -> bool:
  keys = set(keys)
  return 'layers.0.downsample.reduction.weight' not in keys and any(
      re.match(r'^layers\.\d+\.downsample\.reduction\.weight$', k) for k in keys)


def timm_to_official_names(sd: Mapping[str, Any]) -> dict[str, Any]:
  """timm keys -> Microsoft keys: `layers.{s}.downsample` -> `layers.{s-1}.downsample`,
  `head.fc.*` -> `head.*`."""
  out = {}
  for key, value in sd.items():
    key = re.sub(r'^layers\.(\d+)\.downsample\.',
                 lambda m: f'layers.{int(m.group(1)) - 1}.downsample.', key)
    key = re.sub(r'^head\.fc\.', 'head.', key)
    out[key] = value
  return out


def image_params_from_state_dict(sd: Mapping[str, Any], patch_size_t: int = 2,
                                 image_size: int | None = None,
                                 ) -> tuple[dict, dict, Report]:
  """Microsoft or timm 2D Swin -> (encoder params, model config, report).

  The Conv2d patch embedding (C, 3, p, p) becomes a Conv3d (C, 3, pt, p, p):
  repeated along time and divided by pt, so a clip of pt equal frames gives
  the 2D embedding (official SwinTransformer2D_Adapter.inflate_weights).
  `head.*` is reported unused; adapters, temporal tables are left to init.
  """
  sd = unwrap(sd)
  report = Report()
  if is_timm_layout(sd.keys()):
    sd = timm_to_official_names(sd)
    report.notices.append('timm layout: layers.{s+1}.downsample -> layers.{s}.downsample')
  sd = {k: np.asarray(v) for k, v in sd.items()}
  fields = _infer_swin(sd)
  _source_image_size(fields, image_size, report)
  w = sd['patch_embed.proj.weight']
  if w.ndim == 4:
    sd['patch_embed.proj.weight'] = np.repeat(w[:, :, None], patch_size_t, axis=2) / patch_size_t
    fields['swin']['patch_size_t'] = patch_size_t
    report.notices.append(f'patch_embed.proj.weight inflated to Conv3d: repeated on {patch_size_t} '
                          'frames and divided by it')
  params = encoder_from_state_dict(sd, report)
  report.unused.extend(k for k in sd if _is_buffer(k))     # recomputed, never read
  cfg = _model_config(fields)
  return params, cfg, report


def _detect_aim(keys) -> bool:
  keys = set(keys)
  return ('backbone.layers.0.blocks.0.attn.relative_position_bias_table' in keys
          and 'cls_head.fc_cls.weight' in keys)


def _detect_image(keys) -> bool:
  keys = set(keys)
  return 'layers.0.blocks.0.attn.relative_position_bias_table' in keys


def _convert_aim(sd, *, adapter_scale=None, source_image_size=None):
  return aim_params_from_state_dict(sd, adapter_scale=adapter_scale, image_size=source_image_size)


def _convert_image(sd, *, source_image_size=None):
  # The official AIM Swin inflates with pt = 2 (patch244 configs).
  return image_params_from_state_dict(sd, patch_size_t=2, image_size=source_image_size)


register(Format('aim_swin', 'aim', _detect_aim, _convert_aim,
                'official AIM SwinTransformer2D_Adapter recognizer (backbone.layers.*)'))
register(Format('swin', 'image', _detect_image, _convert_image,
                'Microsoft ({"model": sd}) or timm 2D Swin Transformer'))
