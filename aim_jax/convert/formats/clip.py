"""CLIP image towers: OpenAI CLIP, OpenCLIP and Hugging Face `CLIPVisionModel`/`CLIPModel`.

Two key namings reach the same Flax encoder (`aim_jax.models.vit`, CLIP names):

  'clip'     OpenAI CLIP (`clip` package: TorchScript `ViT-B-16.pt` or a state
             dict) and OpenCLIP: `visual.conv1.weight`, `visual.transformer.
             resblocks.{i}.attn.in_proj_weight`, ... (a bare visual tower, with
             no `visual.` prefix, is read too). The text tower is reported unused.
  'hf_clip'  transformers: `vision_model.embeddings.patch_embedding.weight`,
             `vision_model.encoder.layers.{i}.self_attn.{q,k,v}_proj.*`, ...
             q, k and v are concatenated into CLIP's `in_proj_weight` (that
             order), `visual_projection.weight` (E, D) becomes `proj` (D, E).

The architecture (width, layers, patch size, resolution, MLP ratio, projection
size) is read from the shapes; the head count is not stored in any tensor and
defaults to width / 64 (every released CLIP ViT) unless given, or read from a
Hugging Face `config.json` beside the weights.

The MLP activation is not stored in any tensor either, and CLIPs differ in it:
OpenAI's weights use QuickGELU (family 'clip'), OpenCLIP models whose config
name has no `-quickgelu` (LAION's ViT-B-16, ViT-L-14, ViT-H-14, ...) use exact
nn.GELU (family 'clip_gelu'). `act` picks it; `activation_from_source` reads it
from what lies beside the weights (OpenCLIP's `open_clip_config.json`) or
from the path's name. A wrong activation changes every feature (~1e-2).
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Mapping, Optional

import numpy as np

from aim_jax.convert import registry
from aim_jax.errors import ConversionError
from aim_jax.convert import official_names
from aim_jax.models.factory import resolve_model_config

# Per-block tensors of a CLIP visual tower (CLIP names).
_BLOCK_KEYS = ('attn.in_proj_weight', 'attn.in_proj_bias', 'attn.out_proj.weight',
               'attn.out_proj.bias', 'ln_1.weight', 'ln_1.bias', 'mlp.c_fc.weight',
               'mlp.c_fc.bias', 'mlp.c_proj.weight', 'mlp.c_proj.bias', 'ln_2.weight',
               'ln_2.bias')
_TOP_KEYS = ('conv1.weight', 'class_embedding', 'positional_embedding', 'ln_pre.weight',
             'ln_pre.bias', 'ln_post.weight', 'ln_post.bias')


def _clip_prefix(keys: Iterable[str]) -> Optional[str]:
  keys = set(keys)
  for prefix in ('visual.', 'module.visual.', ''):
    if f'{prefix}conv1.weight' in keys and f'{prefix}transformer.resblocks.0.ln_1.weight' in keys:
      return prefix
  return None


def detect_clip(keys: Iterable[str]) -> bool:
  keys = list(keys)
  # An AIM recognizer has `backbone.conv1.weight`: that is the 'aim' format, not this one.
  return _clip_prefix(keys) is not None and not any(k.startswith('backbone.') for k in keys)


def _hf_prefix(keys: Iterable[str]) -> Optional[str]:
  for k in keys:
    m = re.match(r'^(.*?)embeddings\.patch_embedding\.weight$', k)
    if m and (m.group(1) == '' or m.group(1).endswith('vision_model.')):
      return m.group(1)
  return None


def detect_hf_clip(keys: Iterable[str]) -> bool:
  keys = set(keys)
  p = _hf_prefix(keys)
  # The class token tells CLIP from SigLIP, whose HF keys are otherwise the same.
  return p is not None and {f'{p}encoder.layers.0.self_attn.q_proj.weight',
                            f'{p}embeddings.class_embedding'} <= keys


def _architecture(tower: Mapping[str, np.ndarray], heads: Optional[int]) -> dict:
  cfg = official_names._infer_encoder(tower, heads)   # width, layers, heads, patch, image_size, mlp
  proj = tower.get('proj')
  cfg['output_dim'] = int(np.shape(proj)[1]) if proj is not None else 0
  return cfg


def _check_complete(tower: Mapping[str, np.ndarray], layers: int, name_of) -> None:
  """Every tensor of the tower is present; the error names the checkpoint's key."""
  want = list(_TOP_KEYS) + [f'transformer.resblocks.{i}.{k}' for i in range(layers)
                            for k in _BLOCK_KEYS]
  for k in want:
    if k not in tower:
      raise ConversionError(f'missing key {name_of(k)!r} (layer tensors of a '
                                     f'{layers}-layer CLIP tower)')


