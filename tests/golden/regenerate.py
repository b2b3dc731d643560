"""Regenerates the golden .npz files of this folder from the official AIM PyTorch code.

    python tests/golden/regenerate.py --out /tmp/golden            # all five cases
    python tests/golden/regenerate.py --out /tmp/g aim_tiny_case1   # some of them
    AIM_GOLDEN_DIR=/tmp/golden python -m pytest -q tests/test_model.py   # test against them

Needs torch (CPU is enough), einops and timm, and the official files under
`--official` (default `.official/`, git-ignored) at their repository paths, from
github.com/taoyang1122/adapt-image-models (see README.md here for the commit):

  mmaction/models/backbones/{vit_clip,vit_imagenet,swin2d_adapter}.py
  mmaction/models/heads/{base,i3d_head}.py

The official files are loaded unmodified through the import shims of
`benchmarks.official_torch` (stand-ins for the mmcv/mmaction names they import;
torchvision, which timm imports, comes from tests/torchvision_stub.py when it is
not installed). Each case builds a small model, overwrites every parameter with
seeded normal draws (so adapters, zeroed by the official init, are non-zero),
runs it in eval mode in float32 and writes the arrays the tests read. The
layout of each file is in README.md. `--out` never defaults to this folder:
compare before replacing a committed file (tests/test_golden_regenerate.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import json
import pathlib
import platform
import sys
import types
from typing import Any, Callable, Iterator

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OFFICIAL_REPO = 'github.com/taoyang1122/adapt-image-models'
OFFICIAL_COMMIT = 'b3580d2d3a78ff5cffa6c7a82ce993165166f00f'

FILES = {
    'mmaction.models.backbones.vit_clip': 'mmaction/models/backbones/vit_clip.py',
    'mmaction.models.backbones.vit_imagenet': 'mmaction/models/backbones/vit_imagenet.py',
    'mmaction.models.backbones.swin2d_adapter': 'mmaction/models/backbones/swin2d_adapter.py',
    'mmaction.models.heads.base': 'mmaction/models/heads/base.py',
    'mmaction.models.heads.i3d_head': 'mmaction/models/heads/i3d_head.py',
}

BATCH, VIEWS, CLASSES, DROPOUT = 2, 3, 5, 0.5
FREEZE_RULE = ('trainable iff the full recognizer parameter name contains '
               "'temporal_embedding', 'ln_post', 'cls_head' or 'Adapter' (tools/train.py)")

# name -> (backbone class, seed, constructor arguments)
CASES: dict[str, tuple[str, int, dict]] = {
    'aim_tiny_case1': ('ViT_CLIP', 0, dict(
        input_resolution=32, num_frames=4, patch_size=8, width=64, layers=2, heads=4,
        drop_path_rate=0.2, num_tadapter=1, adapter_scale=0.5)),
    'aim_tiny_case1_tadapter2': ('ViT_CLIP', 1, dict(
        input_resolution=32, num_frames=4, patch_size=8, width=64, layers=2, heads=4,
        drop_path_rate=0.2, num_tadapter=2, adapter_scale=1.0)),
    'aim_vit_in21k_tiny_case1': ('ViT_ImageNet', 0, dict(
        img_size=32, num_frames=4, patch_size=8, embed_dim=64, depth=2, adapter_scale=0.5,
        num_tadapter=1, num_heads=4, drop_path_rate=0.2)),
    'aim_vit_in21k_tiny_case1_tadapter2': ('ViT_ImageNet', 1, dict(
        img_size=32, num_frames=4, patch_size=8, embed_dim=64, depth=2, adapter_scale=1.0,
        num_tadapter=2, num_heads=4, drop_path_rate=0.2)),
    'aim_swin2d_tiny_case1': ('SwinTransformer2D_Adapter', 0, dict(
        patch_size=(2, 28, 28), num_frames=8, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
        window_size=4, drop_path_rate=0.2)),
}

# Generator seeds, as offsets from the case's seed. The two ViT_CLIP files were made
# first, with another layout of seeds (recovered from their arrays): parameters from
# seed+1000, then `input` and `multiview_input` one after the other from seed+7. The
# later files draw parameters from seed, `input` from seed+1000, `multiview_input`
# from seed+2000.
SEED_OFFSETS = {  # kind -> (parameters, input, multiview input; None: continue input's)
    'ViT_CLIP': (1000, 7, None),
    'ViT_ImageNet': (0, 1000, 2000),
    'SwinTransformer2D_Adapter': (0, 1000, 2000),
}

# Swin inputs are drawn at 1/8 of 224 and each value repeated over an 8x8 pixel block,
# only so that the file compresses well; the model sees them as any tensor.
SWIN_BLOCK = 8


# ---------------------------------------------------------------------------
# Loading the official files.

@contextlib.contextmanager
def _turtle_if_missing() -> Iterator[None]:
  """vit_imagenet.py has a stray `from turtle import forward` (needs tkinter); serve a stand-in."""
  try:
    importlib.import_module('turtle')
    yield
    return
  except ImportError:
    pass
  sys.modules['turtle'] = types.ModuleType('turtle')
  sys.modules['turtle'].forward = None
  try:
    yield
  finally:
    sys.modules.pop('turtle', None)


def load_official(root: pathlib.Path) -> dict[str, Any]:
  """The official backbone and head classes, loaded from `root` with the benchmark's shims."""
  sys.path.insert(0, str(ROOT / 'tests'))
  sys.path.insert(0, str(ROOT))
  import torchvision_stub
  torchvision_stub.install()            # timm imports torchvision; nothing here calls it
  from benchmarks import official_torch as ot

  root = root.resolve()
  for rel in FILES.values():
    if not (root / rel).is_file():
      raise FileNotFoundError(f'{root / rel}: official file missing (copy it from {OFFICIAL_REPO} '
                              f'at {OFFICIAL_COMMIT[:7]}; see tests/golden/README.md)')
  stand_ins: list = []
  with ot._import_shims(root, stand_ins), _turtle_if_missing():
    try:
      loaded = ot.exec_files(root, FILES)
    finally:
      for name in FILES:
        sys.modules.pop(name, None)
  return dict(
      ViT_CLIP=loaded['mmaction.models.backbones.vit_clip'].ViT_CLIP,
      ViT_ImageNet=loaded['mmaction.models.backbones.vit_imagenet'].ViT_ImageNet,
      SwinTransformer2D_Adapter=(
          loaded['mmaction.models.backbones.swin2d_adapter'].SwinTransformer2D_Adapter),
      I3DHead=loaded['mmaction.models.heads.i3d_head'].I3DHead)


