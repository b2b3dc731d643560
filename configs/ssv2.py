r"""Something-Something v2, AIM paper Table 2 (174 classes).

  python -m aim_jax.train --config configs/ssv2.py:b16_f8 --workdir DIR --config.init_from=...

Official vitclip_base_sthv2.py: num_tadapter=2 (T_Adapter_in before the temporal
attention) and adapter scale 1; uniform (TSN) sampling; no flip; RandAugment
(n=4, m=7); random erasing p=0.25; label smoothing 0.1; 50 epochs; test 1 clip x
3 crops. Tunable parameters of b16_f8: 14,343,342. The official large SSv2
config keeps num_tadapter=1 (scale 1); `l14_*` rows follow that file.
"""

import ml_collections

from configs import common

ROWS = ('b16_f8', 'b16_f16', 'b16_f32', 'l14_f32')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, row='b16_f8')
  if a.row not in ROWS:
    raise ValueError(f'ssv2 row {a.row!r} is not one of {sorted(ROWS)}')
  backbone, frames = common.split_row(a.row)
  c = common.get_base_config()
  common.set_backbone(c, backbone)
  common.set_frames(c, frames)
  c.model.num_classes = c.data.num_classes = 174
  c.model.adapters.update(dict(num_tadapter=2 if backbone == 'b16' else 1, scale=1.0))
  c.model.dtype = 'bfloat16'
  c.data.sampling = 'uniform'
  c.data.flip_prob = 0.0              # left/right matters in SSv2 labels
  c.data.randaugment_n, c.data.randaugment_m = 4, 7
  c.data.random_erasing_prob = 0.25
  c.data.val_clips, c.data.val_crops = 1, 1
  c.data.test_clips, c.data.test_crops = 1, 3
  c.label_smoothing = 0.1
  c.total_epochs = 50.0
  c.lock()
  return c