# MLP activation -> the encoder family that has it (aim_jax.models.vit.FAMILIES).
ACTIVATION_FAMILIES = {'quick_gelu': 'clip', 'gelu': 'clip_gelu'}
OPEN_CLIP_CONFIG = 'open_clip_config.json'


def family_for(act: str) -> str:
  if act not in ACTIVATION_FAMILIES:
    raise ConversionError(f'act={act!r}: the CLIP encoder implements '
                                   f'{sorted(ACTIVATION_FAMILIES)}')
  return ACTIVATION_FAMILIES[act]


def activation_from_source(path: str) -> tuple[Optional[str], str]:
  """-> (activation or None, why) from what a CLIP checkpoint's path says.

  In order: OpenCLIP's `open_clip_config.json` beside the weights (what a
  Hugging Face hub download has; `model_cfg.quick_gelu`, default false); then
  the names along the path (the file and three directories up): `quickgelu`
  (OpenCLIP's `-quickgelu` model and file names) or `openai` (OpenAI's
  weights) mean QuickGELU, `laion` (LAION's OpenCLIP repositories, e.g.
  laion/CLIP-ViT-B-16-laion2B-s34B-b88K) means GELU. None: nothing says (the
  caller's default applies).
  """
  path = os.fspath(path)
  directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  config = os.path.join(directory, OPEN_CLIP_CONFIG)
  if os.path.exists(config):
    with open(config) as f:
      blob = json.load(f)
    model_cfg = blob['model_cfg'] if 'model_cfg' in blob else blob
    if not isinstance(model_cfg, Mapping) or 'vision_cfg' not in model_cfg:
      raise ConversionError(f'{config}: no model_cfg.vision_cfg (not an OpenCLIP '
                                     'model config)')
    quick = bool(model_cfg['quick_gelu']) if 'quick_gelu' in model_cfg else False
    return (('quick_gelu' if quick else 'gelu'),
            f'{config}: quick_gelu={str(quick).lower()}')
  # The file name and three directories up: a hub cache's models--ORG--NAME/snapshots/HASH/.
  parts = os.path.abspath(path).split(os.sep)[-4:]
  name = '/'.join(parts).lower().replace('_', '').replace('-', '')
  for word, act in (('quickgelu', 'quick_gelu'), ('openai', 'quick_gelu'), ('laion', 'gelu')):
    if word in name:
      return act, f'the path names {word!r}'
  return None, ''


def _model_config(arch: dict, act: str) -> dict:
  cfg = resolve_model_config(dict(backbone=family_for(act), **arch))
  return cfg


def _finish(tower, source_names, heads, report, name_of, act):
  arch = _architecture(tower, heads)
  if not heads:
    report.notices.append(registry.heads_guessed(arch['heads']))
  _check_complete(tower, arch['layers'], name_of)
  params = official_names.encoder_from_state_dict(tower, arch['heads'], source_names, report)
  return params, _model_config(arch, act), report