# ---------------------------------------------------------------------------
# One case.

_EMBEDDINGS = ('class_embedding', 'positional_embedding', 'temporal_embedding', 'cls_token',
               'pos_embed')
_BIAS_TABLES = ('relative_position_bias_table', 'temporal_position_bias_table')


def randomise_(model, seed: int) -> None:
  """Overwrites every parameter, in named_parameters() order, from one seeded generator.

  LayerNorm weights 1 + 0.1 N, biases 0.1 N, embeddings and relative-position
  bias tables 0.5 N, every other weight 0.1 N (N: torch.randn draws).
  """
  import torch
  norms = {f'{name}.weight' for name, m in model.named_modules()
           if isinstance(m, torch.nn.LayerNorm)}
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      n = torch.randn(p.shape, generator=g)
      leaf = name.rsplit('.', 1)[-1]
      if name in norms:
        p.copy_(1 + 0.1 * n)
      elif leaf == 'bias':
        p.copy_(0.1 * n)
      elif leaf in _EMBEDDINGS or leaf in _BIAS_TABLES:
        p.copy_(0.5 * n)
      else:
        p.copy_(0.1 * n)


def _inputs(kind: str, args: dict, seed: int):
  """(input (B,C,T,H,W), multiview_input (1,V,C,T,H,W)), i.i.d. N(0, 1) (SEED_OFFSETS)."""
  import torch
  _, in_offset, mv_offset = SEED_OFFSETS[kind]
  t = args['num_frames']
  if kind == 'SwinTransformer2D_Adapter':
    side, block = 224 // SWIN_BLOCK, SWIN_BLOCK
  else:
    side, block = args.get('input_resolution', args.get('img_size')), 1

  def draw(shape, g):
    x = torch.randn(shape + (3, t, side, side), generator=g)
    return x.repeat_interleave(block, -1).repeat_interleave(block, -2) if block > 1 else x

  g = torch.Generator().manual_seed(seed + in_offset)
  video = draw((BATCH,), g)
  if mv_offset is not None:
    g = torch.Generator().manual_seed(seed + mv_offset)
  return video, draw((1, VIEWS), g)


