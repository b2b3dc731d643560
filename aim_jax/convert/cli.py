r"""The `convert` command: PyTorch checkpoints -> parameter checkpoints, and back.

  python -m aim_jax.convert clip --src ViT-B-16.pt --out ckpt/clip_b16 [--act gelu]
  python -m aim_jax.convert image --src model.safetensors --out DIR [--format NAME]
  python -m aim_jax.convert aim --src vit_b_clip_8frame_k400.pth --out DIR [--heads N]
      [--adapter-scale S]
  python -m aim_jax.convert export-aim --src DIR --out model.pth [--which latest|best]
  python -m aim_jax.convert export-params --src WORKDIR --out DIR [--which latest|best]
  python -m aim_jax.convert formats            # list the registered formats

An existing --out is refused before anything is read; --overwrite replaces a parameter
checkpoint (or export-aim's file), never a training workdir or --src, and only once the
new output is complete.

The written directory is what training (`--config.init_from=DIR`), evaluation
and prediction (`--checkpoint DIR`) read (`aim_jax.checkpoints`). Image models
(`clip`, `image`) give encoder params (`params['backbone']` of an AIM model, plus
CLIP's `proj`); `aim` gives a whole AIM model. `export-aim` and `export-params` read a
parameter checkpoint or a training workdir (its latest or best checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from aim_jax import errors
from aim_jax.convert import registry
from aim_jax.convert.conversion import CLIP_FORMATS, convert, export_aim, export_params


def _overwrite_flag(parser: argparse.ArgumentParser, what: str) -> None:
  parser.add_argument(
      '--overwrite', action='store_true',
      help=f'replace --out if it is {what} (without it, an existing --out is refused); never '
      'a training workdir or --src. The new output is written beside it (OUT.tmp-<pid>) and '
      'renamed over it only when complete')


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m aim_jax.convert', description=__doc__.split('\n')[0])
  sub = p.add_subparsers(dest='command', required=True)
  for name, help_ in (('clip', 'OpenAI CLIP / OpenCLIP / Hugging Face CLIP image tower'),
                      ('image', 'any registered image-model format'),
                      ('aim', 'official AIM model zoo checkpoint (.pth)')):
    s = sub.add_parser(name, help=help_)
    s.add_argument('--src', required=True, help='checkpoint file or Hugging Face directory')
    s.add_argument('--out', required=True, help='output directory (local or gs://)')
    _overwrite_flag(s, 'a parameter checkpoint')
    if name != 'aim':
      s.add_argument('--format', default=None, help='skip detection (see `formats`)')
    s.add_argument('--heads', type=int, default=None,
                   help='attention heads (default: what the config beside the weights or the '
                   'file\'s meta records, else width/64, reported; docs/conversion.md)')
    s.add_argument('--act', choices=('quick_gelu', 'gelu'), default=None,
                   help='CLIP MLP activation: quick_gelu (OpenAI, OpenCLIP -quickgelu) or gelu '
                   '(OpenCLIP without -quickgelu, e.g. LAION); default: from '
                   'open_clip_config.json or the path\'s names, else quick_gelu')
    if name == 'aim':
      s.add_argument('--adapter-scale', type=float, default=None,
                     help='joint adapter scale (default: the file\'s meta, else official 0.5, '
                     '1.0 with num_tadapter=2)')
    s.add_argument('--image-size', type=int, default=None,
                   help='interpolate the positional embedding to this input size (bicubic); '
                   'Swin: the input size (the shift masks follow it)')
    s.add_argument('--num-frames', type=int, default=None,
                   help='interpolate the temporal embedding to this many frames (linear)')
  for name, help_, out in (
      ('export-aim', 'parameter checkpoint or training workdir -> official AIM .pth',
       'output .pth file'),
      ('export-params', 'training workdir -> parameter checkpoint (no optimiser state)',
       'output directory (local or gs://)')):
    e = sub.add_parser(name, help=help_)
    e.add_argument('--src', required=True,
                   help='parameter checkpoint or training workdir (python -m aim_jax.train)')
    e.add_argument('--out', required=True, help=out)
    _overwrite_flag(e, 'an existing .pth file' if name == 'export-aim' else
                    'a parameter checkpoint')
    e.add_argument('--which', choices=('latest', 'best'), default='latest',
                   help="a workdir's last checkpoint or its best by validation top-1")
  sub.add_parser('formats', help='list the registered formats')
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.command == 'formats':
      for f in registry.all_formats().values():
        print(f'{f.name:12s} {f.kind:6s} {f.description}')
      return 0
    if args.command == 'export-aim':
      export_aim(args.src, args.out, which=args.which, overwrite=args.overwrite)
      return 0
    if args.command == 'export-params':
      export_params(args.src, args.out, args.which, overwrite=args.overwrite)
      return 0
    kind = 'aim' if args.command == 'aim' else 'image'
    fmt = getattr(args, 'format', None)
    convert(args.src, args.out, kind, fmt, overwrite=args.overwrite, heads=args.heads,
            act=args.act, adapter_scale=getattr(args, 'adapter_scale', None),
            image_size=args.image_size, num_frames=args.num_frames,
            among=CLIP_FORMATS if args.command == 'clip' and not fmt else None)
    return 0
  except errors.UserError as e:
    if errors.show_traceback():
      raise
    return errors.report(e, 'convert')


def run() -> None:
  """Console script `aim-convert`."""
  sys.exit(main())

