r"""AIM on Swin-B (Table 6 of the paper): Kinetics-400, 32 frames, 82.1% top-1, 9.2M tunable.

  python -m aim_jax.convert image --src swin_base_patch4_window7_224_22k.pth \
      --out /ckpt/swin_b_in22k     # a 2D Swin checkpoint: format 'swin', detected
  python -m aim_jax.train --config configs/swin.py:k400 --workdir /runs/swin_b_k400 \
      --config.init_from=/ckpt/swin_b_in22k --config.data.train_files=... \
      --config.data.val_files=...
  python -m aim_jax.evaluate --config configs/swin.py:k400 --checkpoint /runs/swin_b_k400

The official recipe (taoyang1122/adapt-image-models,
configs/recognition/swin/swin2d_adapter_patch244_window7_{kinetics400,sthv2}_1k.py;
docs/official_recipe.md#datasets): an ImageNet-21K 2D Swin-B with a Conv3d
patch embedding (2, 4, 4), so 32 frames give T' = 16 time tokens; ImageNet
mean/std; AdamW lr 1e-3 (SSv2 3e-4), wd 0.05 with the Swin exemptions
(relative_position_bias_table, absolute_pos_embed, norm), backbone lr x0.1:
mmcv's longest matching key decides, so every backbone parameter, adapters
included, trains at 0.1x and keeps weight decay, and only the head gets the
base lr; gradient accumulation 2 (SSv2 4), 30 (SSv2 60) epochs, 2.5 warm-up
epochs, cosine, drop path 0.2 (SSv2 0.4). Test: 4 clips x 3 crops (SSv2 1 x 3),
'prob' averaging. SSv2 (swin2d_adapter_patch244_window7_sthv2_1k.py) also has the
CLIP SSv2 augmentations: no flip, RandAugment (n=4, m=7), random erasing 0.25,
label smoothing 0.1. The official runs used apex mixed precision (O1): both
paper rows compute in bfloat16 with float32 parameters, as the CLIP rows.

Freeze rule quirks kept from the official code: `temporal_position_bias_table`
and the final `norm` stay frozen (no substring of the rule matches them).

Rows: 'k400' (the paper's row), 'ssv2' (the official Swin SSv2 config) and
'tiny' (a 2-stage Swin on synthetic clips, a CPU smoke run of the same code:
`python -m aim_jax.train --config configs/swin.py:tiny --workdir /tmp/swin_tiny`).
Expected counts: 9,172,080 tunable of 95,927,276 (K400); 8,940,430 of
95,695,626 (SSv2).
"""

import ml_collections

from configs import common

# ImageNet mean/std on 0..255 (the Swin configs; CLIP's differ).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# row -> dataset settings (official swin2d_adapter configs).
ROWS = {
    'k400': dict(num_classes=400, frames=32, sampling='dense', frame_interval=2, lr=1e-3,
                 grad_accum=2, epochs=30.0, drop_path=0.2, test_clips=4, test_crops=3,
                 dtype='bfloat16'),
    'ssv2': dict(num_classes=174, frames=32, sampling='uniform', frame_interval=1, lr=3e-4,
                 grad_accum=4, epochs=60.0, drop_path=0.4, test_clips=1, test_crops=3,
                 dtype='bfloat16'),
    'tiny': dict(num_classes=5, frames=4, sampling='uniform', frame_interval=1, lr=1e-2,
                 grad_accum=2, epochs=1.0, drop_path=0.1, test_clips=1, test_crops=1,
                 dtype='float32'),   # a CPU smoke run: float32 is faster there
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, row='k400')
  if a.row not in ROWS:
    raise ValueError(f'configs/swin.py row {a.row!r} is not one of {sorted(ROWS)}')
  row = ROWS[a.row]
  c = common.get_base_config()

  c.model.backbone = 'swin'
  c.model.variant = ''
  c.model.patch_size = 4
  c.model.image_size = 224
  c.model.mlp_ratio = 4.0
  c.model.swin.update(dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                           window_size=7, patch_size_t=2, t_relative=True))
  c.model.num_classes = row['num_classes']
  c.model.drop_path_rate = row['drop_path']
  # The official Swin block hard-codes the MLP-adapter scale 0.5 for every dataset.
  c.model.adapters.scale = 0.5
  common.set_frames(c, row['frames'])

  c.data.num_classes = row['num_classes']
  c.data.sampling = row['sampling']
  c.data.frame_interval = row['frame_interval']
  c.data.mean = IMAGENET_MEAN
  c.data.std = IMAGENET_STD
  c.data.test_clips = row['test_clips']
  c.data.test_crops = row['test_crops']

  c.model.dtype = row['dtype']
  if a.row == 'ssv2':
    c.data.flip_prob = 0.0            # left/right matters in SSv2 labels
    c.data.randaugment_n, c.data.randaugment_m = 4, 7
    c.data.random_erasing_prob = 0.25
    c.label_smoothing = 0.1

  c.total_epochs = row['epochs']
  c.grad_accum_steps = row['grad_accum']
  c.optimizer.lr = row['lr']
  c.optimizer.wd_exempt = ('relative_position_bias_table', 'absolute_pos_embed', 'norm')
  c.optimizer.lr_mults = ml_collections.ConfigDict({'backbone': 0.1})
  if a.row == 'tiny':
    _tiny(c)
  c.lock()
  return c


def _tiny(c: ml_collections.ConfigDict) -> None:
  """Two stages (64 px, patch 8 -> 8x8 then 4x4 tokens, window 4), 4 frames, 5 classes."""
  c.model.update(dict(patch_size=8, image_size=64, num_classes=5, dropout_rate=0.0))
  c.model.swin.update(dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4))
  common.set_frames(c, 4)
  c.data.update(dict(source='synthetic', num_classes=5, image_size=64, sampling='uniform',
                     num_train_examples=64, val_clips=1, val_crops=1, test_clips=1,
                     test_crops=1, train_short_side=72, test_short_side=64))
  c.batch_size = 8
  c.grad_accum_steps = 2
  c.total_steps = 30
  c.steps_per_epoch = 8
  c.optimizer.lr = 1e-2
  c.optimizer.warmup_epochs = 0.5
  c.checkpoint.every_steps = 15
  c.checkpoint.keep = 2
  c.log_every_steps = 5
  c.eval_every_steps = 15
  c.eval.batch_size = 8