def convert_clip(state_dict: Mapping[str, np.ndarray], heads: Optional[int] = None,
                 act: Optional[str] = None):
  """OpenAI / OpenCLIP keys -> (encoder params, model config, report).

  `act`: the MLP activation, 'quick_gelu' (OpenAI, the default) or 'gelu'
  (OpenCLIP models without -quickgelu); see `activation_from_source`.
  """
  prefix = _clip_prefix(state_dict)
  if prefix is None:
    raise ConversionError('no visual.conv1.weight / visual.transformer.resblocks.0.* '
                                   'keys: not an OpenAI CLIP or OpenCLIP checkpoint')
  report = registry.Report()
  tower, source_names = {}, {}
  for key, value in state_dict.items():
    if key.startswith(prefix):
      name = key[len(prefix):]
      tower[name] = value
      source_names[name] = key
    else:
      report.unused.append(key)
  # No tensor records the MLP activation: say which one the converted model uses.
  if act is None:
    act = 'quick_gelu'
    report.notices.append(
        'MLP activation: quick_gelu assumed (OpenAI CLIP, OpenCLIP "-quickgelu" models); '
        'OpenCLIP models trained with nn.GELU (LAION ViT-B-16, ViT-L-14, ViT-H-14) need '
        '--act gelu')
  else:
    report.notices.append(f'MLP activation: {act} (family {family_for(act)})')
  return _finish(tower, source_names, heads, report, lambda k: prefix + k, act)


_HF_BLOCK = [
    (r'layer_norm1\.(weight|bias)', r'ln_1.\1'),
    (r'layer_norm2\.(weight|bias)', r'ln_2.\1'),
    (r'mlp\.fc1\.(weight|bias)', r'mlp.c_fc.\1'),
    (r'mlp\.fc2\.(weight|bias)', r'mlp.c_proj.\1'),
    (r'self_attn\.out_proj\.(weight|bias)', r'attn.out_proj.\1'),
]
_HF_TOP = [
    (r'embeddings\.class_embedding', 'class_embedding'),
    (r'embeddings\.patch_embedding\.weight', 'conv1.weight'),
    (r'embeddings\.position_embedding\.weight', 'positional_embedding'),
    (r'pre_layrnorm\.(weight|bias)', r'ln_pre.\1'),     # sic: transformers' spelling
    (r'post_layernorm\.(weight|bias)', r'ln_post.\1'),
]


