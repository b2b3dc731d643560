"""What a checkpoint's surroundings record about the architecture its tensors do not.

No tensor shape gives a ViT's head count (q, k and v are (H*hd, D) whatever H
is), an AIM model's joint adapter scale (a constant of the forward pass) or,
for timm checkpoints (whose buffers are not saved), a Swin's input resolution.
`recorded(format, src, meta)` reads them from, in this order:

  * the file's `meta.model_config` (the model config `export-aim` writes):
    heads and adapter scale of an AIM model, the image size of an AIM Swin, and the
    dropout and drop-path rates (training only; kept so that a round trip is exact);
  * OpenCLIP's `open_clip_config.json` beside the weights (CLIP only):
    heads = `vision_cfg.width / vision_cfg.head_width` (OpenCLIP's default
    head_width is 64);
  * a `config.json` beside the weights: Hugging Face (`num_attention_heads`,
    or `vision_config.num_attention_heads`; where the key is absent, the
    default of the transformers config class its `model_type` names) or timm
    (`model_args.num_heads`, `model_args.img_size`, `pretrained_cfg.input_size`).

Each value comes with where it was read (for the conversion report) and, for
the head count, the width the same file states, which the caller checks
against the weights: a config of another model is an error, not a guess.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from aim_jax.errors import ConversionError

# Formats whose head count no tensor records (the others read it from a table or a kernel
# shape, and check a given value against it).
HEADS_FORMATS = ('clip', 'hf_clip', 'siglip', 'dinov2', 'timm_vit', 'google_vit_npz', 'aim')
SWIN_FORMATS = ('swin', 'aim_swin')
OPEN_CLIP_CONFIG = 'open_clip_config.json'
# The AIM model config's regularisation rates, which no tensor records either.
RATES = ('dropout_rate', 'drop_path_rate')

# transformers' vision config classes: (hidden_size, num_attention_heads) when the saved
# config.json leaves them out (older transformers saved only what differs from the default).
_HF_DEFAULTS = {
    'clip_vision_model': (768, 12), 'siglip_vision_model': (768, 12),
    'siglip2_vision_model': (768, 12), 'dinov2': (768, 12), 'dinov2_with_registers': (768, 12),
}
# A composite config's vision part, when vision_config names no model_type.
_HF_VISION_TYPE = {'clip': 'clip_vision_model', 'siglip': 'siglip_vision_model',
                   'siglip2': 'siglip2_vision_model'}


@dataclasses.dataclass(frozen=True)
class Recorded:
  value: Any
  why: str                 # where it was read, for messages and the report
  width: int | None = None   # the width the same file states (heads only)


def _directory(src: str) -> str:
  return src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))


def _json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise ConversionError(f'{path}: not valid JSON ({e})') from e


def _hf_heads(blob: Mapping, path: str) -> Recorded | None:
  """Heads of a Hugging Face config (a vision config, or a composite one with vision_config)."""
  vision, where = blob, 'num_attention_heads'
  if isinstance(blob.get('vision_config'), Mapping):
    vision, where = blob['vision_config'], 'vision_config.num_attention_heads'
  model_type = vision.get('model_type') or _HF_VISION_TYPE.get(blob.get('model_type', ''))
  default_width, default_heads = _HF_DEFAULTS.get(model_type, (None, None))
  width = vision.get('hidden_size', default_width)
  if 'num_attention_heads' in vision:
    return Recorded(int(vision['num_attention_heads']),
                    f'{path} ({where}={vision["num_attention_heads"]})',
                    None if width is None else int(width))
  if default_heads is not None:
    return Recorded(default_heads, f'{path} ({where} absent: the default of transformers\' '
                    f'{model_type} config, {default_heads})', int(width))
  return None


def _timm_args(blob: Mapping) -> Mapping:
  args = blob.get('model_args')
  return args if isinstance(args, Mapping) else {}


def _size(value) -> int | None:
  """timm's img_size (int or [H, W]) or input_size ([C, H, W]) -> a square size, or None."""
  if isinstance(value, int):
    return value
  if isinstance(value, (list, tuple)) and len(value) >= 2 and value[-1] == value[-2]:
    return int(value[-1])
  return None


