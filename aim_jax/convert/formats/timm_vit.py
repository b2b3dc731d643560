"""timm `VisionTransformer` state dicts (.pth, .bin or safetensors).

Covers `jx_vit_base_p16_224-80ecf9dd.pth`, the file the official AIM
`ViT_ImageNet` loads (timm's port of Google's IN-21k + IN-1k ViT-B/16), every
timm ViT of that design (`vit_in21k` family: patch bias, qkv bias, exact GELU,
LayerNorm eps 1e-6, no norm_pre, class-token pooling), and timm's DINOv2 ports
(`ls1.gamma` layer scale -> `dinov2`, plus `reg_token` -> `dinov2_reg`).

timm names -> ours (torch layouts are transposed, fused qkv split by head):
  patch_embed.proj.weight (D, 3, p, p) / .bias  -> conv1/kernel (p, p, 3, D) / conv1/bias
  cls_token (1, 1, D), pos_embed (1, N, D)
      -> class_embedding (D,), positional_embedding (N, D)
  reg_token (1, R, D)                            -> register_tokens (R, D)
  blocks.{i}.norm1/norm2                         -> resblocks_{i}/ln_1, ln_2
  blocks.{i}.attn.qkv.weight (3D, D) / .bias     -> attn/qkv/kernel (D, 3, H, hd) / bias (3, H, hd)
  blocks.{i}.attn.proj.weight (D, D) / .bias     -> attn/out/kernel (H, hd, D) / bias
  blocks.{i}.mlp.fc1, fc2                        -> mlp/c_fc, mlp/c_proj
  blocks.{i}.ls1.gamma, ls2.gamma                -> ls1, ls2
  norm                                           -> ln_post
  head.*                                         unused (the image classifier)
timm models with `norm_pre` (CLIP ports), `fc_norm` (average pooling) or
q/k norms are other families: the conversion refuses them by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np

from aim_jax.convert.registry import Format, Report, register
from aim_jax.convert.formats import vit_common as C
from aim_jax.errors import ConversionError


def _qkv_kernel(w, heads):
  w = np.asarray(w)
  d = w.shape[1]
  return np.ascontiguousarray(w.T.reshape(d, 3, heads, d // heads))   # (3D, D) -> (D, 3, H, hd)


def _qkv_bias(b, heads):
  b = np.asarray(b)
  return b.reshape(3, heads, b.shape[0] // (3 * heads))


_BLOCK = [
    (r'norm([12])\.weight', lambda m: f'ln_{m.group(1)}/scale', lambda w, h: np.asarray(w)),
    (r'norm([12])\.bias', lambda m: f'ln_{m.group(1)}/bias', lambda w, h: np.asarray(w)),
    (r'attn\.qkv\.weight', lambda m: 'attn/qkv/kernel', _qkv_kernel),
    (r'attn\.qkv\.bias', lambda m: 'attn/qkv/bias', _qkv_bias),
    (r'attn\.proj\.weight', lambda m: 'attn/out/kernel', C.heads_out),
    (r'attn\.proj\.bias', lambda m: 'attn/out/bias', lambda w, h: np.asarray(w)),
    (r'mlp\.fc([12])\.weight', lambda m: f'mlp/{"c_fc" if m.group(1) == "1" else "c_proj"}/kernel',
     lambda w, h: C.linear(w)),
    (r'mlp\.fc([12])\.bias', lambda m: f'mlp/{"c_fc" if m.group(1) == "1" else "c_proj"}/bias',
     lambda w, h: np.asarray(w)),
    (r'ls([12])\.gamma', lambda m: f'ls{m.group(1)}', lambda w, h: np.asarray(w)),
]

_REFUSED = {
    'norm_pre.': 'a pre-norm (CLIP-style) timm ViT: convert the OpenAI CLIP checkpoint instead',
    'fc_norm.': 'an average-pooling timm ViT (fc_norm): AIM pools the class token',
    'attn.q_norm.': 'a ViT with q/k normalisation, which this encoder does not implement',
    'mlp.fc1_g.': 'a SwiGLU ViT, which this encoder does not implement',
    'mlp.w12.': 'a SwiGLU ViT, which this encoder does not implement',
}


def detect(keys: Iterable[str]) -> bool:
  keys = set(keys)
  return 'patch_embed.proj.weight' in keys and 'blocks.0.attn.qkv.weight' in keys


def convert(sd: Mapping[str, np.ndarray], *, heads: int | None = None,
            image_size: int | None = None, **unused_options) -> tuple[dict, dict, Report]:
  """timm ViT state dict (tensors or arrays) -> (encoder params, model config, report)."""
  report = Report()
  sd = {k: np.asarray(v) for k, v in sd.items()}
  for key in sd:
    for marker, why in _REFUSED.items():
      if marker in key:
        raise ConversionError(f'key {key!r}: {why}')
  weight = C.take(sd, 'patch_embed.proj.weight')
  width, patch = int(weight.shape[0]), int(weight.shape[-1])
  heads = C.heads_for(width, heads, report)
  flat = {}
  for key, value in sd.items():
    m = re.match(r'^blocks\.(\d+)\.(.*)$', key)
    if not m:
      continue
    for pattern, name, fn in _BLOCK:
      hit = re.fullmatch(pattern, m.group(2))
      if hit:
        target = f'resblocks_{m.group(1)}/{name(hit)}'
        try:
          flat[target] = fn(value, heads)
        except ValueError as e:
          raise ConversionError(f'key {key!r}: cannot convert shape {value.shape} ({e})') from e
        report.mapped.append((key, target))
        break
  top = {
      'patch_embed.proj.weight': ('conv1/kernel', C.conv),
      'patch_embed.proj.bias': ('conv1/bias', np.asarray),
      'cls_token': ('class_embedding', lambda v: v.reshape(-1)),
      'pos_embed': ('positional_embedding', lambda v: v.reshape(v.shape[-2], v.shape[-1])),
      'reg_token': ('register_tokens', lambda v: v.reshape(v.shape[-2], v.shape[-1])),
      'norm.weight': ('ln_post/scale', np.asarray),
      'norm.bias': ('ln_post/bias', np.asarray),
  }
  for key, (target, fn) in top.items():
    if key in sd:
      flat[target] = fn(sd[key])
      report.mapped.append((key, target))
  pos = flat.get('positional_embedding')
  if pos is not None and 'class_embedding' in flat and \
      int(round(np.sqrt(pos.shape[0]))) ** 2 == pos.shape[0]:
    # timm `no_embed_class=True` (its DINOv2-reg ports): the class token carries no
    # position (timm folds it into cls_token); ours adds row 0 to it, so row 0 is zero.
    flat['positional_embedding'] = np.concatenate([np.zeros_like(pos[:1]), pos], axis=0)
    report.notices.append('pos_embed has no class-token row (no_embed_class): a zero row '
                          'is prepended')
  used = {a for a, _ in report.mapped}
  report.unused += [k for k in sd if k not in used]
  if any(k.startswith('head.') for k in sd):
    report.notices.append('the image classifier head.* is not part of the encoder: AIM '
                          'trains its own cls_head')
  family = 'vit_in21k'
  if 'resblocks_0/ls1' in flat:
    family = 'dinov2'
    if 'register_tokens' in flat:
      if flat['register_tokens'].shape[0] != 4:
        raise ConversionError(f'key reg_token: {flat["register_tokens"].shape[0]} registers; '
                              'the dinov2_reg family has 4')
      family = 'dinov2_reg'
  elif 'register_tokens' in flat:
    raise ConversionError('key reg_token: register tokens without layer scale are not a '
                          'supported family')
  hidden = np.shape(C.take(flat, 'resblocks_0/mlp/c_fc/kernel'))[-1]
  fields = dict(backbone=family, width=width, heads=heads, patch_size=patch,
                layers=C.num_layers(flat, r'^resblocks_(\d+)/'), mlp_ratio=hidden / width)
  return C.finish(flat, fields, report, image_size)


FORMAT = register(Format(
    name='timm_vit', kind='image', detect=detect, convert=convert,
    description='timm VisionTransformer state dict (jx_vit_base_p16_224-80ecf9dd.pth, '
                'safetensors; DINOv2 ports)'))
