r"""AIM on image foundation models beyond the paper: SigLIP B/16 and DINOv2 B/14, K400, 8 frames.

  python -m aim_jax.convert image --src siglip-base-patch16-224/ --out /ckpt/siglip_b16 \
      --format siglip          # HF SiglipVisionModel / SiglipModel, or big_vision .npz
  python -m aim_jax.convert image --src dinov2-base/ --out /ckpt/dinov2_b14 --image-size 224
  python -m aim_jax.train --config configs/foundation.py:siglip_b16 --workdir DIR \
      --config.init_from=/ckpt/siglip_b16 --config.data.train_files=...

The dataset recipe is configs/k400.py:b16_f8 (AdamW 3e-4, wd 0.05, batch 64,
30 epochs, dense 8x16 sampling, 3 clips x 1 crop); only the backbone and the
input statistics change. Same adapters and freeze rule (36 adapters,
temporal_embedding, ln_post, head: 10,966,672 tunable for both rows).
  siglip_b16  SigLIP (or SigLIP 2) ViT-B/16 image tower at 224 px; inputs in
              [-1, 1] (mean = std = 127.5). No class token: temporal attention
              runs over every patch token, the frozen MAP head pools each frame,
              frames are averaged (aim_jax/convert/formats/siglip.py). 103,849,360 params.
  dinov2_b14  DINOv2 ViT-B/14 (518 px checkpoints resampled to 224 px at
              conversion, 16x16 patches); ImageNet mean/std; adapters act on the
              layer-scaled branch outputs (aim_jax/convert/formats/dinov2.py).
              96,690,064 params (dinov2_reg: 4 register tokens, +3,072).
No published numbers exist for these rows.
"""

import ml_collections

from configs import common, k400

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
SIGLIP_MEAN = (127.5, 127.5, 127.5)    # big_vision value_range(-1, 1)
SIGLIP_STD = (127.5, 127.5, 127.5)

# row -> (backbone family, variant, mean, std)
ROWS = {
    'siglip_b16': ('siglip', 'B/16', SIGLIP_MEAN, SIGLIP_STD),
    'dinov2_b14': ('dinov2', 'B/14', IMAGENET_MEAN, IMAGENET_STD),
    'dinov2_reg_b14': ('dinov2_reg', 'B/14', IMAGENET_MEAN, IMAGENET_STD),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, row='siglip_b16')
  if a.row not in ROWS:
    raise ValueError(f'foundation row {a.row!r} is not one of {sorted(ROWS)}')
  backbone, variant, mean, std = ROWS[a.row]
  c = k400.get_config('b16_f8')
  c.model.backbone = backbone
  c.model.variant = variant
  c.data.mean, c.data.std = mean, std
  return c