class _Recorder:
  """Forward hooks that store named module outputs (or inputs) as numpy."""

  def __init__(self):
    self.out: dict[str, Any] = {}
    self.handles = []

  def output(self, module, key: str, pick: Callable = lambda o: o) -> None:
    self.handles.append(module.register_forward_hook(
        lambda m, i, o: self.out.__setitem__(key, pick(o).detach().numpy().copy())))

  def input(self, module, key: str) -> None:
    self.handles.append(module.register_forward_pre_hook(
        lambda m, i: self.out.__setitem__(key, i[0].detach().numpy().copy())))

  def remove(self) -> None:
    for h in self.handles:
      h.remove()


def _hooks(kind: str, backbone, rec: _Recorder) -> None:
  if kind == 'ViT_CLIP':
    rec.output(backbone.ln_pre, 'interm/after_ln_pre')
    for i, blk in enumerate(backbone.transformer.resblocks):
      rec.output(blk, f'interm/block{i}_out')
  elif kind == 'ViT_ImageNet':
    rec.input(backbone.blocks[0], 'interm/after_embed')
    for i, blk in enumerate(backbone.blocks):
      rec.output(blk.T_Adapter, f'interm/block{i}_tbranch')
      rec.output(blk, f'interm/block{i}_out')
    rec.output(backbone.ln_post, 'interm/after_ln_post')
  else:
    rec.input(backbone.layers[0], 'interm/after_patch_embed')
    for s, layer in enumerate(backbone.layers):
      for j, blk in enumerate(layer.blocks):
        if blk.t_attn:
          rec.output(blk.T_Adapter, f'interm/stage{s}_block{j}_tbranch')
        rec.output(blk, f'interm/stage{s}_block{j}_out')
      if layer.downsample is not None:
        rec.output(layer.downsample, f'interm/stage{s}_downsample_out')
    rec.output(backbone.norm, 'interm/after_norm')


def _constructor_args(cls, args: dict) -> dict:
  """Every constructor argument with its value (defaults included) as JSON values."""
  out = {}
  for name, p in inspect.signature(cls.__init__).parameters.items():
    if name == 'self' or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
      continue
    v = args.get(name, p.default)
    if isinstance(v, tuple):
      v = list(v)
    out[name] = v if isinstance(v, (bool, int, float, str, list, type(None))) else repr(v)
  return out


def _metadata(name: str, kind: str, seed: int, args: dict, backbone, model, arrays) -> dict:
  import numpy as np
  import torch
  offsets = SEED_OFFSETS[kind]
  total = sum(p.numel() for p in model.parameters())
  tunable = sum(p.numel() for n, p in model.named_parameters()
                if any(k in n for k in ('temporal_embedding', 'ln_post', 'cls_head', 'Adapter')))
  common = dict(
      case=name.removeprefix('aim_'), official_repo=OFFICIAL_REPO, official_commit=OFFICIAL_COMMIT,
      torch_version=torch.__version__, numpy_version=np.__version__,
      python=platform.python_version(), dtype='float32', mode='eval', seed=seed, batch=BATCH,
      num_views=VIEWS, num_classes=CLASSES, dropout_ratio=DROPOUT,
      param_randomization=(
          'after the official init_weights(), every parameter is overwritten in '
          'model.named_parameters() order with torch.randn(shape, generator=g), '
          f'g = torch.Generator().manual_seed(seed+{offsets[0]}): LayerNorm weights 1+0.1*N, '
          '*.bias 0.1*N, embeddings and relative-position bias tables 0.5*N, other weights '
          '0.1*N; buffers stay as the constructor made them'),
      input_seeds=(f'input: torch.Generator().manual_seed(seed+{offsets[1]}); multiview_input: '
                   + (f'seed+{offsets[2]}' if offsets[2] is not None else
                      'the same generator, drawn after input')),
      tunable_params=tunable, total_params=total, freeze_rule=FREEZE_RULE,
      state_dict_prefix=("'sd/<official recognizer key>' parameters; 'buf/<official key>' "
                         'persistent buffers (Swin only)'),
      multiview=("multiview_input (1, V, C, T, H, W) folded to (V, C, T, H, W); "
                 'multiview_scores (1, K) = mean over V of softmax(view logits)'),
      head='official I3DHead(spatial_type=avg) on the official backbone, eval mode',
      model=f'official {kind} + I3DHead', generator='tests/golden/regenerate.py')
  if kind == 'ViT_CLIP':   # the flat keys the ViT_CLIP tests read
    common.update(args)
    common['input_layout'] = 'input (B, C=3, T, H, W) float32, NCTHW as ViT_CLIP.forward takes it'
    common['interm_layouts'] = ('interm/after_ln_pre (B*T, N, D) b-major; interm/block{i}_out '
                                '(N, B*T, D) sequence-first as in the official code')
    return common
  common['constructor_args'] = _constructor_args(type(backbone), args)
  common['cls_head_in_channels'] = int(arrays['features'].shape[1])
  if kind == 'SwinTransformer2D_Adapter':
    common['num_Ttokens'] = backbone.num_Ttokens
    common['derived_per_stage'] = [dict(
        resolution=list(layer.input_resolution), dim=layer.dim,
        heads=layer.blocks[0].num_heads,
        blocks=[dict(t_attn=bool(b.t_attn), window_size=b.window_size, shift_size=b.shift_size)
                for b in layer.blocks],
        downsample=layer.downsample is not None) for layer in backbone.layers]
  return common