def _config_json(src: str, fields: dict) -> None:
  path = os.path.join(_directory(src), 'config.json')
  if not os.path.exists(path):
    return
  blob = _json(path)
  if not isinstance(blob, Mapping):
    return
  if 'architecture' in blob or 'pretrained_cfg' in blob:          # timm (save_for_hf)
    args = _timm_args(blob)
    if isinstance(args.get('num_heads'), int) and 'heads' not in fields:
      width = args.get('embed_dim')
      fields['heads'] = Recorded(args['num_heads'],
                                 f'{path} (model_args.num_heads={args["num_heads"]})',
                                 width if isinstance(width, int) else None)
    size, where = _size(args.get('img_size')), 'model_args.img_size'
    if size is None:
      cfg = blob.get('pretrained_cfg')
      size, where = _size((cfg or {}).get('input_size')), 'pretrained_cfg.input_size'
    if size is None:
      size, where = _size(blob.get('img_size')), 'img_size'
    if size is not None and 'image_size' not in fields:
      fields['image_size'] = Recorded(size, f'{path} ({where})')
    return
  if 'heads' not in fields:
    heads = _hf_heads(blob, path)
    if heads is not None:
      fields['heads'] = heads
  vision = blob.get('vision_config', blob)
  if isinstance(vision, Mapping) and _size(vision.get('image_size')) and \
      'image_size' not in fields:
    fields['image_size'] = Recorded(_size(vision['image_size']), f'{path} (image_size)')


def _open_clip_heads(src: str) -> Recorded | None:
  path = os.path.join(_directory(src), OPEN_CLIP_CONFIG)
  if not os.path.exists(path):
    return None
  blob = _json(path)
  model_cfg = blob.get('model_cfg', blob) if isinstance(blob, Mapping) else None
  vision = model_cfg.get('vision_cfg') if isinstance(model_cfg, Mapping) else None
  if not isinstance(vision, Mapping) or 'width' not in vision:
    return None
  width = int(vision['width'])
  head_width = int(vision.get('head_width', 64))     # OpenCLIP's CLIPVisionCfg default
  if width % head_width:
    raise ConversionError(f'{path}: vision_cfg.width {width} is not a multiple of head_width '
                          f'{head_width}')
  said = f'head_width={head_width}' if 'head_width' in vision else \
      'head_width absent: OpenCLIP\'s default 64'
  return Recorded(width // head_width, f'{path} (vision_cfg.width={width}, {said})', width)


def _meta(meta: Mapping | None, fmt: str, fields: dict) -> None:
  if not meta or 'model_config' not in meta:
    return
  try:
    cfg = json.loads(meta['model_config'])
  except (TypeError, ValueError) as e:
    raise ConversionError(f'the file\'s meta.model_config is not a JSON model config ({e})') from e
  def why(key: str) -> str:
    return f'{key} of the file\'s meta.model_config (export-aim)'
  if fmt == 'aim' and 'heads' in cfg:
    fields['heads'] = Recorded(int(cfg['heads']), why('heads'),
                               int(cfg['width']) if 'width' in cfg else None)
  scale = (cfg.get('adapters') or {}).get('scale')
  if scale is not None:
    fields['adapter_scale'] = Recorded(float(scale), why('adapters.scale'))
  for key in RATES:   # training-time only (no effect on logits), kept for a round trip
    if cfg.get(key) is not None:
      fields[key] = Recorded(float(cfg[key]), why(key))
  if fmt == 'aim_swin' and 'image_size' in cfg:
    fields['image_size'] = Recorded(int(cfg['image_size']), why('image_size'))


def recorded(fmt: str, src: str, meta: Mapping | None = None) -> dict[str, Recorded]:
  """{'heads' | 'adapter_scale' | 'image_size' | RATES: Recorded} that apply to format `fmt`."""
  fields: dict[str, Recorded] = {}
  src = os.fspath(src)
  if fmt in ('aim', 'aim_swin'):
    _meta(meta, fmt, fields)
    return fields
  if fmt == 'clip':
    heads = _open_clip_heads(src)
    if heads is not None:
      fields['heads'] = heads
  if fmt in HEADS_FORMATS or fmt in SWIN_FORMATS:
    _config_json(src, fields)
  if fmt not in HEADS_FORMATS:
    fields.pop('heads', None)
  if fmt not in SWIN_FORMATS:
    fields.pop('image_size', None)     # a ViT's resolution is its positional embedding's
  return fields


def agree(name: str, flag: str, given: Any, found: Recorded | None) -> Any:
  """The value to use: the given one, the recorded one, or an error when both differ."""
  if found is None or given is None:
    return found.value if given is None and found is not None else given
  if given != found.value:
    raise ConversionError(f'{flag} {given} contradicts {name}={found.value} read from '
                          f'{found.why}; drop {flag} or fix the file')
  return given
