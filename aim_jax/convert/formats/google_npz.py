"""Original Google `vision_transformer` .npz checkpoints (ViT-B_16.npz, augreg files).

These are JAX-native: `np.load(path)` gives flat '/'-joined names whose
kernels already have our layouts, so the mapping only renames and stacks
query/key/value into our fused qkv:

  embedding/kernel (p, p, 3, D), embedding/bias     -> conv1/kernel, conv1/bias
  cls (1, 1, D)                                     -> class_embedding (D,)
  Transformer/posembed_input/pos_embedding (1, N, D) -> positional_embedding (N, D)
  Transformer/encoderblock_{i}/LayerNorm_0, LayerNorm_2       -> ln_1, ln_2
  .../MultiHeadDotProductAttention_1/{query,key,value}/kernel (D, H, hd)
      -> attn/qkv/kernel (D, 3, H, hd)
  .../MultiHeadDotProductAttention_1/out/kernel (H, hd, D)    -> attn/out/kernel
  .../MlpBlock_3/Dense_0, Dense_1                   -> mlp/c_fc, mlp/c_proj
  Transformer/encoder_norm                          -> ln_post
  head/*, pre_logits/*                              unused (the image classifier)

The model is the ImageNet-21K ViT family (`vit_in21k`: patch bias, exact GELU,
LayerNorm eps 1e-6, no ln_pre), the network the official AIM `ViT_ImageNet`
adapts. The block helpers also read big_vision's names (`LayerNorm_0/1`,
`MultiHeadDotProductAttention_0`, `MlpBlock_0`) and its scanned layout
(`encoderblock/...` with a leading layer axis), used by SigLIP.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np

from aim_jax.convert.registry import Format, Report, register
from aim_jax.convert.formats import vit_common as C
from aim_jax.errors import ConversionError


def unscan(sd: Mapping[str, np.ndarray], prefix: str) -> dict:
  """big_vision scanned blocks `{prefix}encoderblock/...` (layer axis 0) -> `encoderblock_{i}`."""
  out = {}
  for key, value in sd.items():
    if key.startswith(prefix + 'encoderblock/'):
      tail = key[len(prefix + 'encoderblock/'):]
      for i in range(np.shape(value)[0]):
        out[f'{prefix}encoderblock_{i}/{tail}'] = np.asarray(value)[i]
    else:
      out[key] = value
  return out


def blocks_from_flax(sd: Mapping[str, np.ndarray], prefix: str, report: Report,
                     where: str = '') -> dict:
  """`{prefix}encoderblock_{i}/...` (either naming) -> our `resblocks_{i}/...` flat params."""
  layers = C.num_layers(sd, rf'^{re.escape(prefix)}encoderblock_(\d+)/')
  flat = {}
  for i in range(layers):
    bp = f'{prefix}encoderblock_{i}/'
    sub = {k[len(bp):]: k for k in sd if k.startswith(bp)}
    norms = sorted({k.split('/')[0] for k in sub if k.startswith('LayerNorm_')},
                   key=lambda n: int(n.split('_')[1]))
    attn = [k.split('/')[0] for k in sub if k.startswith('MultiHeadDotProductAttention_')]
    mlp = [k.split('/')[0] for k in sub if k.startswith('MlpBlock_')]
    if len(norms) != 2 or not attn or not mlp:
      raise ConversionError(f'{where}{bp}: expected two LayerNorm_*, one '
                            f'MultiHeadDotProductAttention_* and one MlpBlock_* '
                            f'(found {sorted(sub)[:6]})')
    attn, mlp = attn[0], mlp[0]
    rules = {
        f'{norms[0]}/scale': 'ln_1/scale', f'{norms[0]}/bias': 'ln_1/bias',
        f'{norms[1]}/scale': 'ln_2/scale', f'{norms[1]}/bias': 'ln_2/bias',
        f'{attn}/out/kernel': 'attn/out/kernel', f'{attn}/out/bias': 'attn/out/bias',
        f'{mlp}/Dense_0/kernel': 'mlp/c_fc/kernel', f'{mlp}/Dense_0/bias': 'mlp/c_fc/bias',
        f'{mlp}/Dense_1/kernel': 'mlp/c_proj/kernel', f'{mlp}/Dense_1/bias': 'mlp/c_proj/bias',
    }
    out = f'resblocks_{i}/'
    for src, dst in rules.items():
      flat[out + dst] = C.take(sd, bp + src, where)
      report.mapped.append((where + bp + src, out + dst))
    for kind in ('kernel', 'bias'):
      parts = [C.take(sd, f'{bp}{attn}/{n}/{kind}', where) for n in ('query', 'key', 'value')]
      flat[out + f'attn/qkv/{kind}'] = C.stack_qkv(*parts)
      report.mapped += [(f'{where}{bp}{attn}/{n}/{kind}', out + f'attn/qkv/{kind}')
                        for n in ('query', 'key', 'value')]
  return flat


def heads_from_kernels(sd: Mapping[str, np.ndarray], prefix: str, heads: int | None) -> int:
  """JAX checkpoints store the head count: query kernels are (D, H, hd)."""
  query = [k for k in sd if re.match(rf'^{re.escape(prefix)}encoderblock_0/'
                                     r'MultiHeadDotProductAttention_\d+/query/kernel$', k)]
  if not query:
    raise ConversionError(f'missing key {prefix}encoderblock_0/'
                          'MultiHeadDotProductAttention_*/query/kernel')
  stored = int(np.shape(sd[query[0]])[1])
  if heads and heads != stored:
    raise ConversionError(f'key {query[0]!r} has {stored} heads, but heads={heads} was given')
  return stored


def detect(keys: Iterable[str]) -> bool:
  keys = set(keys)
  return 'embedding/kernel' in keys and 'Transformer/posembed_input/pos_embedding' in keys


def convert(sd: Mapping[str, np.ndarray], *, heads: int | None = None,
            image_size: int | None = None, **unused_options) -> tuple[dict, dict, Report]:
  """Google ViT .npz (dict of arrays) -> (vit_in21k encoder params, model config, report)."""
  report = Report()
  sd = unscan(dict(sd), 'Transformer/')
  kernel = C.take(sd, 'embedding/kernel')
  patch, width = int(kernel.shape[0]), int(kernel.shape[-1])
  heads = heads_from_kernels(sd, 'Transformer/', heads)
  flat = blocks_from_flax(sd, 'Transformer/', report)
  top = {
      'embedding/kernel': ('conv1/kernel', kernel),
      'embedding/bias': ('conv1/bias', C.take(sd, 'embedding/bias')),
      'cls': ('class_embedding', C.take(sd, 'cls').reshape(-1)),
      'Transformer/posembed_input/pos_embedding': (
          'positional_embedding', C.take(sd, 'Transformer/posembed_input/pos_embedding')[0]),
      'Transformer/encoder_norm/scale': ('ln_post/scale',
                                         C.take(sd, 'Transformer/encoder_norm/scale')),
      'Transformer/encoder_norm/bias': ('ln_post/bias',
                                        C.take(sd, 'Transformer/encoder_norm/bias')),
  }
  for src, (dst, value) in top.items():
    flat[dst] = value
    report.mapped.append((src, dst))
  used = {a for a, _ in report.mapped}
  report.unused += [k for k in sd if k not in used]
  if any(k.startswith(('head/', 'pre_logits/')) for k in sd):
    report.notices.append('the image classifier (head/*, pre_logits/*) is not part of the '
                          'encoder: AIM trains its own cls_head')
  hidden = np.shape(flat['resblocks_0/mlp/c_fc/kernel'])[-1]
  fields = dict(backbone='vit_in21k', width=width, heads=heads, patch_size=patch,
                layers=C.num_layers(flat, r'^resblocks_(\d+)/'), mlp_ratio=hidden / width)
  return C.finish(flat, fields, report, image_size)


FORMAT = register(Format(
    name='google_vit_npz', kind='image', detect=detect, convert=convert,
    description='Google vision_transformer .npz (ViT-B_16.npz, augreg): ImageNet-21K ViT'))
