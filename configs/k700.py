r"""Kinetics-700, AIM (README model zoo): B/16 76.9 top-1 and L/14 80.4, 32x3x3 views.

  python -m aim_jax.train --config configs/k700.py:b16_f32 --workdir DIR --config.init_from=...

Official vitclip_base_k700.py: dense sampling, test 3 clips x 3 crops (ThreeCrop at
short side 224), 30 epochs. The shipped file samples 8x16; the README rows are 32
frames (interval 4, as K400), which `b16_f32`/`l14_f32` use; `b16_f8` is the file.
vitclip_large_k700.py sets no backbone lr multiplier (unlike the large K400 and
SSv2 files): the L/14 adapters train at the base lr 3e-4.
"""

import ml_collections

from configs import common

ROWS = {  # row: (top-1, frame_interval)
    'b16_f8': (None, 16), 'b16_f32': (76.9, 4), 'l14_f32': (80.4, 4),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, row='b16_f32')
  if a.row not in ROWS:
    raise ValueError(f'k700 row {a.row!r} is not one of {sorted(ROWS)}')
  backbone, frames = common.split_row(a.row)
  c = common.get_base_config()
  common.set_backbone(c, backbone)
  common.set_frames(c, frames)
  c.model.num_classes = c.data.num_classes = 700
  c.model.adapters.update(dict(num_tadapter=1, scale=0.5))
  c.model.dtype = 'bfloat16'
  c.data.sampling = 'dense'
  c.data.frame_interval = ROWS[a.row][1]
  c.data.test_clips, c.data.test_crops = 3, 3
  c.total_epochs = 30.0
  c.lock()
  return c