def make_case(name: str, classes: dict[str, Any]) -> dict[str, Any]:
  """All arrays of golden file `name` (without writing it)."""
  import numpy as np
  import torch
  kind, seed, args = CASES[name]
  torch.manual_seed(seed)                   # constructor draws; all are overwritten below
  backbone = classes[kind](**args)
  backbone.init_weights()                   # the official init (pretrained=None)
  width = backbone.num_features if kind == 'SwinTransformer2D_Adapter' else (
      args.get('width') or args.get('embed_dim'))
  head = classes['I3DHead'](num_classes=CLASSES, in_channels=width, spatial_type='avg',
                            dropout_ratio=DROPOUT)
  head.init_weights()
  model = torch.nn.Module()                 # the recognizer's state-dict layout
  model.backbone, model.cls_head = backbone, head
  randomise_(model, seed + SEED_OFFSETS[kind][0])
  model.eval()
  video, multiview = _inputs(kind, args, seed)

  rec = _Recorder()
  _hooks(kind, backbone, rec)
  arrays: dict[str, Any] = {}
  with torch.no_grad():
    features = backbone(video)
    logits = head(features)
    interm = dict(rec.out)
    rec.remove()
    view_logits = head(backbone(multiview.flatten(0, 1)))       # Recognizer3D folds the views
    scores = view_logits.softmax(-1).mean(0, keepdim=True)      # average_clips='prob'
  for key, p in model.state_dict().items():
    is_param = key in dict(model.named_parameters())
    arrays[('sd/' if is_param else 'buf/') + key] = p.detach().numpy().copy()
  arrays.update(input=video.numpy(), features=features.numpy(), logits=logits.numpy(),
                multiview_input=multiview.numpy())
  if kind != 'ViT_CLIP':
    arrays['multiview_view_logits'] = view_logits.numpy()
  arrays['multiview_scores'] = scores.numpy()
  arrays.update(interm)
  meta = _metadata(name, kind, seed, args, backbone, model, arrays)
  arrays['config_json'] = np.array([json.dumps(meta, sort_keys=kind == 'ViT_CLIP', indent=1)])
  return arrays


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('cases', nargs='*', metavar='CASE',
                      help=f'cases to write (default all): {", ".join(CASES)}')
  parser.add_argument('--official', default=str(ROOT / '.official'),
                      help='folder holding the official files at their repository paths')
  parser.add_argument('--out', required=True, help='folder to write CASE.npz into')
  parser.add_argument('--replace', action='store_true',
                      help='allow --out to be tests/golden itself (replaces committed files)')
  a = parser.parse_args(argv)
  unknown = [c for c in a.cases if c not in CASES]
  if unknown:
    parser.error(f'unknown case {unknown[0]!r}; one of {", ".join(CASES)}')
  out = pathlib.Path(a.out)
  if out.resolve() == HERE and not a.replace:
    parser.error(f'--out {a.out} is the committed golden folder: write elsewhere and compare '
                 '(tests/test_golden_regenerate.py), or pass --replace')
  try:
    import numpy as np
    import torch
    classes = load_official(pathlib.Path(a.official))
  except (ImportError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  torch.set_num_threads(1)   # a fixed thread count, whatever the machine's core count
  out.mkdir(parents=True, exist_ok=True)
  for name in a.cases or list(CASES):
    arrays = make_case(name, classes)
    np.savez_compressed(out / f'{name}.npz', **arrays)
    print(f'{out / name}.npz: {len(arrays)} arrays')
  return 0


if __name__ == '__main__':
  sys.exit(main())
