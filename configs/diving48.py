r"""Diving-48, AIM (README model zoo): B/16 88.9, L/14 90.6 top-1, 32 frames.

  python -m aim_jax.train --config configs/diving48.py:b16_f32 --workdir DIR --config.init_from=...

Official vitclip_{base,large}_diving48.py: uniform sampling of 32 frames, flip 0.5,
50 epochs, no backbone lr multiplier (the L/14 adapters train at 3e-4).

Test views (`views=`):
  'published' (default): the views that reproduce the published number. For B/16
      that is 1 clip x 1 centre crop at short side 256: the README lists 32x1x1
      (809 GFLOPs, one view), and a user reproduced the released checkpoint's
      88.88% with exactly that pipeline (official issue #46; it is the file's
      validation pipeline).
  'file': the test pipeline of the official file. B/16: 1 clip x 3 crops
      (ThreeCrop at short side 224), i.e. 3 views, which the README does not report.
For L/14 both are the file's 1 clip x 1 centre crop at short side 224, which
agrees with the README's 32x1x1 (no checkpoint was released to check further).

  python -m aim_jax.evaluate --config configs/diving48.py:row=b16_f32,views=file ...
"""

import ml_collections

from configs import common

ROWS = {'b16_f32': 88.9, 'l14_f32': 90.6}
VIEWS = ('published', 'file')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, row='b16_f32', views='published')
  if a.row not in ROWS:
    raise ValueError(f'diving48 row {a.row!r} is not one of {sorted(ROWS)}')
  if a.views not in VIEWS:
    raise ValueError(f'diving48 views {a.views!r} is not one of {list(VIEWS)}')
  backbone, frames = common.split_row(a.row)
  c = common.get_base_config()
  common.set_backbone(c, backbone)
  common.set_frames(c, frames)
  c.model.num_classes = c.data.num_classes = 48
  c.model.adapters.update(dict(num_tadapter=1, scale=0.5))
  c.model.dtype = 'bfloat16'
  c.data.sampling = 'uniform'
  c.data.test_clips = 1
  if backbone == 'b16' and a.views == 'file':
    c.data.test_crops, c.data.test_short_side = 3, 224      # vitclip_base_diving48.py test
  elif backbone == 'b16':
    c.data.test_crops, c.data.test_short_side = 1, 256      # README 32x1x1; issue #46
  else:
    c.data.test_crops, c.data.test_short_side = 1, 224      # vitclip_large_diving48.py test
  c.total_epochs = 50.0
  c.lock()
  return c
