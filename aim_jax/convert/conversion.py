"""Conversion of PyTorch (and big_vision) checkpoints to parameter checkpoints, and back.

Python API: `load_clip(path)`, `load_image(path)`, `load_aim(path)` ->
`Conversion(params, model_config, report, format)`; `convert(...)` also writes
the directory (`aim_jax.checkpoints.save_params`); `export_aim(dir, path)` writes
the official `.pth`. The command line is `aim_jax.convert.cli`.

Formats live in `aim_jax.convert.formats.<name>` and register themselves
(`aim_jax.convert.registry`); the source format is detected from the key names.
Nothing in a checkpoint is executed (`aim_jax.convert.torch_files`). Every
conversion ends with a summary of the mapped keys, the unused source keys (e.g.
CLIP's text tower) and the target parameters left at initialisation.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from aim_jax import params as P
from aim_jax.convert import official_names, registry, source_config, torch_files
from aim_jax.convert.output import check_output, write_output
from aim_jax.convert.registry import Report
from aim_jax.errors import ConversionError, first_line

# Keys under which trainers nest the model's state dict, tried in this order.
_NESTED_KEYS = ('state_dict', 'model', 'module', 'model_state_dict', 'state_dict_ema')


# What `convert clip` / `load_clip` detect among (only CLIP towers, whatever else matches).
CLIP_FORMATS = ('clip', 'hf_clip')
# Formats whose MLP activation no tensor records, so `act` picks it (CLIP towers, AIM on CLIP).
ACT_FORMATS = ('clip', 'hf_clip', 'aim')


@dataclasses.dataclass
class Conversion:
  params: dict              # loop layout, float32 numpy
  model_config: dict        # resolved (aim_jax.models.factory.default_model_config keys)
  report: Report
  format: str
  kind: str                 # 'image' | 'aim'
  source: str = ''


# ---------------------------------------------------------------------------
# Reading.

def _weights_file(path: str) -> list[str]:
  """A file, or a Hugging Face directory -> the weight files to read (shards in order)."""
  if not os.path.isdir(path):
    return [path]
  for index in ('model.safetensors.index.json', 'pytorch_model.bin.index.json'):
    if os.path.exists(os.path.join(path, index)):
      with open(os.path.join(path, index)) as f:
        shards = sorted(set(json.load(f)['weight_map'].values()))
      return [os.path.join(path, s) for s in shards]
  for name in ('model.safetensors', 'open_clip_model.safetensors', 'pytorch_model.bin',
               'open_clip_pytorch_model.bin'):
    if os.path.exists(os.path.join(path, name)):
      return [os.path.join(path, name)]
  raise torch_files.CheckpointReadError(f'{path}: directory without model.safetensors or '
                                     'pytorch_model.bin')


def _unwrap(obj: Any, path: str, log: Callable[[str], None],
            info: dict | None = None) -> dict:
  """Top-level checkpoint object -> the flat state dict inside it.

  `info` (if given) receives the file's `meta` entry (mmcv, `export-aim`).
  """
  if isinstance(obj, torch_files.ScriptModuleState):
    log(f'  TorchScript archive ({obj.qualified_name}): read its tensors, no code run')
    return torch_files.state_dict_of(obj, path)
  if not isinstance(obj, Mapping):
    raise torch_files.CheckpointReadError(f'{path}: top-level object is {type(obj).__name__}')
  if info is not None and isinstance(obj.get('meta'), Mapping):
    info['meta'] = dict(obj['meta'])
  for key in _NESTED_KEYS:
    inner = obj.get(key)
    if isinstance(inner, Mapping) and inner and all(
        isinstance(v, np.ndarray) for v in inner.values()):
      others = sorted(k for k in obj if k != key)
      log(f'  state dict under {key!r}' + (f' (also in file: {", ".join(others)})'
                                            if others else ''))
      obj = inner
      break
  arrays = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
  if not arrays:
    raise torch_files.CheckpointReadError(
        f'{path}: no tensors at the top level or under {"/".join(_NESTED_KEYS)}')
  if all(k.startswith('module.') for k in arrays):
    log('  stripped the DistributedDataParallel prefix module.')
    arrays = {k[len('module.'):]: v for k, v in arrays.items()}
  return arrays


# Errors numpy and zipfile raise for a damaged archive or member (encrypted: RuntimeError,
# unknown compression: NotImplementedError).
_NPZ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError,
               NotImplementedError)


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """A numpy `.npz` archive -> {name: array}; a damaged or foreign file is an error naming it."""
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: no such file' if not os.path.exists(path) else
                          f'{path} is not a file')
  with open(path, 'rb') as f:
    magic = f.read(6)
  if not magic:
    raise ConversionError(f'{path}: empty file')
  if magic == b'\x93NUMPY':
    raise ConversionError(f'{path}: a single .npy array, not an .npz archive of named arrays')
  if not magic.startswith((b'PK\x03\x04', b'PK\x05\x06')):
    raise ConversionError(f'{path}: not a numpy .npz archive (no zip header)')
  try:
    npz = np.load(path, allow_pickle=False)
  except _NPZ_ERRORS as e:
    raise ConversionError(f'{path}: not a complete zip archive ({first_line(e)}); the file is '
                          'truncated or corrupt') from None
  sd = {}
  with npz:
    for key in npz.files:
      try:
        value = npz[key]
      except _NPZ_ERRORS as e:
        if 'allow_pickle' in str(e):
          raise ConversionError(f'{path}: array {key!r} holds pickled Python objects, which are '
                                'never loaded: not a numeric checkpoint') from None
        raise ConversionError(f'{path}: array {key!r} cannot be read ({first_line(e)}); the '
                              'file is truncated or corrupt') from None
      if not isinstance(value, np.ndarray):     # a member that is no .npy: numpy gives bytes
        raise ConversionError(f'{path}: member {key!r} is not a numpy array: not a numpy .npz '
                              'archive')
      sd[key] = value
  if not sd:
    raise ConversionError(f'{path}: an .npz archive without arrays')
  return sd


def read_state_dict(path: str, log: Callable[[str], None] = print,
                    info: dict | None = None) -> dict[str, np.ndarray]:
  """Any supported checkpoint file (or HF directory) -> flat {key: numpy array}.

  `info` (if given) receives non-tensor entries that conversion uses (`meta`).
  """
  sd = {}
  for f in _weights_file(os.fspath(path)):
    if f.endswith('.npz'):
      # JAX-native checkpoints (Google vision_transformer, big_vision SigLIP): flat
      # '/'-joined names; no pickles are loaded.
      sd.update(_read_npz(f))
      continue
    sd.update(_unwrap(torch_files.load(f), f, log, info))
  return sd


def _hf_config(path: str) -> dict | None:
  directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  cfg = os.path.join(directory, 'config.json')
  if os.path.exists(cfg):
    with open(cfg) as f:
      blob = json.load(f)
    if 'vision_config' in blob or 'num_attention_heads' in blob:
      return blob
  return None


def _activation(fmt_name: str, src: str, info: Mapping) -> tuple[str | None, str]:
  """The MLP activation a checkpoint's surroundings state, for formats that cannot read it.

  CLIP: OpenCLIP's config or the path's names (`formats.clip.activation_from_source`).
  AIM: the model config `export-aim` writes into the file's meta.
  -> (activation or None, where it comes from).
  """
  if fmt_name == 'clip':
    from aim_jax.convert.formats import clip as clip_format
    act, why = clip_format.activation_from_source(src)
  elif fmt_name == 'aim':
    meta = info['meta'] if 'meta' in info else {}
    if 'model_config' not in meta:
      return None, ''
    from aim_jax.models.vit import FAMILIES
    backbone = json.loads(meta['model_config'])['backbone']
    act = FAMILIES[backbone]['mlp_act'] if backbone in FAMILIES else None
    why = f'the file\'s meta.model_config (backbone {backbone!r})'
  else:
    return None, ''
  return act, why


def _float32(sd: dict, report: Report) -> dict:
  """Params are stored in float32 (OpenAI's TorchScript archives hold float16)."""
  kinds = sorted({str(v.dtype) for v in sd.values()
                  if np.issubdtype(v.dtype, np.floating) or str(v.dtype) == 'bfloat16'} -
                 {'float32'})
  if kinds:
    report.notices.append(f'source tensors in {", ".join(kinds)} were cast to float32')
  return {k: (v.astype(np.float32) if v.dtype != np.float32 and
              (np.issubdtype(v.dtype, np.floating) or str(v.dtype) == 'bfloat16') else v)
          for k, v in sd.items()}


# ---------------------------------------------------------------------------
# Resolution and frame-count changes.

def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 (torch's A=-0.75)."""
  def near(x):    # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):     # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of torch.nn.functional.interpolate(bicubic, align_corners=False)."""
  scale = n_in / n_out
  src = (np.arange(n_out) + 0.5) * scale - 0.5       # cubic: no clamping at 0
  base = np.floor(src).astype(int)
  w = _cubic_weights(src - base)
  m = np.zeros((n_out, n_in), np.float64)
  for tap in range(4):
    idx = np.clip(base - 1 + tap, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), idx), w[:, tap])
  return m


