"""DINOv2 (Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel`) state dicts.

The model is the `dinov2` family (`dinov2_reg` with 4 register tokens): patch
bias, class token, exact GELU MLP, LayerNorm eps 1e-6, no ln_pre, and layer
scale `ls1`/`ls2` on the attention and MLP outputs.

What AIM's adaptation means here (our choice, tested in tests/test_backbones.py):
the layer scale belongs to the frozen branch it scales, so every adapter sees
the *scaled* output: temporal `x += T_Adapter(ls1 * attn_T(ln_1(x)))`, spatial
`x += S_Adapter(ls1 * attn(ln_1(x)))`, joint `x += ls2 * mlp(xn) + s *
MLP_Adapter(xn)`. The temporal branch re-uses `ls1` with the attention. Register
tokens take part in the temporal attention like every other token; features
are the `ln_post` class token per frame (HF `pooler_output`), mean over frames.

Names (optionally under `dinov2.`; both the older `attention.attention.query`
/ `attention.output.dense` and the newer `attention.q_proj` / `o_proj` spellings):
  embeddings.patch_embeddings.projection (D, 3, p, p) -> conv1
  embeddings.cls_token (1, 1, D), position_embeddings (1, 1 + N, D),
  embeddings.register_tokens (1, R, D)
      -> class_embedding, positional_embedding, register_tokens
  encoder.layer.{i}.norm1/norm2                -> resblocks_{i}/ln_1, ln_2
  encoder.layer.{i}.attention.{q,k,v}          -> attn/qkv (D, 3, H, hd)
  encoder.layer.{i}.attention.{o_proj|output.dense} -> attn/out (H, hd, D)
  encoder.layer.{i}.layer_scale{1,2}.lambda1   -> ls1, ls2
  encoder.layer.{i}.mlp.fc1/fc2                -> mlp/c_fc, c_proj
  layernorm                                    -> ln_post
  embeddings.mask_token                        unused (masked-image pre-training only)
Checkpoints are trained at 518 px (37x37 grid of 14 px patches); pass
`image_size=224` to resample the grid position embeddings once, bicubic, the
way HF's `interpolate_pos_encoding` does at run time (`python -m aim_jax.convert
image --image-size 224` does the same). The register models (HF
`Dinov2WithRegistersModel`, the original `*_reg` hub models) resample with
`antialias=True` instead, which this plain bicubic does not reproduce exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from aim_jax.convert.registry import Format, Report, register
from aim_jax.convert.formats import vit_common as C
from aim_jax.errors import ConversionError

_PREFIXES = ('dinov2.', 'model.', '')
_PATCH = 'embeddings.patch_embeddings.projection.weight'

_ATTN_SPELLINGS = {
    'q': ('attention.q_proj', 'attention.attention.query'),
    'k': ('attention.k_proj', 'attention.attention.key'),
    'v': ('attention.v_proj', 'attention.attention.value'),
    'o': ('attention.o_proj', 'attention.output.dense'),
}


def detect(keys: Iterable[str]) -> bool:
  keys = set(keys)
  return any(p + _PATCH in keys for p in _PREFIXES) and \
      any(p + 'encoder.layer.0.layer_scale1.lambda1' in keys for p in _PREFIXES)


def convert(sd: Mapping[str, np.ndarray], *, heads: int | None = None,
            image_size: int | None = None, **unused_options) -> tuple[dict, dict, Report]:
  """DINOv2 HF state dict -> (dinov2 encoder params, model config, report).

  `heads` defaults to width / 64 (S 6, B 12, L 16, g 24), said in the report;
  `python -m aim_jax.convert` reads it from a config.json beside the weights.
  """
  report = Report()
  prefix = next((p for p in _PREFIXES if p + _PATCH in sd), None)
  if prefix is None:
    raise ConversionError(f'missing key {_PATCH!r}: not a DINOv2 checkpoint')
  sub = {k[len(prefix):]: np.asarray(v) for k, v in sd.items() if k.startswith(prefix)}
  report.unused += [k for k in sd if not k.startswith(prefix)]
  if any('.mlp.weights_in.' in k or '.mlp.w12.' in k for k in sub):
    raise ConversionError('key encoder.layer.0.mlp.weights_in: DINOv2 with a SwiGLU MLP '
                          '(giant) is not supported by this encoder')
  weight = C.take(sub, _PATCH, prefix)
  width, patch = int(weight.shape[0]), int(weight.shape[-1])
  heads = C.heads_for(width, heads, report)
  flat = {}

  def put(src, target, value):
    flat[target] = value
    report.mapped.append((prefix + src, target))

  def find(bp, role, kind):
    for spelling in _ATTN_SPELLINGS[role]:
      key = f'{bp}{spelling}.{kind}'
      if key in sub:
        return key
    raise ConversionError(f'missing key {prefix}{bp}{_ATTN_SPELLINGS[role][0]}.{kind}')

  layers = C.num_layers(sub, r'^encoder\.layer\.(\d+)\.')
  for i in range(layers):
    bp, out = f'encoder.layer.{i}.', f'resblocks_{i}/'
    for j in '12':
      put(f'{bp}norm{j}.weight', f'{out}ln_{j}/scale', C.take(sub, f'{bp}norm{j}.weight', prefix))
      put(f'{bp}norm{j}.bias', f'{out}ln_{j}/bias', C.take(sub, f'{bp}norm{j}.bias', prefix))
      put(f'{bp}layer_scale{j}.lambda1', f'{out}ls{j}',
          C.take(sub, f'{bp}layer_scale{j}.lambda1', prefix))
    for j, name in (('1', 'c_fc'), ('2', 'c_proj')):
      put(f'{bp}mlp.fc{j}.weight', f'{out}mlp/{name}/kernel',
          C.linear(C.take(sub, f'{bp}mlp.fc{j}.weight', prefix)))
      put(f'{bp}mlp.fc{j}.bias', f'{out}mlp/{name}/bias',
          C.take(sub, f'{bp}mlp.fc{j}.bias', prefix))
    ws = [find(bp, r, 'weight') for r in 'qkv']
    bs = [find(bp, r, 'bias') for r in 'qkv']
    flat[out + 'attn/qkv/kernel'] = C.stack_qkv(*[C.heads_in(sub[k], heads) for k in ws])
    flat[out + 'attn/qkv/bias'] = C.stack_qkv(*[C.heads_bias(sub[k], heads) for k in bs])
    report.mapped += [(prefix + k, out + 'attn/qkv/kernel') for k in ws]
    report.mapped += [(prefix + k, out + 'attn/qkv/bias') for k in bs]
    ow, ob = find(bp, 'o', 'weight'), find(bp, 'o', 'bias')
    put(ow, out + 'attn/out/kernel', C.heads_out(sub[ow], heads))
    put(ob, out + 'attn/out/bias', sub[ob])
  put(_PATCH, 'conv1/kernel', C.conv(weight))
  put('embeddings.patch_embeddings.projection.bias', 'conv1/bias',
      C.take(sub, 'embeddings.patch_embeddings.projection.bias', prefix))
  put('embeddings.cls_token', 'class_embedding',
      C.take(sub, 'embeddings.cls_token', prefix).reshape(-1))
  pos = C.take(sub, 'embeddings.position_embeddings', prefix)
  put('embeddings.position_embeddings', 'positional_embedding', pos.reshape(pos.shape[-2:]))
  put('layernorm.weight', 'ln_post/scale', C.take(sub, 'layernorm.weight', prefix))
  put('layernorm.bias', 'ln_post/bias', C.take(sub, 'layernorm.bias', prefix))
  family = 'dinov2'
  if 'embeddings.register_tokens' in sub:
    reg = sub['embeddings.register_tokens']
    put('embeddings.register_tokens', 'register_tokens', reg.reshape(reg.shape[-2:]))
    if reg.shape[-2] != 4:
      raise ConversionError(f'key {prefix}embeddings.register_tokens: {reg.shape[-2]} '
                            'registers; the dinov2_reg family has 4')
    family = 'dinov2_reg'
  used = {a for a, _ in report.mapped}
  report.unused += [prefix + k for k in sub if prefix + k not in used]
  if 'embeddings.mask_token' in sub:
    report.notices.append('embeddings.mask_token is only used in masked pre-training')
  hidden = np.shape(flat['resblocks_0/mlp/c_fc/kernel'])[-1]
  fields = dict(backbone=family, width=width, heads=heads, patch_size=patch, layers=layers,
                mlp_ratio=hidden / width)
  return C.finish(flat, fields, report, image_size)


FORMAT = register(Format(
    name='dinov2', kind='image', detect=detect, convert=convert,
    description='DINOv2 (HF Dinov2Model / Dinov2WithRegistersModel), layer scale, registers'))
