"""The paper's parameter counts, from the model configs (jax.eval_shape: nothing allocated).

Arithmetic behind the numbers (ViT-B, D = 768, 8 frames):
  one adapter, hidden h = int(D * ratio):  D*h + h + h*D + D      (ratio .25: 295,872)
  always tunable: temporal_embedding 8*768 = 6,144, ln_post 1,536,
                  head 768*K + K (K400: 307,600; SSv2: 133,806)
  K400 fixed part = 315,280; SSv2 fixed part = 141,486.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from aim_jax import params as P
from aim_jax.models.factory import build_encoder, build_model, resolve_model_config

B16_K400 = dict(variant='B/16', num_frames=8, num_classes=400)
IN21K_SSV2 = dict(backbone='vit_in21k', variant='B/16', num_frames=8, num_classes=174,
                  adapters=dict(num_tadapter=2, scale=1.0))


def counts(cfg) -> tuple[int, int]:
  """(tunable, total) under the official freeze rule."""
  c = resolve_model_config(cfg)
  model = build_model(c)
  shape = (1, c['num_frames'], c['image_size'], c['image_size'], 3)
  abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros(shape))))
  return P.parameter_counts(abstract['params'])


def with_adapters(base, **adapters):
  cfg = dict(base)
  cfg['adapters'] = dict(base.get('adapters', {}), **adapters)
  return cfg


# Table 8: bottleneck ratio. 36 adapters of hidden 48 / 96 / 192 / 384 + 315,280.
@pytest.mark.parametrize('ratio,tunable', [
    (0.0625, 2_998_864), (0.125, 5_654_800), (0.25, 10_966_672), (0.5, 21_590_416)])
def test_table8_bottleneck_ratio_gives_the_papers_tunable_count(ratio, tunable):
  assert counts(with_adapters(B16_K400, ratio=ratio))[0] == tunable


# Table 7: six adapted blocks, wherever they are: 18 * 295,872 + 315,280 = 5,640,976 (5.6M).
@pytest.mark.parametrize('position,count', [('bottom', 6), ('top', 6), ('every_other', 0)])
def test_table7_six_adapted_blocks_give_5640976(position, count):
  assert counts(with_adapters(B16_K400, position=position, position_count=count))[0] == 5_640_976


# A count that selects nothing, or more blocks than exist, is an error naming the field
# (it used to build no adapters at all, or silently adapt every block).
@pytest.mark.parametrize('position,count,message', [
    ('bottom', 0, 'position_count=0 must be in 1..12'),
    ('top', 0, 'position_count=0 must be in 1..12'),
    ('bottom', 13, 'position_count=13 must be in 1..12'),
    ('top', 24, 'position_count=24 must be in 1..12'),
    ('all', 6, "position_count=6 is only used with model.adapters.position 'bottom' or 'top'"),
    ('every_other', 3, 'position_count=3 is only used'),
])
def test_adapter_position_count_out_of_range_is_an_error(position, count, message):
  with pytest.raises(ValueError, match=message):
    build_model(with_adapters(B16_K400, position=position, position_count=count))


def test_adapter_position_count_of_every_block_is_all_blocks():
  assert counts(with_adapters(B16_K400, position='top', position_count=12))[0] == 10_966_672


# Table 1 (IN-21K ViT-B/16, SSv2): 3.7M / 10.8M (two temporal adapters) / 14.3M.
def test_table1_in21k_spatial_adaptation_is_3_7m():
  tunable, _ = counts(with_adapters(IN21K_SSV2, temporal=False, joint=False))
  assert tunable == 12 * 295_872 + 141_486 == 3_691_950
  assert abs(tunable - 3.7e6) < 0.1e6


def test_table1_in21k_plus_temporal_with_two_temporal_adapters_is_10_8m():
  tunable, _ = counts(with_adapters(IN21K_SSV2, joint=False))
  assert tunable == 36 * 295_872 + 141_486 == 10_792_878
  assert abs(tunable - 10.8e6) < 0.1e6


def test_table1_in21k_plus_joint_is_14_3m():
  tunable, _ = counts(IN21K_SSV2)
  assert tunable == 48 * 295_872 + 141_486 == 14_343_342
  assert abs(tunable - 14.3e6) < 0.1e6


# docs/official_recipe.md#parameter-counts: the official ViT_ImageNet, instantiated.
@pytest.mark.parametrize('cfg,expected', [
    (dict(B16_K400, backbone='vit_in21k'), (10_966_672, 96_763_792)),
    (IN21K_SSV2, (14_343_342, 100_140_462)),
])
def test_in21k_totals_match_the_official_model(cfg, expected):
  assert counts(cfg) == expected


def test_in21k_total_is_clip_minus_patch_bias_plus_ln_pre():
  # Same blocks; IN-21K adds the patch bias (768) and drops ln_pre (1,536): CLIP - 768.
  assert counts(B16_K400)[1] - counts(dict(B16_K400, backbone='vit_in21k'))[1] == 768


# Foundation-model rows: the same 10,966,672 tunable on every B-size backbone.
@pytest.mark.parametrize('backbone,variant,encoder', [
    # HF SiglipVisionModel base-patch16-224 (incl. MAP head): 92,884,224.
    ('siglip', 'B/16', 92_884_224),
    # DINOv2 ViT-B/14 has 86,580,480 at 518 px; at 224 px the 1,370-row position table has
    # 257 rows (-854,784) and mask_token (768) is not used: 85,724,928.
    ('dinov2', 'B/14', 85_724_928),
    ('dinov2_reg', 'B/14', 85_724_928 + 4 * 768),
])
def test_foundation_rows_counts(backbone, variant, encoder):
  cfg = dict(B16_K400, backbone=backbone, variant=variant)
  c = resolve_model_config(cfg)
  image = (1, c['image_size'], c['image_size'], 3)
  enc = jax.eval_shape(lambda: nn.unbox(build_encoder(c).init(jax.random.key(0),
                                                              jnp.zeros(image))))
  assert P.count(enc['params']) == encoder
  # AIM adds 36 adapters + temporal_embedding + head; ln_post is the encoder's and trains.
  assert counts(cfg) == (10_966_672, encoder + 36 * 295_872 + 6_144 + 307_600)


# Every config row of this family pins its counts (vision_transformer's models_test habit).
@pytest.mark.parametrize('module,row,expected', [
    ('in21k', 'k400', (10_966_672, 96_763_792)),
    ('in21k', 'ssv2', (14_343_342, 100_140_462)),
    ('foundation', 'siglip_b16', (10_966_672, 103_849_360)),
    ('foundation', 'dinov2_b14', (10_966_672, 96_690_064)),
    ('foundation', 'dinov2_reg_b14', (10_966_672, 96_693_136)),
])
def test_config_rows_have_their_pinned_counts(module, row, expected):
  import importlib
  c = importlib.import_module(f'configs.{module}').get_config(row)
  assert c.model.num_frames == c.data.num_frames == 8
  assert c.model.num_classes == c.data.num_classes
  assert counts(c.model) == expected


def test_in21k_rows_use_imagenet_statistics_not_clips():
  from configs import in21k, k400
  c = in21k.get_config('k400')
  assert tuple(c.data.mean) == (123.675, 116.28, 103.53)
  assert tuple(c.data.std) == (58.395, 57.12, 57.375)
  assert tuple(c.data.mean) != tuple(k400.get_config('b16_f8').data.mean)
  assert c.data.frame_interval == 16 and c.data.test_clips == 3
  s = in21k.get_config('ssv2')
  assert (s.model.adapters.num_tadapter, s.model.adapters.scale, s.data.sampling) == \
      (2, 1.0, 'uniform')