def _linear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of interpolate(linear, align_corners=False)."""
  scale = n_in / n_out
  src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(int), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  t = src - lo
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1 - t)
  np.add.at(m, (np.arange(n_out), hi), t)
  return m


def resize_positional_embedding(pos: np.ndarray, new_grid: int, class_token: bool = True
                                ) -> np.ndarray:
  """(cls + g*g, D) -> (cls + new_grid**2, D): bicubic on the grid, class token kept.

  Matches `F.interpolate(grid, mode='bicubic', align_corners=False)` (what the
  CLIP and AIM PyTorch code bases use), computed in float64.
  """
  pos = np.asarray(pos)
  head, grid_tokens = (pos[:1], pos[1:]) if class_token else (pos[:0], pos)
  g = int(round(np.sqrt(grid_tokens.shape[0])))
  if g * g != grid_tokens.shape[0]:
    raise ConversionError(f'positional_embedding: {grid_tokens.shape[0]} grid tokens is not a '
                          'square')
  d = pos.shape[-1]
  m = _bicubic_matrix(g, new_grid)                    # (g', g)
  grid = grid_tokens.reshape(g, g, d).astype(np.float64)        # (g*g, D) -> (g, g, D)
  out = np.einsum('ih,jw,hwd->ijd', m, m, grid)       # separable: rows then columns
  out = out.reshape(new_grid * new_grid, d)            # (g', g', D) -> (g'*g', D)
  return np.concatenate([head, out.astype(pos.dtype)], axis=0)


def resize_temporal_embedding(temb: np.ndarray, frames: int) -> np.ndarray:
  """(1, T, D) -> (1, frames, D): linear along time (interpolate, align_corners=False)."""
  temb = np.asarray(temb)
  m = _linear_matrix(temb.shape[1], frames)          # (T', T)
  return np.einsum('st,btd->bsd', m, temb.astype(np.float64)).astype(temb.dtype)


def _has_class_token(backbone: str) -> bool:
  from aim_jax.models.vit import FAMILIES
  return bool(FAMILIES.get(backbone, {}).get('class_token', True))


def _encoder(params: dict, kind: str) -> dict:
  return params if kind == 'image' else params['backbone']


def _apply_resizes(conv: Conversion, image_size: int | None, num_frames: int | None,
                   log: Callable[[str], None]) -> None:
  cfg, enc = conv.model_config, _encoder(conv.params, conv.kind)
  if image_size and image_size != cfg['image_size']:
    if image_size % cfg['patch_size']:
      raise ConversionError(f'--image-size {image_size} is not a multiple of the patch size '
                            f'{cfg["patch_size"]}')
    if cfg['backbone'] == 'swin':
      # Relative position tables do not depend on the resolution; the shift masks are
      # computed from image_size.
      msg = (f'NOTICE: image_size set to {image_size} (--image-size; the source is '
             f'{cfg["image_size"]}px): the shifted-window masks follow it')
      cfg['image_size'] = image_size
      conv.report.notices.append(msg)
      log(msg)
      image_size = None
    elif 'positional_embedding' not in enc:
      raise ConversionError(f'--image-size: format {conv.format} has no positional_embedding')
  if image_size and image_size != cfg['image_size']:
    old = enc['positional_embedding'].shape
    enc['positional_embedding'] = resize_positional_embedding(
        enc['positional_embedding'], image_size // cfg['patch_size'],
        class_token=_has_class_token(cfg['backbone']))
    msg = (f'NOTICE: positional embedding interpolated (bicubic) from {cfg["image_size"]}px '
           f'{old} to {image_size}px {enc["positional_embedding"].shape}')
    cfg['image_size'] = image_size
    conv.report.notices.append(msg)
    log(msg)
  if num_frames and num_frames != cfg['num_frames']:
    if 'temporal_embedding' in enc:
      old = enc['temporal_embedding'].shape[1]
      enc['temporal_embedding'] = resize_temporal_embedding(enc['temporal_embedding'],
                                                            num_frames)
      msg = (f'NOTICE: temporal embedding interpolated (linear) from {old} to {num_frames} '
             'frames')
    else:
      msg = f'NOTICE: num_frames set to {num_frames} (the temporal embedding starts at zero)'
    cfg['num_frames'] = num_frames
    conv.report.notices.append(msg)
    log(msg)


# ---------------------------------------------------------------------------
# Checking against the model the config describes.

def _abstract_params(cfg: Mapping, kind: str) -> dict:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from aim_jax.models import factory
  cfg = dict(cfg, scan_layers=False)
  if kind == 'image':
    model = factory.build_encoder(cfg)
    x = jnp.zeros((1, cfg['image_size'], cfg['image_size'], 3), jnp.float32)
  else:
    model = factory.build_model(cfg)
    x = jnp.zeros(factory.input_shape(cfg, 1), jnp.float32)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), x))['params'])
  return {k: tuple(v.shape) for k, v in P.flatten(shapes).items()}


def _model_size(model_config: Mapping) -> str:
  """'768 wide' for a ViT, 'Swin, embed_dim 128' for a Swin (whose width is per stage)."""
  if model_config.get('backbone') == 'swin':
    return f'Swin, embed_dim {model_config["swin"]["embed_dim"]}'
  return f'{model_config["width"]} wide'


def verify(conv: Conversion) -> None:
  """Every parameter of the model is converted with the right shape; the error names the key.

  For an image model, also lists what an AIM model built on it would add (left
  at initialisation: temporal embedding, adapters, head).
  """
  want = _abstract_params(conv.model_config, conv.kind)
  have = {k: tuple(np.shape(v)) for k, v in P.flatten(conv.params).items()}
  source = {t: s for s, t in conv.report.mapped}
  for name, shape in have.items():
    if name in want and want[name] != shape:
      raise ConversionError(
          f'key {source.get(name, name)!r} -> {name}: shape {shape}, but the model '
          f'({_model_size(conv.model_config)}) expects {want[name]}')
  missing = sorted(set(want) - set(have))
  if missing:
    raise ConversionError(f'missing key for {missing[0]}' + (
        f' (and {len(missing) - 1} more)' if len(missing) > 1 else '') +
        ': no tensor of the checkpoint maps to it')
  for name, value in P.flatten(conv.params).items():   # damage, not weights: never converted
    value = np.asarray(value)
    if value.dtype.kind == 'f' and not np.isfinite(value).all():
      raise ConversionError(f'key {source.get(name, name)!r} -> {name}: '
                            f'{int((~np.isfinite(value)).sum())} of {value.size} values are NaN '
                            'or infinite (a damaged or diverged checkpoint)')
  extra = sorted(set(have) - set(want))
  if extra:
    raise ConversionError(f'key {source.get(extra[0], extra[0])!r} -> {extra[0]} has no place in '
                          f'the model the checkpoint implies ({conv.model_config["backbone"]})')
  if conv.kind == 'image':
    aim = _abstract_params(dict(conv.model_config, output_dim=0), 'aim')
    conv.report.missing = sorted(k for k in aim if k[len('backbone/'):] not in have)
    unused_by_aim = sorted(k for k in have if 'backbone/' + k not in aim)
    if unused_by_aim:
      conv.report.notices.append(
          f'kept but not used by the AIM model: {", ".join(unused_by_aim)} (image projection)')


def check_options(heads: int | None = None, image_size: int | None = None,
                  num_frames: int | None = None, **unused) -> None:
  """The numeric flags: each in its range (before anything is read)."""
  if heads is not None and heads < 1:
    raise ConversionError(f'--heads {heads}: the number of attention heads must be >= 1')
  if image_size is not None and image_size < 1:
    raise ConversionError(f'--image-size {image_size}: must be a positive multiple of the '
                          'patch size')
  if num_frames is not None and num_frames < 1:
    raise ConversionError(f'--num-frames {num_frames}: the number of frames must be >= 1')


# ---------------------------------------------------------------------------
# Public API.

def _call_with_supported(fn: Callable, *args, **options):
  sig = inspect.signature(fn)
  takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
  given = {k: v for k, v in options.items() if v is not None}
  unsupported = [k for k in given if not takes_any and k not in sig.parameters]
  passed = {k: v for k, v in given.items() if k not in unsupported}
  return fn(*args, **passed), unsupported


def convert_file(src: str, kind: str, format_name: str | None = None, *,
                 among: Sequence[str] | None = None, heads: int | None = None,
                 adapter_scale: float | None = None, act: str | None = None,
                 image_size: int | None = None, num_frames: int | None = None,
                 log: Callable[[str], None] = print) -> Conversion:
  """Read, detect, convert, resize (opt-in) and verify one checkpoint; writes nothing.

  `among`: detect only among these format names (the `clip` command: CLIP's).
  `act`: MLP activation of a CLIP ('quick_gelu' | 'gelu'); by default read from
  what the source states (`_activation`), else the format's default.
  """
  check_options(heads, image_size, num_frames)
  known = registry.all_formats()
  log(f'[1/4] reading {src}')
  info: dict = {}
  sd = read_state_dict(src, log, info)
  log(f'  {len(sd)} tensors')
  if format_name:
    if format_name not in known:
      raise ConversionError(f'--format {format_name!r} is not one of {sorted(known)}')
    fmt = known[format_name]
    if kind != 'any' and fmt.kind != kind:
      raise ConversionError(f'format {format_name!r} converts {fmt.kind} checkpoints, not {kind}')
  else:
    found = [f for f in registry.detect(sd.keys(), None if kind == 'any' else kind)
             if among is None or f.name in among]
    if not found:
      sample = ', '.join(sorted(sd)[:6])
      raise ConversionError(
          f'{src}: no registered {kind} format {"among " + str(list(among)) + " " if among else ""}'
          f'recognises these keys ({sample}, ...); '
          f'known formats: {sorted(known)} (pick one with --format)')
    if len(found) > 1:
      raise ConversionError(f'{src}: keys match several formats {[f.name for f in found]}; '
                            'pick one with --format')
    fmt = found[0]
  log(f'[2/4] converting as {fmt.name!r} ({fmt.description})')
  why = ''
  if act is not None and fmt.name not in ACT_FORMATS:
    # Other formats take **options; their activation is fixed by the family.
    raise ConversionError(f'--act applies to {", ".join(ACT_FORMATS)} checkpoints, not '
                          f'{fmt.name!r}')
  if act is None:
    act, why = _activation(fmt.name, os.fspath(src), info)
  if act is not None:
    log(f'  MLP activation {act}' + (f' ({why})' if why else ' (--act)'))
  pre = Report()
  sd = _float32(sd, pre)
  found = source_config.recorded(fmt.name, os.fspath(src), info.get('meta'))
  heads = source_config.agree('heads', '--heads', heads, found.get('heads'))
  adapter_scale = source_config.agree('adapter_scale', '--adapter-scale', adapter_scale,
                                      found.get('adapter_scale'))
  (params, model_config, report), unsupported = _call_with_supported(
      fmt.convert, sd, heads=heads, adapter_scale=adapter_scale, act=act,
      hf_config=_hf_config(src) if fmt.name == 'hf_clip' else None,
      source_image_size=found['image_size'].value if 'image_size' in found else None)
  if unsupported:
    raise ConversionError(f'format {fmt.name!r} takes no option {", ".join(unsupported)}')
  report.notices[:0] = pre.notices
  model_config = dict(model_config)
  model_config.update({k: found[k].value for k in source_config.RATES if k in found})
  _note_recorded(found, model_config, report, log)
  if why:
    report.notices.append(f'MLP activation {act} read from {why}')
  params = P.to_loop_layout(params)
  conv = Conversion(params, dict(model_config), report, fmt.name, fmt.kind, os.fspath(src))
  _apply_resizes(conv, image_size, num_frames, log)
  log('[3/4] checking every parameter against the model the config describes')
  verify(conv)
  return conv


def _note_recorded(found: Mapping, model_config: Mapping, report: Report,
                   log: Callable[[str], None]) -> None:
  """Say what was read from beside the weights; a config of another width is an error."""
  heads = found.get('heads')
  if heads is not None and heads.width is not None and heads.width != model_config['width']:
    raise ConversionError(f'{heads.why} belongs to a model {heads.width} wide, but the weights '
                          f'are {model_config["width"]} wide: not this model\'s config')
  for name, value in found.items():
    msg = f'{name}={value.value} read from {value.why}'
    report.notices.append(msg)
    log(f'  {msg}')


def load_image(path: str, format_name: str | None = None, **options) -> Conversion:
  """Any registered image-model format -> encoder params (no file written)."""
  return convert_file(path, 'image', format_name, **options)


def load_clip(path: str, format_name: str | None = None, **options) -> Conversion:
  """OpenAI CLIP, OpenCLIP or Hugging Face CLIP vision weights -> encoder params."""
  return convert_file(path, 'image', format_name, among=CLIP_FORMATS, **options)


def load_aim(path: str, **options) -> Conversion:
  """An official AIM `.pth` -> {'backbone', 'cls_head'} params and the full model config."""
  return convert_file(path, 'aim', None, **options)


def _save_params(out: str, params: Mapping, model_config: Mapping, metadata: Mapping,
                 log: Callable[[str], None]) -> None:
  from aim_jax import checkpoints
  try:
    write_output(out, lambda path: checkpoints.save_params(path, params, model_config, metadata),
                 log)
  except OSError as e:
    raise _cannot_write(out, e) from None


def _cannot_write(out: str, e: Exception) -> ConversionError:
  if isinstance(e, OSError) and e.strerror:
    return ConversionError(f'cannot write {out}: {e.strerror}'
                           + (f' ({e.filename})' if e.filename else ''))
  return ConversionError(f'cannot write {out}: {" ".join(str(e).split())}')


def write(conv: Conversion, out: str, log: Callable[[str], None] = print,
          overwrite: bool = False) -> None:
  """Write `conv` as a parameter checkpoint at `out` (`check_output` decides whether it may)."""
  check_output(out, conv.source, overwrite=overwrite)
  log(f'[4/4] writing {out}')
  metadata = dict(kind=conv.kind, format=conv.format, source=os.path.abspath(conv.source),
                  mapped=len(conv.report.mapped), unused=conv.report.unused,
                  left_at_init=conv.report.missing, notices=conv.report.notices)
  _save_params(out, conv.params, conv.model_config, metadata, log)


def convert(src: str, out: str, kind: str = 'image', format_name: str | None = None,
            log: Callable[[str], None] = print, overwrite: bool = False,
            **options) -> Conversion:
  """`convert_file` then `write`, printing the summary.

  An existing `out` is refused before anything is read unless `overwrite` and it is a
  parameter checkpoint (`check_output`).
  """
  check_options(**options)
  check_output(out, src, overwrite=overwrite)
  conv = convert_file(src, kind, format_name, log=log, **options)
  write(conv, out, log, overwrite=overwrite)
  r = conv.report
  log('summary: ' + r.summary().replace('\n', '\n  '))
  if not r.unused:
    log('  unused source keys: none')
  if not r.missing:
    log('  target parameters left at initialisation: none')
  return conv


def export_params(src_dir: str, out_dir: str, which: str = 'latest',
                  log: Callable[[str], None] = print, overwrite: bool = False) -> dict:
  """A training workdir (or a parameter checkpoint) -> a plain parameter checkpoint.

  The frozen and trainable parameters of the run's `which` ('latest' or 'best')
  checkpoint, with the run's model config: what `init_from`, evaluation,
  prediction and `export-aim` read, without the optimiser state. An existing
  `out_dir` is refused unless `overwrite` and it is a parameter checkpoint.
  """
  from aim_jax import checkpoints
  check_output(out_dir, src_dir, overwrite=overwrite)
  log(f'[1/2] reading {src_dir} ({which})')
  params, model_config, kind = checkpoints.load_checkpoint(src_dir, which)
  log(f'[2/2] writing {out_dir}')
  check_output(out_dir, src_dir, overwrite=overwrite)
  _save_params(out_dir, params, model_config, {
      'kind': 'aim_export', 'source': src_dir, 'source_kind': kind,
      'which': which if kind == 'workdir' else None}, log)
  return params


def export_aim(src_dir: str, out_path: str, log: Callable[[str], None] = print,
               which: str = 'latest', overwrite: bool = False) -> dict:
  """An AIM model -> official `{'state_dict': ...}` `.pth`.

  `src_dir`: a parameter checkpoint, or a training workdir (its `which` checkpoint:
  'latest' or 'best'). An existing `out_path` is refused unless `overwrite` and it is
  a file.
  """
  from aim_jax import checkpoints
  from aim_jax.models.factory import resolve_model_config
  check_output(out_path, src_dir, file=True, overwrite=overwrite)
  log(f'[1/2] reading {src_dir}')
  params, model_config, _ = checkpoints.load_checkpoint(src_dir, which)
  cfg = resolve_model_config(model_config)
  if 'backbone' not in params or 'cls_head' not in params:
    raise ConversionError(f'{src_dir}: holds an image encoder, not an AIM model '
                          '(no backbone/ and cls_head/ parameters)')
  if cfg['backbone'] == 'swin':
    from aim_jax.convert.formats import swin as swin_format   # official SwinTransformer2D_Adapter
    sd = swin_format.aim_params_to_state_dict(params, cfg)
  elif cfg['backbone'] not in ('clip', 'clip_gelu', 'vit_in21k'):
    raise ConversionError(f'{src_dir}: backbone {cfg["backbone"]!r} has no official AIM format')
  else:
    sd = official_names.aim_params_to_state_dict(params, cfg['heads'], cfg['backbone'])
  # torch.from_numpy wants writable arrays (restored ones are read-only): copy those only.
  sd = {k: np.require(v, requirements=['C', 'W']) if isinstance(v, np.ndarray) else v
        for k, v in sd.items()}
  log(f'[2/2] writing {len(sd)} tensors to {out_path}')
  check_output(out_path, src_dir, file=True, overwrite=overwrite)
  blob = {'state_dict': sd, 'meta': {'converted_by': 'aim_jax.convert export-aim',
                                     'model_config': json.dumps(cfg)}}
  try:
    write_output(out_path, lambda path: torch_files.save_torch_state_dict(blob, path), log)
  except (OSError, RuntimeError) as e:   # torch.save reports a bad path as RuntimeError
    raise _cannot_write(out_path, e) from None
  return sd
