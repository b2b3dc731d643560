r"""Kinetics-400, AIM (Yang et al., ICLR 2023), README model zoo / paper Table 1.

  python -m aim_jax.train --config configs/k400.py:b16_f8 --workdir DIR \
      --config.init_from=CLIP_B16_DIR \
      --config.data.train_files='gs://.../k400/train-*' --config.data.val_files='...'

Rows (`ROWS`: top-1 / top-5 of the official checkpoints, views frames x clips x crops):
  b16_f8 83.9/96.3 8x3x1, b16_f16 84.5/96.6, b16_f32 84.7/96.7,
  l14_f8 86.8/97.2, l14_f16 87.3/97.6, l14_f32 87.5/97.7.
Recipe (official vitclip_{base,large}_k400.py): AdamW 3e-4, wd 0.05 with the
mmcv exemptions, batch 64, 30 epochs, epoch-wise cosine with 2.5 warm-up
epochs from 0.1x; dense sampling; test 3 clips x 1 centre crop at short side 224.
L/14 rows: backbone lr x0.1 and PCA lighting noise, as vitclip_large_k400.py.
Sampling (clip_len x frame_interval): only the 32-frame file (32x4) ships with
the official code; the 8- and 16-frame rows use 8x16 and 16x8, as the paper
(Appendix A.1: 8/16/32 frames at interval 16/8/4) and the authors (official
issue #20) state: every row spans 128 frames.
"""

import ml_collections

from configs import common

ROWS = {
    # row: (top-1, top-5, frame_interval)
    'b16_f8': (83.9, 96.3, 16), 'b16_f16': (84.5, 96.6, 8), 'b16_f32': (84.7, 96.7, 4),
    'l14_f8': (86.8, 97.2, 16), 'l14_f16': (87.3, 97.6, 8), 'l14_f32': (87.5, 97.7, 4),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, row='b16_f8')
  if a.row not in ROWS:
    raise ValueError(f'k400 row {a.row!r} is not one of {sorted(ROWS)}')
  backbone, frames = common.split_row(a.row)
  c = common.get_base_config()
  # vitclip_large_k400.py: paramwise custom_keys {'backbone': lr_mult 0.1}.
  common.set_backbone(c, backbone, backbone_lr_mult=0.1 if backbone == 'l14' else 1.0)
  common.set_frames(c, frames)
  c.model.num_classes = c.data.num_classes = 400
  c.model.adapters.update(dict(num_tadapter=1, scale=0.5))
  c.model.dtype = 'bfloat16'          # official: apex AMP O1; params stay float32
  c.data.sampling = 'dense'
  c.data.frame_interval = ROWS[a.row][2]
  c.data.val_clips, c.data.val_crops = 1, 1
  c.data.test_clips, c.data.test_crops = 3, 1
  if backbone == 'l14':
    # vitclip_large_k400.py adds PCA lighting noise (alpha_std 0.1).
    c.data.color_jitter = 0.1
  c.total_epochs = 30.0
  c.lock()
  return c
