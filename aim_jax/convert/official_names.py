"""Official (PyTorch) state-dict names <-> our Flax parameter tree.

The mapping only renames, transposes and splits: no value is changed, so a
round trip is exact. It serves OpenAI CLIP visual towers (`conv1.weight`, ...),
the official AIM recognizer (`backbone.*`, `cls_head.fc_cls.*`) and, through a
name translation, timm's ViT (`patch_embed.proj.weight`, `blocks.{i}.*`).

Torch -> Flax, per tensor kind (D width, H heads, hd = D / H):
  Linear weight (out, in)         -> Dense kernel (in, out)            = W.T
  in_proj_weight / qkv (3D, D)    -> attn/qkv/kernel (D, 3, H, hd)     = W.T.reshape(D, 3, H, hd)
  in_proj_bias / qkv bias (3D,)   -> attn/qkv/bias (3, H, hd)
  out_proj.weight (D, D)          -> attn/out/kernel (H, hd, D)        = W.T.reshape(H, hd, D)
  conv1.weight (D, 3, p, p)       -> conv1/kernel (p, p, 3, D)         = W.transpose(2, 3, 1, 0)
  LayerNorm weight                -> scale
  embeddings, proj                -> unchanged (positional_embedding (L, D), temporal (1, T, D))
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Optional

import numpy as np

from aim_jax import params as P
from aim_jax.convert.registry import Report
from aim_jax.errors import ConversionError


# ---------------------------------------------------------------------------
# Tensor transforms: (value, heads) -> value, each with its inverse.

def _t(w, h):
  return np.ascontiguousarray(np.asarray(w).T)


def _qkv_w(w, h):
  w = np.asarray(w)
  d = w.shape[1]
  return np.ascontiguousarray(w.T.reshape(d, 3, h, d // h))


def _qkv_w_inv(k, h):
  d = k.shape[0]
  return np.ascontiguousarray(np.asarray(k).reshape(d, 3 * d).T)


def _qkv_b(b, h):
  b = np.asarray(b)
  d = b.shape[0] // 3
  return b.reshape(3, h, d // h)


def _qkv_b_inv(b, h):
  return np.asarray(b).reshape(-1)


def _out_w(w, h):
  w = np.asarray(w)
  d = w.shape[0]
  return np.ascontiguousarray(w.T.reshape(h, d // h, d))


def _out_w_inv(k, h):
  k = np.asarray(k)
  d = k.shape[-1]
  return np.ascontiguousarray(k.reshape(d, d).T)


def _conv(w, h):
  return np.ascontiguousarray(np.asarray(w).transpose(2, 3, 1, 0))


def _conv_inv(k, h):
  return np.ascontiguousarray(np.asarray(k).transpose(3, 2, 0, 1))


def _id(x, h):
  return np.asarray(x)


TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    'linear': (_t, _t), 'qkv_w': (_qkv_w, _qkv_w_inv), 'qkv_b': (_qkv_b, _qkv_b_inv),
    'out_w': (_out_w, _out_w_inv), 'conv': (_conv, _conv_inv), 'id': (_id, _id),
}

# CLIP visual-tower names (relative to the tower) -> (our name, transform).
_BLOCK_RULES = [
    (r'attn\.in_proj_weight', 'attn/qkv/kernel', 'qkv_w'),
    (r'attn\.in_proj_bias', 'attn/qkv/bias', 'qkv_b'),
    (r'attn\.out_proj\.weight', 'attn/out/kernel', 'out_w'),
    (r'attn\.out_proj\.bias', 'attn/out/bias', 'id'),
    (r'(ln_[12])\.weight', r'\1/scale', 'id'),
    (r'(ln_[12])\.bias', r'\1/bias', 'id'),
    (r'mlp\.(c_fc|c_proj)\.weight', r'mlp/\1/kernel', 'linear'),
    (r'mlp\.(c_fc|c_proj)\.bias', r'mlp/\1/bias', 'id'),
    (r'(\w+_Adapter\w*)\.(D_fc[12])\.weight', r'\1/\2/kernel', 'linear'),
    (r'(\w+_Adapter\w*)\.(D_fc[12])\.bias', r'\1/\2/bias', 'id'),
    (r'ls([12])\.gamma', r'ls\1', 'id'),
]
_TOP_RULES = [
    (r'conv1\.weight', 'conv1/kernel', 'conv'),
    (r'conv1\.bias', 'conv1/bias', 'id'),
    (r'class_embedding', 'class_embedding', 'id'),
    (r'positional_embedding', 'positional_embedding', 'id'),
    (r'temporal_embedding', 'temporal_embedding', 'id'),
    (r'(ln_pre|ln_post)\.weight', r'\1/scale', 'id'),
    (r'(ln_pre|ln_post)\.bias', r'\1/bias', 'id'),
    (r'proj', 'proj', 'id'),
]


def _target_name(key: str) -> Optional[tuple[str, str]]:
  """CLIP visual-tower key -> (our name, transform kind), or None."""
  m = re.match(r'^transformer\.resblocks\.(\d+)\.(.*)$', key)
  rules, sub, prefix = (_BLOCK_RULES, m.group(2), f'resblocks_{m.group(1)}/') if m \
      else (_TOP_RULES, key, '')
  for pattern, template, kind in rules:
    if re.fullmatch(pattern, sub):
      return prefix + re.sub(rf'^{pattern}$', template, sub), kind
  return None


# timm ViT names -> CLIP names (docs/state_dict_names.md#vit-in21k); the qkv/proj tensors have
# the same layout as in_proj/out_proj.
_TIMM_TO_CLIP = [
    (r'^patch_embed\.proj\.', 'conv1.'),
    (r'^cls_token$', 'class_embedding'),
    (r'^pos_embed$', 'positional_embedding'),
    (r'^blocks\.(\d+)\.norm1\.', r'transformer.resblocks.\1.ln_1.'),
    (r'^blocks\.(\d+)\.norm2\.', r'transformer.resblocks.\1.ln_2.'),
    (r'^blocks\.(\d+)\.attn\.qkv\.weight$', r'transformer.resblocks.\1.attn.in_proj_weight'),
    (r'^blocks\.(\d+)\.attn\.qkv\.bias$', r'transformer.resblocks.\1.attn.in_proj_bias'),
    (r'^blocks\.(\d+)\.attn\.proj\.', r'transformer.resblocks.\1.attn.out_proj.'),
    (r'^blocks\.(\d+)\.mlp\.fc1\.', r'transformer.resblocks.\1.mlp.c_fc.'),
    (r'^blocks\.(\d+)\.mlp\.fc2\.', r'transformer.resblocks.\1.mlp.c_proj.'),
    (r'^blocks\.(\d+)\.(\w*Adapter\w*)\.', r'transformer.resblocks.\1.\2.'),
    (r'^norm\.', 'ln_post.'),
]


def timm_to_clip_names(sd: Mapping[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
  """{clip_name: (timm_name, value)}; cls_token/pos_embed lose their batch axis."""
  out = {}
  for key, value in sd.items():
    name = key
    for a, b in _TIMM_TO_CLIP:
      name, n = re.subn(a, b, name)
      if n:
        break
    value = np.asarray(value)
    if name == 'class_embedding':
      value = value.reshape(-1)
    elif name == 'positional_embedding':
      value = value.reshape(value.shape[-2], value.shape[-1])
    out[name] = (key, value)
  return out


# ---------------------------------------------------------------------------
# Public API.

def encoder_from_state_dict(sd: Mapping[str, np.ndarray], heads: int,
                            source_names: Optional[Mapping[str, str]] = None,
                            report: Optional[Report] = None) -> dict:
  """CLIP-named visual-tower tensors -> encoder params (loop layout).

  Keys that match no rule go to `report.unused`. `source_names` maps our CLIP
  name back to the checkpoint's own key, for messages.
  """
  report = report if report is not None else Report()
  flat = {}
  for key, value in sd.items():
    hit = _target_name(key)
    src = (source_names or {}).get(key, key)
    if hit is None:
      report.unused.append(src)
      continue
    name, kind = hit
    try:
      flat[name] = TRANSFORMS[kind][0](value, heads)
    except Exception as e:  # reshape of a wrong shape
      raise ConversionError(f'key {src!r}: cannot convert tensor of shape '
                            f'{np.shape(value)} ({e})') from e
    report.mapped.append((src, name))
  return P.unflatten(flat)


def encoder_to_state_dict(params: Mapping, heads: int) -> dict[str, np.ndarray]:
  """Encoder params (either layout) -> CLIP-named tensors; exact inverse."""
  out = {}
  for name, value in P.flatten(P.to_loop_layout(params)).items():
    key, kind = _source_key(name)
    out[key] = TRANSFORMS[kind][1](np.asarray(value), heads)
  return out


# Our names -> CLIP names: the rules above, read backwards.
_BLOCK_INV = [
    (r'attn/qkv/kernel', 'attn.in_proj_weight', 'qkv_w'),
    (r'attn/qkv/bias', 'attn.in_proj_bias', 'qkv_b'),
    (r'attn/out/kernel', 'attn.out_proj.weight', 'out_w'),
    (r'attn/out/bias', 'attn.out_proj.bias', 'id'),
    (r'(ln_[12])/scale', r'\1.weight', 'id'),
    (r'(ln_[12])/bias', r'\1.bias', 'id'),
    (r'mlp/(c_fc|c_proj)/kernel', r'mlp.\1.weight', 'linear'),
    (r'mlp/(c_fc|c_proj)/bias', r'mlp.\1.bias', 'id'),
    (r'(\w+_Adapter\w*)/(D_fc[12])/kernel', r'\1.\2.weight', 'linear'),
    (r'(\w+_Adapter\w*)/(D_fc[12])/bias', r'\1.\2.bias', 'id'),
    (r'ls([12])', r'ls\1.gamma', 'id'),
]
_TOP_INV = [
    (r'conv1/kernel', 'conv1.weight', 'conv'),
    (r'conv1/bias', 'conv1.bias', 'id'),
    (r'(class_embedding|positional_embedding|temporal_embedding|proj)', r'\1', 'id'),
    (r'(ln_pre|ln_post)/scale', r'\1.weight', 'id'),
    (r'(ln_pre|ln_post)/bias', r'\1.bias', 'id'),
]


def _source_key(name: str) -> tuple[str, str]:
  m = re.match(r'^resblocks_(\d+)/(.*)$', name)
  rules, sub, prefix = (_BLOCK_INV, m.group(2), f'transformer.resblocks.{m.group(1)}.') if m \
      else (_TOP_INV, name, '')
  for pattern, template, kind in rules:
    if re.fullmatch(pattern, sub):
      return prefix + re.sub(rf'^{pattern}$', template, sub), kind
  raise ConversionError(f'parameter {name!r} has no official name')


def split_recognizer(sd: Mapping[str, np.ndarray]) -> tuple[dict, dict, list]:
  """Official recognizer keys -> (backbone tensors, head tensors, other keys)."""
  backbone, head, other = {}, {}, []
  for key, value in sd.items():
    if key.startswith('backbone.'):
      backbone[key[len('backbone.'):]] = value
    elif key.startswith('cls_head.fc_cls.'):
      head[key[len('cls_head.fc_cls.'):]] = value
    else:
      other.append(key)
  return backbone, head, other


def head_from_state_dict(head: Mapping[str, np.ndarray], report: Report) -> dict:
  for k in ('weight', 'bias'):
    if k not in head:
      raise ConversionError(f'missing key cls_head.fc_cls.{k}')
  report.mapped += [('cls_head.fc_cls.weight', 'cls_head/fc_cls/kernel'),
                    ('cls_head.fc_cls.bias', 'cls_head/fc_cls/bias')]
  return {'fc_cls': {'kernel': _t(head['weight'], 0), 'bias': np.asarray(head['bias'])}}


def aim_params_from_state_dict(sd: Mapping[str, np.ndarray], heads: int,
                               family: str = 'clip') -> tuple[dict, Report]:
  """Official AIM recognizer state dict -> {'backbone', 'cls_head'} params (loop layout)."""
  report = Report()
  backbone, head, other = split_recognizer(sd)
  report.unused.extend(other)
  names = None
  if family == 'vit_in21k':
    renamed = timm_to_clip_names(backbone)
    names = {k: v[0] for k, v in renamed.items()}
    backbone = {k: v[1] for k, v in renamed.items()}
  enc = encoder_from_state_dict(backbone, heads, names, report)
  report.mapped = [('backbone.' + a if not a.startswith('cls_head') else a, 'backbone/' + b)
                   for a, b in report.mapped]
  report.unused = [u if u.startswith(('backbone.', 'cls_head')) or u in other
                   else 'backbone.' + u for u in report.unused]
  return {'backbone': enc, 'cls_head': head_from_state_dict(head, report)}, report


def aim_params_to_state_dict(params: Mapping, heads: int, family: str = 'clip'
                             ) -> dict[str, np.ndarray]:
  """Inverse of `aim_params_from_state_dict`: official recognizer key names."""
  sd = {}
  enc = encoder_to_state_dict(params['backbone'], heads)
  if family == 'vit_in21k':
    enc = clip_to_timm_names(enc)
  for k, v in enc.items():
    sd['backbone.' + k] = v
  fc = params['cls_head']['fc_cls']
  sd['cls_head.fc_cls.weight'] = _t(fc['kernel'], 0)
  sd['cls_head.fc_cls.bias'] = np.asarray(fc['bias'])
  return sd


def clip_to_timm_names(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  back = [
      (r'^conv1\.', 'patch_embed.proj.'), (r'^class_embedding$', 'cls_token'),
      (r'^positional_embedding$', 'pos_embed'),
      (r'^transformer\.resblocks\.(\d+)\.ln_1\.', r'blocks.\1.norm1.'),
      (r'^transformer\.resblocks\.(\d+)\.ln_2\.', r'blocks.\1.norm2.'),
      (r'^transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$', r'blocks.\1.attn.qkv.weight'),
      (r'^transformer\.resblocks\.(\d+)\.attn\.in_proj_bias$', r'blocks.\1.attn.qkv.bias'),
      (r'^transformer\.resblocks\.(\d+)\.attn\.out_proj\.', r'blocks.\1.attn.proj.'),
      (r'^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.', r'blocks.\1.mlp.fc1.'),
      (r'^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.', r'blocks.\1.mlp.fc2.'),
      (r'^transformer\.resblocks\.(\d+)\.', r'blocks.\1.'),
  ]
  out = {}
  for key, value in sd.items():
    name = key
    for a, b in back:
      name, n = re.subn(a, b, name)
      if n:
        break
    if name == 'cls_token':
      value = value.reshape(1, 1, -1)
    elif name == 'pos_embed':
      value = value.reshape(1, *value.shape)
    out[name] = value
  return out


def infer_aim_config(sd: Mapping[str, np.ndarray], heads: Optional[int] = None,
                     adapter_scale: Optional[float] = None) -> dict:
  """Model-config fields implied by an official AIM state dict (ViT families).

  Reads width, layers, patch size, resolution, frames, classes, num_tadapter
  and which adaptations exist from the keys and shapes; heads default to
  width / 64 (every CLIP and IN-21K ViT) and the joint scale, which no tensor
  records, to the official 0.5 (1.0 when num_tadapter == 2, the SSv2 recipe).
  """
  backbone, head, _ = split_recognizer(sd)
  family = 'vit_in21k' if 'cls_token' in backbone else 'clip'
  if family == 'vit_in21k':
    backbone = {k: v[1] for k, v in timm_to_clip_names(backbone).items()}
  cfg = _infer_encoder(backbone, heads)
  cfg['backbone'] = family
  if 'weight' not in head:
    raise ConversionError('missing key cls_head.fc_cls.weight (not an AIM recognizer checkpoint?)')
  cfg['num_classes'] = int(np.shape(head['weight'])[0])
  if 'temporal_embedding' not in backbone:
    raise ConversionError('missing key backbone.temporal_embedding (not an AIM checkpoint?)')
  cfg['num_frames'] = int(np.shape(backbone['temporal_embedding'])[1])
  blocks = [k for k in backbone if k.startswith('transformer.resblocks.')]
  has = lambda n: any(f'.{n}.' in k for k in blocks)
  adapted = sorted({int(k.split('.')[2]) for k in blocks if '_Adapter' in k})
  num_tadapter = 2 if has('T_Adapter_in') else 1
  ratio = None
  for k in blocks:
    if k.endswith('Adapter.D_fc1.weight'):
      ratio = np.shape(backbone[k])[0] / cfg['width']
      break
  scale = adapter_scale if adapter_scale is not None else (1.0 if num_tadapter == 2 else 0.5)
  position = 'all' if adapted == list(range(cfg['layers'])) else 'explicit'
  cfg['adapters'] = dict(enabled=bool(adapted), spatial=has('S_Adapter'),
                         temporal=has('T_Adapter'), joint=has('MLP_Adapter'),
                         num_tadapter=num_tadapter, ratio=ratio or 0.25, scale=scale,
                         position='all', position_count=0)
  if position != 'all':
    cfg['adapters']['position'], cfg['adapters']['position_count'] = _position(
        adapted, cfg['layers'])
  return cfg


def _position(adapted, layers):
  if adapted == list(range(len(adapted))):
    return 'bottom', len(adapted)
  if adapted == list(range(layers - len(adapted), layers)):
    return 'top', len(adapted)
  if adapted == list(range(0, layers, 2)):
    return 'every_other', 0
  raise ConversionError(f'adapters in blocks {adapted}: not a supported position pattern')


def _infer_encoder(sd: Mapping[str, np.ndarray], heads: Optional[int]) -> dict:
  for k in ('conv1.weight', 'positional_embedding'):
    if k not in sd:
      raise ConversionError(f'missing key {k!r} (cannot read the architecture)')
  width, _, patch, _ = np.shape(sd['conv1.weight'])
  tokens = np.shape(sd['positional_embedding'])[0]
  grid = int(round(np.sqrt(tokens - 1)))
  if grid * grid + 1 != tokens:
    raise ConversionError(f'key positional_embedding: {tokens} tokens is not 1 + a square grid')
  layers = 1 + max([int(k.split('.')[2]) for k in sd if k.startswith('transformer.resblocks.')],
                   default=-1)
  if layers == 0:
    raise ConversionError('no transformer.resblocks.* keys: not a ViT checkpoint')
  mlp = np.shape(sd.get('transformer.resblocks.0.mlp.c_fc.weight', np.zeros((4 * width, 1))))[0]
  heads = heads or max(1, width // 64)
  if width % heads:
    raise ConversionError(f'width {width} is not divisible by heads={heads}; pass the head count')
  return dict(width=int(width), layers=int(layers), heads=int(heads), patch_size=int(patch),
              image_size=int(grid * patch), mlp_ratio=float(mlp / width))
