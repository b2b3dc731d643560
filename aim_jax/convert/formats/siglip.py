"""SigLIP / SigLIP 2 image towers: big_vision .npz and Hugging Face `SiglipVisionModel`.

SigLIP 2 fixed-resolution checkpoints share SigLIP's architecture and names;
the NaFlex variants (HF `Siglip2VisionModel`, linear patch embedding over
variable patch counts) are refused by name.

The model is the `siglip` family: patch bias, no class token (the positional
embedding has grid*grid rows), tanh GELU, LayerNorm eps 1e-6, and a MAP head
(`MAPHead`: a learnt probe attending over the tokens) after `ln_post`.

What AIM's adaptation means here (our choice, tested in tests/test_backbones.py):
  * the temporal branch attends along time for every patch token (there is no
    class token to include), with the same frozen attention as the spatial one;
  * spatial and joint adapters as in every ViT block;
  * `ln_post` (big_vision `encoder_norm`) trains, as in the official freeze rule;
    the MAP head is part of the frozen image model and pools each frame's tokens
    to one feature; the I3D head averages the frames. With the adapters at
    their zero init, AIM therefore equals the frame-wise SigLIP image embedding
    (before the text-alignment `head`) averaged over frames.

big_vision names (under `params/img/`; a scanned `encoderblock/` is unstacked):
  embedding/kernel (p, p, 3, D), embedding/bias -> conv1
  pos_embedding (1, N, D)                       -> positional_embedding (N, D)
  Transformer/encoderblock_{i}/...              -> resblocks_{i} (see google_npz)
  Transformer/encoder_norm                      -> ln_post
  MAPHead_0/probe (1, 1, D)                     -> MAPHead/probe (1, D)
  MAPHead_0/MultiHeadDotProductAttention_0/{query,key,value,out} -> MAPHead/attn/...
  MAPHead_0/LayerNorm_0, MlpBlock_0/Dense_0/1   -> MAPHead/ln, MAPHead/mlp/c_fc, c_proj
  head/* (projection to the text space), params/txt/*, t, b: unused
Hugging Face names (optionally under `vision_model.`):
  embeddings.patch_embedding, embeddings.position_embedding.weight (N, D),
  encoder.layers.{i}.layer_norm1/2, self_attn.{q,k,v,out}_proj, mlp.fc1/fc2,
  post_layernorm, head.probe, head.attention.in_proj_*/out_proj, head.layernorm,
  head.mlp.fc1/fc2.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np

from aim_jax.convert.formats import google_npz
from aim_jax.convert.registry import Format, Report, register
from aim_jax.convert.formats import vit_common as C
from aim_jax.errors import ConversionError

_BV = 'params/img/'
_SIGLIP_HEADS = {1152: 16}     # So400m; every other SigLIP tower has width / 64 heads
_HF_PREFIXES = ('vision_model.', 'siglip.vision_model.', '')


def _is_big_vision(keys) -> bool:
  return any(k.startswith(_BV + 'MAPHead_0/') or k == _BV + 'embedding/kernel' for k in keys)


def detect(keys: Iterable[str]) -> bool:
  keys = set(keys)
  if _is_big_vision(keys):
    return True
  # HF CLIP has the same embedding names plus a class token, which SigLIP has not.
  return any(k.endswith('embeddings.patch_embedding.weight') for k in keys) and \
      any(k.endswith('embeddings.position_embedding.weight') for k in keys) and \
      not any(k.endswith('embeddings.class_embedding') for k in keys)


def _from_big_vision(sd: Mapping, heads: int | None, report: Report) -> dict:
  where = _BV
  sub = {k[len(_BV):]: np.asarray(v) for k, v in sd.items() if k.startswith(_BV)}
  report.unused += [k for k in sd if not k.startswith(_BV)]
  sub = google_npz.unscan(sub, 'Transformer/')
  kernel = C.take(sub, 'embedding/kernel', where)
  width = int(kernel.shape[-1])
  heads = google_npz.heads_from_kernels(sub, 'Transformer/', heads)
  inner = Report()
  flat = google_npz.blocks_from_flax(sub, 'Transformer/', inner, where)
  report.mapped += inner.mapped
  top = {
      'embedding/kernel': ('conv1/kernel', lambda v: v),
      'embedding/bias': ('conv1/bias', lambda v: v),
      'pos_embedding': ('positional_embedding', lambda v: v.reshape(v.shape[-2], v.shape[-1])),
      'Transformer/encoder_norm/scale': ('ln_post/scale', lambda v: v),
      'Transformer/encoder_norm/bias': ('ln_post/bias', lambda v: v),
      'MAPHead_0/probe': ('MAPHead/probe', lambda v: v.reshape(1, v.shape[-1])),
      'MAPHead_0/LayerNorm_0/scale': ('MAPHead/ln/scale', lambda v: v),
      'MAPHead_0/LayerNorm_0/bias': ('MAPHead/ln/bias', lambda v: v),
      'MAPHead_0/MlpBlock_0/Dense_0/kernel': ('MAPHead/mlp/c_fc/kernel', lambda v: v),
      'MAPHead_0/MlpBlock_0/Dense_0/bias': ('MAPHead/mlp/c_fc/bias', lambda v: v),
      'MAPHead_0/MlpBlock_0/Dense_1/kernel': ('MAPHead/mlp/c_proj/kernel', lambda v: v),
      'MAPHead_0/MlpBlock_0/Dense_1/bias': ('MAPHead/mlp/c_proj/bias', lambda v: v),
  }
  for n in ('query', 'key', 'value', 'out'):
    for kind in ('kernel', 'bias'):
      top[f'MAPHead_0/MultiHeadDotProductAttention_0/{n}/{kind}'] = (
          f'MAPHead/attn/{n}/{kind}', lambda v: v)
  for key, (target, fn) in top.items():
    flat[target] = fn(C.take(sub, key, where))
    report.mapped.append((where + key, target))
  used = {a for a, _ in report.mapped}
  report.unused += [_BV + k for k in sub if _BV + k not in used]
  return flat, width, int(kernel.shape[0]), heads


_HF_BLOCK = [
    (r'layer_norm([12])\.weight', lambda m: f'ln_{m.group(1)}/scale', lambda w, h: w),
    (r'layer_norm([12])\.bias', lambda m: f'ln_{m.group(1)}/bias', lambda w, h: w),
    (r'self_attn\.out_proj\.weight', lambda m: 'attn/out/kernel', C.heads_out),
    (r'self_attn\.out_proj\.bias', lambda m: 'attn/out/bias', lambda w, h: w),
    (r'mlp\.fc1\.weight', lambda m: 'mlp/c_fc/kernel', lambda w, h: C.linear(w)),
    (r'mlp\.fc1\.bias', lambda m: 'mlp/c_fc/bias', lambda w, h: w),
    (r'mlp\.fc2\.weight', lambda m: 'mlp/c_proj/kernel', lambda w, h: C.linear(w)),
    (r'mlp\.fc2\.bias', lambda m: 'mlp/c_proj/bias', lambda w, h: w),
]


def _from_hf(sd: Mapping, heads: int | None, report: Report) -> dict:
  prefix = next(p for p in _HF_PREFIXES
                if p + 'embeddings.patch_embedding.weight' in sd)
  sub = {k[len(prefix):]: np.asarray(v) for k, v in sd.items() if k.startswith(prefix)}
  report.unused += [k for k in sd if not k.startswith(prefix)]
  weight = C.take(sub, 'embeddings.patch_embedding.weight', prefix)
  if weight.ndim != 4:
    raise ConversionError(
        f'key {prefix}embeddings.patch_embedding.weight has shape {weight.shape}: a NaFlex '
        'SigLIP 2 (Siglip2VisionModel, linear patch embedding) is not supported; use the '
        'fixed-resolution SigLIP 2 checkpoints (e.g. siglip2-base-patch16-224)')
  width = int(weight.shape[0])
  if not heads:
    # Not stored in any tensor. SigLIP B and L have width / 64; So400m (1152) has 16.
    heads = _SIGLIP_HEADS.get(width, max(1, width // 64))
    report.notices.append(C.heads_guessed(
        heads, 'width/64' if width not in _SIGLIP_HEADS else f'SigLIP So400m\'s (width {width})'))
  heads = C.heads_for(width, heads)
  flat = {}

  def put(src, target, value):
    flat[target] = value
    report.mapped.append((prefix + src, target))

  layers = C.num_layers(sub, r'^encoder\.layers\.(\d+)\.')
  for i in range(layers):
    bp = f'encoder.layers.{i}.'
    out = f'resblocks_{i}/'
    for key in [k for k in sub if k.startswith(bp)]:
      for pattern, name, fn in _HF_BLOCK:
        hit = re.fullmatch(pattern, key[len(bp):])
        if hit:
          put(key, out + name(hit), fn(sub[key], heads))
    qkv = [C.take(sub, f'{bp}self_attn.{n}_proj.weight', prefix) for n in 'qkv']
    put(bp + 'self_attn.{q,k,v}_proj.weight', out + 'attn/qkv/kernel',
        C.stack_qkv(*[C.heads_in(w, heads) for w in qkv]))
    qkv = [C.take(sub, f'{bp}self_attn.{n}_proj.bias', prefix) for n in 'qkv']
    put(bp + 'self_attn.{q,k,v}_proj.bias', out + 'attn/qkv/bias',
        C.stack_qkv(*[C.heads_bias(b, heads) for b in qkv]))
  put('embeddings.patch_embedding.weight', 'conv1/kernel', C.conv(weight))
  put('embeddings.patch_embedding.bias', 'conv1/bias',
      C.take(sub, 'embeddings.patch_embedding.bias', prefix))
  put('embeddings.position_embedding.weight', 'positional_embedding',
      C.take(sub, 'embeddings.position_embedding.weight', prefix))
  if 'head.probe' not in sub:     # before any head.* key is taken: say why it is missing
    raise ConversionError(f'missing key {prefix}head.probe: a SigLIP tower without its MAP '
                          'head (vision_use_head=False) is not supported')
  for n in ('weight', 'bias'):
    put(f'post_layernorm.{n}', f'ln_post/{"scale" if n == "weight" else n}',
        C.take(sub, f'post_layernorm.{n}', prefix))
    put(f'head.layernorm.{n}', f'MAPHead/ln/{"scale" if n == "weight" else n}',
        C.take(sub, f'head.layernorm.{n}', prefix))
  put('head.probe', 'MAPHead/probe', sub['head.probe'].reshape(1, width))
  in_w = C.take(sub, 'head.attention.in_proj_weight', prefix)   # (3D, D) rows [q; k; v]
  in_b = C.take(sub, 'head.attention.in_proj_bias', prefix)
  for j, n in enumerate(('query', 'key', 'value')):
    put('head.attention.in_proj_weight', f'MAPHead/attn/{n}/kernel',
        C.heads_in(in_w[j * width:(j + 1) * width], heads))
    put('head.attention.in_proj_bias', f'MAPHead/attn/{n}/bias',
        C.heads_bias(in_b[j * width:(j + 1) * width], heads))
  put('head.attention.out_proj.weight', 'MAPHead/attn/out/kernel',
      C.heads_out(C.take(sub, 'head.attention.out_proj.weight', prefix), heads))
  put('head.attention.out_proj.bias', 'MAPHead/attn/out/bias',
      C.take(sub, 'head.attention.out_proj.bias', prefix))
  for j, n in (('1', 'c_fc'), ('2', 'c_proj')):
    put(f'head.mlp.fc{j}.weight', f'MAPHead/mlp/{n}/kernel',
        C.linear(C.take(sub, f'head.mlp.fc{j}.weight', prefix)))
    put(f'head.mlp.fc{j}.bias', f'MAPHead/mlp/{n}/bias',
        C.take(sub, f'head.mlp.fc{j}.bias', prefix))
  used = {k for a, _ in report.mapped for k in _expand(a)}
  report.unused += [prefix + k for k in sub if prefix + k not in used]
  return flat, width, int(weight.shape[-1]), heads


def _expand(name: str) -> list:
  m = re.match(r'^(.*)\{q,k,v\}(.*)$', name)
  return [m.group(1) + c + m.group(2) for c in 'qkv'] if m else [name]


def convert(sd: Mapping[str, np.ndarray], *, heads: int | None = None,
            image_size: int | None = None, **unused_options) -> tuple[dict, dict, Report]:
  """SigLIP image tower (big_vision .npz dict or HF state dict) -> (params, config, report).

  `heads`: read from the big_vision kernels; for HF weights it defaults to width / 64
  (B 12, L 16) and 16 for So400m (width 1152), said in the report;
  `python -m aim_jax.convert` reads it from a config.json beside the weights.
  """
  report = Report()
  sd = {k: np.asarray(v) for k, v in sd.items()}
  if _is_big_vision(sd):
    flat, width, patch, heads = _from_big_vision(sd, heads, report)
  else:
    flat, width, patch, heads = _from_hf(sd, heads, report)
  if any('txt' in k or k.startswith('text_model.') for k in report.unused):
    report.notices.append('the text tower is not used (AIM adapts the image tower)')
  hidden = np.shape(flat['resblocks_0/mlp/c_fc/kernel'])[-1]
  fields = dict(backbone='siglip', width=width, heads=heads, patch_size=patch,
                layers=C.num_layers(flat, r'^resblocks_(\d+)/'), mlp_ratio=hidden / width,
                class_token=False)
  return C.finish(flat, fields, report, image_size)


FORMAT = register(Format(
    name='siglip', kind='image', detect=detect, convert=convert,
    description='SigLIP / SigLIP 2 image tower: big_vision .npz or HF SiglipVisionModel'))
