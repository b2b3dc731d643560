r"""Diving-48, AIM (README model zoo): B/16 88.9, L/14 90.6 top-1, 32 frames.

  python -m aim_jax.train --config configs/diving48.py:b16_f32 --workdir DIR --config.init_from=...

Official vitclip_{base,large}_diving48.py: uniform sampling of 32 frames, flip 0.5,
50 epochs; test 1 clip x 3 crops for B/16 (README lists 32x1x1) and 1 centre crop
for L/14.
"""

import ml_collections

from configs import common

ROWS = {'b16_f32': 88.9, 'l14_f32': 90.6}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, row='b16_f32')
  if a.row not in ROWS:
    raise ValueError(f'diving48 row {a.row!r} is not one of {sorted(ROWS)}')
  backbone, frames = common.split_row(a.row)
  c = common.get_base_config()
  common.set_backbone(c, backbone)
  common.set_frames(c, frames)
  c.model.num_classes = c.data.num_classes = 48
  c.model.adapters.update(dict(num_tadapter=1, scale=0.5))
  c.model.dtype = 'bfloat16'
  c.data.sampling = 'uniform'
  c.data.test_clips, c.data.test_crops = 1, (3 if backbone == 'b16' else 1)
  c.total_epochs = 50.0
  c.lock()
  return c
