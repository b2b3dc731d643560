r"""AIM on the ImageNet-21K ViT-B/16 (the official `ViT_ImageNet`; paper Tables 1 and 6).

  python -m aim_jax.convert image --src jx_vit_base_p16_224-80ecf9dd.pth --out /ckpt/vit_b16_in21k
  #   (or a Google vision_transformer ViT-B_16.npz / augreg .npz: same command)
  python -m aim_jax.train --config configs/in21k.py:k400 --workdir /runs/in21k_k400 \
      --config.init_from=/ckpt/vit_b16_in21k --config.data.train_files=... \
      --config.data.val_files=...
  python -m aim_jax.evaluate --config configs/in21k.py:k400 --checkpoint /runs/in21k_k400

Recipe (official vit_imagenet_{k400,ssv2}.py; docs/official_recipe.md#datasets):
the CLIP recipe of the same dataset (configs/k400.py, configs/ssv2.py) except
ImageNet mean/std (not CLIP's). K400: 8 frames at interval 16 (test 3 clips x
centre crop), as configs/k400.py:b16_f8. SSv2: num_tadapter 2, adapter scale 1, 8 uniform frames,
1 clip x 3 crops. Drop path 0.2, per frame (the official timm layout).
The official code loads `jx_vit_base_p16_224-80ecf9dd.pth` (IN-21k pre-train
+ IN-1k fine-tune, trained with mean = std = 0.5) but normalises with the
ImageNet statistics; we keep that quirk.

Rows: 'k400' (10,966,672 tunable of 96,763,792) and 'ssv2' (14,343,342 of
100,140,462; Table 1's 14.3M). Table 1's ablations are config fields:
--config.model.adapters.temporal=False --config.model.adapters.joint=False
gives 3.7M, joint=False alone 10.8M.
"""

import ml_collections

from configs import common, k400, ssv2

# ImageNet mean/std on 0..255 (vit_imagenet_* configs).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

ROWS = ('k400', 'ssv2')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, row='k400')
  if a.row not in ROWS:
    raise ValueError(f'in21k row {a.row!r} is not one of {sorted(ROWS)}')
  # The dataset recipe is the CLIP B/16 8-frame row of the same dataset.
  c = k400.get_config('b16_f8') if a.row == 'k400' else ssv2.get_config('b16_f8')
  c.model.backbone = 'vit_in21k'
  c.model.variant = 'B/16'
  c.model.drop_path_rate = 0.2
  c.data.mean, c.data.std = IMAGENET_MEAN, IMAGENET_STD
  if a.row == 'k400':
    c.data.frame_interval = 16        # vit_imagenet_k400.py: clip_len 8, frame_interval 16
  return c