def convert_hf_clip(state_dict: Mapping[str, np.ndarray], heads: Optional[int] = None,
                    hf_config: Optional[Mapping] = None, act: Optional[str] = None):
  """transformers CLIP vision keys -> (encoder params, model config, report).

  `hf_config`: the `config.json` saved beside the weights (CLIPConfig or
  CLIPVisionConfig), if any: gives the head count and the activation
  (`hidden_act`: quick_gelu -> 'clip', gelu -> 'clip_gelu'), and is checked
  for a LayerNorm epsilon this encoder does not implement. `act` overrides
  the activation only where no config.json says otherwise.
  """
  p = _hf_prefix(state_dict)
  if p is None:
    raise ConversionError('no *embeddings.patch_embedding.weight key: not a Hugging '
                                   'Face CLIP vision checkpoint')
  report = registry.Report()
  vision = dict((hf_config or {}).get('vision_config', hf_config or {}))
  if vision:
    # transformers' CLIPVisionConfig default is quick_gelu; its 'gelu' is the exact erf GELU.
    hidden_act = vision['hidden_act'] if 'hidden_act' in vision else 'quick_gelu'
    if hidden_act not in ACTIVATION_FAMILIES:
      raise ConversionError(
          f'config.json: vision hidden_act={hidden_act!r}; the CLIP encoder implements '
          f'{sorted(ACTIVATION_FAMILIES)}, so this model would not give the same numbers')
    if act is not None and act != hidden_act:
      raise ConversionError(f'--act {act} but config.json says vision hidden_act='
                                     f'{hidden_act!r}')
    act = hidden_act
    eps = vision.get('layer_norm_eps', 1e-5)
    if abs(float(eps) - 1e-5) > 1e-12:
      raise ConversionError(f'config.json: layer_norm_eps={eps}; the CLIP encoder '
                                      'uses 1e-5')
    if heads is None and 'num_attention_heads' in vision:
      heads = int(vision['num_attention_heads'])
      report.notices.append(f'heads={heads} from config.json')
  tower, source_names = {}, {}
  qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
  for key, value in state_dict.items():
    if key == 'visual_projection.weight':
      tower['proj'] = np.ascontiguousarray(np.asarray(value).T)   # (E, D) -> (D, E)
      source_names['proj'] = key
      continue
    if not key.startswith(p) or key.startswith('text_model.'):
      report.unused.append(key)
      continue
    sub = key[len(p):]
    m = re.fullmatch(r'encoder\.layers\.(\d+)\.(.*)', sub)
    name = None
    if m:
      i, rest = int(m.group(1)), m.group(2)
      q = re.fullmatch(r'self_attn\.([qkv])_proj\.(weight|bias)', rest)
      if q:
        qkv.setdefault((i, q.group(2)), {})[q.group(1)] = (key, value)
        continue
      for pattern, template in _HF_BLOCK:
        if re.fullmatch(pattern, rest):
          name = f'transformer.resblocks.{i}.' + re.sub(rf'^{pattern}$', template, rest)
          break
    else:
      for pattern, template in _HF_TOP:
        if re.fullmatch(pattern, sub):
          name = re.sub(rf'^{pattern}$', template, sub)
          break
    if name is None:
      report.unused.append(key)       # e.g. embeddings.position_ids (a buffer)
      continue
    tower[name] = value
    source_names[name] = key
  for (i, kind), parts in sorted(qkv.items()):
    name = f'transformer.resblocks.{i}.attn.in_proj_{kind}'
    for letter in 'qkv':
      if letter not in parts:
        raise ConversionError(
            f'missing key {p}encoder.layers.{i}.self_attn.{letter}_proj.{kind}')
    # CLIP's in_proj is [q; k; v] stacked on the output axis.
    tower[name] = np.concatenate([np.asarray(parts[c][1]) for c in 'qkv'], axis=0)
    source_names[name] = f'{p}encoder.layers.{i}.self_attn.{{q,k,v}}_proj.{kind}'
  act = act or 'quick_gelu'
  report.notices.append(f'MLP activation: {act} (family {family_for(act)})')
  return _finish(tower, source_names, heads, report, lambda k: _hf_name(p, k), act)


def _hf_name(prefix: str, clip_name: str) -> str:
  """CLIP name -> the transformers key it comes from (for messages)."""
  m = re.fullmatch(r'transformer\.resblocks\.(\d+)\.(.*)', clip_name)
  if m:
    rest = m.group(2)
    for pattern, template in _HF_BLOCK:
      back = re.sub(r'\\\.', '.', template)
      if re.fullmatch(back.replace(r'\1', '(weight|bias)'), rest):
        rest = re.sub(back.replace(r'\1', '(weight|bias)'),
                      re.sub(r'\\\.', '.', pattern).replace('(weight|bias)', r'\1'), rest)
        break
    return f'{prefix}encoder.layers.{m.group(1)}.{rest}'
  for pattern, template in _HF_TOP:
    back = template.replace(r'\1', '(weight|bias)')
    if re.fullmatch(back, clip_name):
      return prefix + re.sub(back, re.sub(r'\\\.', '.', pattern).replace('(weight|bias)',
                                                                       r'\1'), clip_name)
  return clip_name


registry.register(registry.Format(
    name='clip', kind='image', detect=detect_clip, convert=convert_clip,
    description='OpenAI CLIP (TorchScript or state dict) and OpenCLIP: visual.* keys'))
registry.register(registry.Format(
    name='hf_clip', kind='image', detect=detect_hf_clip, convert=convert_hf_clip,
    description='Hugging Face CLIPVisionModel / CLIPModel (safetensors or pytorch_model.bin)'))
