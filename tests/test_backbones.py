"""Backbones beyond CLIP: IN-21K ViT parity, weight formats, what AIM means per family.

Reference models are built locally with random weights in their own library
(timm's `VisionTransformer`, transformers' SigLIP and DINOv2), or written as a
.npz in the Google `vision_transformer` / big_vision layout from the same
weights; each is converted through the format registry and its image features
must match the reference forward.
"""

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torchvision_stub
from conftest import GOLDEN, cpu_env

from aim_jax.convert import cli as convert_cli
from aim_jax.convert import registry
from aim_jax.convert import official_names
from aim_jax import params as P
from aim_jax.models.aim import VideoClassifier, average_views
from aim_jax.models.factory import build_encoder, build_model, resolve_model_config

torch = pytest.importorskip('torch')

IN21K_CASES = ['aim_vit_in21k_tiny_case1', 'aim_vit_in21k_tiny_case1_tadapter2']


# ---------------------------------------------------------------------------
# ImageNet-21K ViT: parity with the official ViT_ImageNet golden outputs.

def _load_golden(name):
  d = np.load(GOLDEN / f'{name}.npz')
  meta = json.loads(str(d['config_json'][0]))
  sd = {k[3:]: d[k] for k in d.files if k.startswith('sd/')}
  args = meta['constructor_args']
  cfg = official_names.infer_aim_config(sd, heads=args['num_heads'],
                                  adapter_scale=args['adapter_scale'])
  params, report = official_names.aim_params_from_state_dict(sd, cfg['heads'], cfg['backbone'])
  assert cfg['backbone'] == 'vit_in21k'
  assert not report.unused and len(report.mapped) == len(sd)
  return d, args, cfg, params, sd


def _nthwc(x):
  return jnp.asarray(x).transpose(0, 2, 3, 4, 1)       # (B, C, T, H, W) -> (B, T, H, W, C)


@pytest.mark.parametrize('case', IN21K_CASES)
def test_in21k_matches_official_outputs_and_every_intermediate(case):
  d, args, cfg, params, _ = _load_golden(case)
  model = build_model(cfg)
  logits, state = model.apply({'params': params}, _nthwc(d['input']), mutable=['intermediates'])
  inter, bb = state['intermediates'], state['intermediates']['backbone']
  b, t = d['input'].shape[0], args['num_frames']
  n, dim = d['interm/after_embed'].shape[1:]
  # No ln_pre in this family: after_ln_pre is the block-0 input, (B*T, N, D) b-major.
  np.testing.assert_allclose(bb['after_ln_pre'][0].reshape(b * t, n, dim),
                             d['interm/after_embed'], atol=1e-4, rtol=0)
  for i in range(args['depth']):
    np.testing.assert_allclose(bb[f'block{i}_out'][0].reshape(b * t, n, dim),
                               d[f'interm/block{i}_out'], atol=1e-4, rtol=0)
    # tbranch: official (B*N, T, D) rows (b n); ours (B, T, N, D).
    ours = bb[f'resblocks_{i}']['tbranch'][0].transpose(0, 2, 1, 3).reshape(b * n, t, dim)
    np.testing.assert_allclose(ours, d[f'interm/block{i}_tbranch'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(inter['features'][0], d['features'][..., 0, 0].transpose(0, 2, 1),
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(logits, d['logits'], atol=2e-5, rtol=0)


@pytest.mark.parametrize('case', IN21K_CASES)
def test_in21k_multiview_scores_match_official(case):
  d, _, cfg, params, _ = _load_golden(case)
  mv = jnp.asarray(d['multiview_input'])                  # (1, V, C, T, H, W)
  v = mv.shape[1]
  logits = build_model(cfg).apply({'params': params}, _nthwc(mv.reshape((-1,) + mv.shape[2:])))
  np.testing.assert_allclose(logits, d['multiview_view_logits'], atol=2e-5, rtol=0)
  np.testing.assert_allclose(average_views(logits, v, 'prob'), d['multiview_scores'],
                             atol=2e-5, rtol=0)


def test_in21k_tolerance_catches_a_tanh_gelu():
  d, _, cfg, params, _ = _load_golden(IN21K_CASES[0])
  model = build_model(cfg)
  wrong = VideoClassifier(backbone=model.backbone.clone(mlp_act='gelu_tanh'),
                          num_classes=model.num_classes, dropout_rate=model.dropout_rate)
  logits = wrong.apply({'params': params}, _nthwc(d['input']))
  assert np.abs(np.asarray(logits) - d['logits']).max() > 2e-5


@pytest.mark.parametrize('case', IN21K_CASES)
def test_in21k_official_checkpoint_exports_back_exactly(case):
  _, _, cfg, params, sd = _load_golden(case)
  back = official_names.aim_params_to_state_dict(params, cfg['heads'], 'vit_in21k')
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


# ---------------------------------------------------------------------------
# Reference libraries. timm imports torchvision, which is not installed: the stub
# of tests/torchvision_stub.py serves it for the duration of the fixture.

@pytest.fixture(scope='module')
def timm():
  with torchvision_stub.installed():
    import timm as timm_module
    yield timm_module


def _randomise(module, seed, std=0.1):
  """Every parameter ~ N(0, std) (LayerNorm / layer-scale weights 1 + std N): no zeros left.

  std 0.1 suits the tiny widths; at B/16 (D = 768) use 0.02, else activations grow
  to ~1e2 and float32 rounding alone exceeds the 1e-4 tolerance.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = std * torch.randn(p.shape, generator=g)
      ones = name.endswith(('norm1.weight', 'norm2.weight', 'norm.weight', 'layernorm.weight',
                            'layer_norm1.weight', 'layer_norm2.weight', 'post_layernorm.weight',
                            'lambda1', 'gamma'))
      p.copy_(1.0 + noise if ones else noise)
  return module.eval()


def _images(n, size, seed=0):
  return np.random.RandomState(seed).randn(n, size, size, 3).astype(np.float32)


def _torch_nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _sd(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _convert(sd, expect, heads=4, **options):
  """Detect the format by keys, then convert (tiny models have 4 heads: not in any tensor)."""
  found = [f.name for f in registry.detect(list(sd))]
  assert found == [expect], found
  params, cfg, report = registry.all_formats()[expect].convert(sd, heads=heads, **options)
  return params, cfg, report


def _features(cfg, params, images):
  return np.asarray(jax.jit(build_encoder(cfg).apply)({'params': params}, jnp.asarray(images)))


def _timm_vit(timm, seed=0, std=0.1, **kw):
  from timm.models.vision_transformer import VisionTransformer
  args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0)
  args.update(kw)
  return _randomise(VisionTransformer(**args), seed, std)


def _timm_features(model, images):
  with torch.no_grad():
    return model(_torch_nchw(images)).numpy()      # num_classes=0: norm(x)[:, 0]


# ---------------------------------------------------------------------------
# timm state dicts.

def test_timm_vit_converts_to_the_in21k_family_and_matches_timm(timm):
  model = _timm_vit(timm)
  sd = _sd(model)
  params, cfg, report = _convert(sd, 'timm_vit')
  assert cfg['backbone'] == 'vit_in21k' and not report.unused
  assert (cfg['width'], cfg['layers'], cfg['heads'], cfg['patch_size'], cfg['image_size']) == \
      (32, 2, 4, 8, 32)
  images = _images(3, 32)
  np.testing.assert_allclose(_features(cfg, params, images), _timm_features(model, images),
                             atol=1e-4, rtol=0)


def test_timm_checkpoint_with_a_classifier_reports_the_head_unused(timm):
  model = _timm_vit(timm, num_classes=7)
  _, _, report = _convert(_sd(model), 'timm_vit')
  assert sorted(report.unused) == ['head.bias', 'head.weight']
  assert 'cls_head' in report.summary()


def test_timm_safetensors_file_converts(timm, tmp_path):
  from safetensors.numpy import load_file, save_file
  model = _timm_vit(timm, seed=3)
  save_file(_sd(model), str(tmp_path / 'model.safetensors'))
  params, cfg, _ = _convert(load_file(str(tmp_path / 'model.safetensors')), 'timm_vit')
  images = _images(2, 32, seed=1)
  np.testing.assert_allclose(_features(cfg, params, images), _timm_features(model, images),
                             atol=1e-4, rtol=0)


def test_timm_dinov2_reg_port_converts_to_dinov2_reg(timm):
  # timm's DINOv2-reg4 layout: layer scale, 4 registers, no class-token position row.
  model = _timm_vit(timm, patch_size=7, img_size=28, init_values=1e-5, reg_tokens=4,
                    no_embed_class=True)
  params, cfg, _ = _convert(_sd(model), 'timm_vit')
  assert cfg['backbone'] == 'dinov2_reg'
  images = _images(2, 28)
  np.testing.assert_allclose(_features(cfg, params, images), _timm_features(model, images),
                             atol=1e-4, rtol=0)


def test_timm_clip_style_vit_is_refused_by_name(timm):
  sd = _sd(_timm_vit(timm, pre_norm=True))
  with pytest.raises(official_names.ConversionError, match='norm_pre'):
    registry.all_formats()['timm_vit'].convert(sd, heads=4)


def test_wrong_head_count_names_the_problem(timm):
  sd = _sd(_timm_vit(timm))
  with pytest.raises(official_names.ConversionError, match='heads'):
    registry.all_formats()['timm_vit'].convert(sd, heads=5)


# ---------------------------------------------------------------------------
# Google vision_transformer .npz, written from timm weights in the JAX layout.

def _google_npz_from_timm(sd, heads, path):
  """The `vision_transformer` checkpoint layout (ViT-B_16.npz), from a timm state dict."""
  d = sd['cls_token'].shape[-1]
  hd = d // heads
  out = {'embedding/kernel': sd['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
         'embedding/bias': sd['patch_embed.proj.bias'], 'cls': sd['cls_token'],
         'Transformer/posembed_input/pos_embedding': sd['pos_embed'],
         'Transformer/encoder_norm/scale': sd['norm.weight'],
         'Transformer/encoder_norm/bias': sd['norm.bias'],
         'head/kernel': np.zeros((d, 10), np.float32), 'head/bias': np.zeros(10, np.float32)}
  i = 0
  while f'blocks.{i}.norm1.weight' in sd:
    s, b = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
    out[b + 'LayerNorm_0/scale'], out[b + 'LayerNorm_0/bias'] = sd[s + 'norm1.weight'], \
        sd[s + 'norm1.bias']
    out[b + 'LayerNorm_2/scale'], out[b + 'LayerNorm_2/bias'] = sd[s + 'norm2.weight'], \
        sd[s + 'norm2.bias']
    w, bias = sd[s + 'attn.qkv.weight'], sd[s + 'attn.qkv.bias']
    for j, n in enumerate(('query', 'key', 'value')):
      out[b + f'MultiHeadDotProductAttention_1/{n}/kernel'] = \
          w[j * d:(j + 1) * d].T.reshape(d, heads, hd)
      out[b + f'MultiHeadDotProductAttention_1/{n}/bias'] = bias[j * d:(j + 1) * d].reshape(
          heads, hd)
    out[b + 'MultiHeadDotProductAttention_1/out/kernel'] = \
        sd[s + 'attn.proj.weight'].T.reshape(heads, hd, d)
    out[b + 'MultiHeadDotProductAttention_1/out/bias'] = sd[s + 'attn.proj.bias']
    for j, n in (('1', 'Dense_0'), ('2', 'Dense_1')):
      out[b + f'MlpBlock_3/{n}/kernel'] = sd[s + f'mlp.fc{j}.weight'].T
      out[b + f'MlpBlock_3/{n}/bias'] = sd[s + f'mlp.fc{j}.bias']
    i += 1
  np.savez(path, **out)
  return dict(np.load(path))


def test_google_vit_npz_matches_timm_forward_of_the_same_weights(timm, tmp_path):
  model = _timm_vit(timm, seed=5)
  npz = _google_npz_from_timm(_sd(model), 4, tmp_path / 'ViT-tiny.npz')
  params, cfg, report = _convert(npz, 'google_vit_npz')
  assert cfg['backbone'] == 'vit_in21k'
  assert sorted(report.unused) == ['head/bias', 'head/kernel']
  images = _images(3, 32, seed=2)
  np.testing.assert_allclose(_features(cfg, params, images), _timm_features(model, images),
                             atol=1e-4, rtol=0)


def test_google_npz_and_timm_give_identical_params(timm, tmp_path):
  model = _timm_vit(timm, seed=6)
  a, _, _ = _convert(_google_npz_from_timm(_sd(model), 4, tmp_path / 'v.npz'), 'google_vit_npz')
  b, _, _ = _convert(_sd(model), 'timm_vit')
  fa, fb = P.flatten(a), P.flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


# ---------------------------------------------------------------------------
# SigLIP: Hugging Face SiglipVisionModel and the big_vision .npz.

def _hf_siglip(seed=0, std=0.1, **kw):
  from transformers import SiglipVisionConfig, SiglipVisionModel
  args = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)
  args.update(kw)
  return _randomise(SiglipVisionModel(SiglipVisionConfig(**args)), seed, std)


def _hf_pooled(model, images):
  with torch.no_grad():
    return model(pixel_values=_torch_nchw(images)).pooler_output.numpy()


def test_hf_siglip_converts_and_its_map_pooled_features_match():
  model = _hf_siglip()
  params, cfg, report = _convert(_sd(model), 'siglip')
  assert cfg['backbone'] == 'siglip' and not report.unused
  assert 'class_embedding' not in params and 'MAPHead' in params
  images = _images(3, 32)
  np.testing.assert_allclose(_features(cfg, params, images), _hf_pooled(model, images),
                             atol=1e-4, rtol=0)


def _big_vision_from_hf(sd, heads, scan=False):
  """big_vision SigLIP `params/img/...` layout from a HF SiglipVisionModel state dict."""
  d = sd['embeddings.patch_embedding.weight'].shape[0]
  hd = d // heads
  img = {'embedding/kernel': sd['embeddings.patch_embedding.weight'].transpose(2, 3, 1, 0),
         'embedding/bias': sd['embeddings.patch_embedding.bias'],
         'pos_embedding': sd['embeddings.position_embedding.weight'][None],
         'Transformer/encoder_norm/scale': sd['post_layernorm.weight'],
         'Transformer/encoder_norm/bias': sd['post_layernorm.bias'],
         'MAPHead_0/probe': sd['head.probe'],
         'MAPHead_0/LayerNorm_0/scale': sd['head.layernorm.weight'],
         'MAPHead_0/LayerNorm_0/bias': sd['head.layernorm.bias']}

  def attn(prefix, w, b, ow, ob):
    for j, n in enumerate(('query', 'key', 'value')):
      img[prefix + f'{n}/kernel'] = w[j].T.reshape(d, heads, hd)
      img[prefix + f'{n}/bias'] = b[j].reshape(heads, hd)
    img[prefix + 'out/kernel'] = ow.T.reshape(heads, hd, d)
    img[prefix + 'out/bias'] = ob

  def mlp(prefix, src):
    for j, n in (('1', 'Dense_0'), ('2', 'Dense_1')):
      img[prefix + f'{n}/kernel'] = sd[src + f'fc{j}.weight'].T
      img[prefix + f'{n}/bias'] = sd[src + f'fc{j}.bias']

  inw, inb = sd['head.attention.in_proj_weight'], sd['head.attention.in_proj_bias']
  attn('MAPHead_0/MultiHeadDotProductAttention_0/', np.split(inw, 3), np.split(inb, 3),
       sd['head.attention.out_proj.weight'], sd['head.attention.out_proj.bias'])
  mlp('MAPHead_0/MlpBlock_0/', 'head.mlp.')
  i = 0
  while f'encoder.layers.{i}.layer_norm1.weight' in sd:
    s, b = f'encoder.layers.{i}.', f'Transformer/encoderblock_{i}/'
    for j in '01':
      img[b + f'LayerNorm_{j}/scale'] = sd[s + f'layer_norm{int(j) + 1}.weight']
      img[b + f'LayerNorm_{j}/bias'] = sd[s + f'layer_norm{int(j) + 1}.bias']
    attn(b + 'MultiHeadDotProductAttention_0/',
         [sd[s + f'self_attn.{c}_proj.weight'] for c in 'qkv'],
         [sd[s + f'self_attn.{c}_proj.bias'] for c in 'qkv'],
         sd[s + 'self_attn.out_proj.weight'], sd[s + 'self_attn.out_proj.bias'])
    mlp(b + 'MlpBlock_0/', s + 'mlp.')
    i += 1
  if scan:
    blocks = [k for k in img if k.startswith('Transformer/encoderblock_')]
    tails = sorted({k.split('/', 2)[2] for k in blocks})
    for tail in tails:
      img[f'Transformer/encoderblock/{tail}'] = np.stack(
          [img.pop(f'Transformer/encoderblock_{j}/{tail}') for j in range(i)])
  out = {'params/img/' + k: v for k, v in img.items()}
  out['params/txt/Embed_0/embedding'] = np.zeros((10, d), np.float32)   # the text tower
  out['params/t'] = np.zeros((1,), np.float32)
  return out


@pytest.mark.parametrize('scan', [False, True])
def test_big_vision_siglip_npz_matches_hf_forward_of_the_same_weights(tmp_path, scan):
  model = _hf_siglip(seed=2)
  bv = _big_vision_from_hf(_sd(model), 4, scan=scan)
  np.savez(tmp_path / 'siglip.npz', **bv)
  params, cfg, report = _convert(dict(np.load(tmp_path / 'siglip.npz')), 'siglip')
  assert sorted(report.unused) == ['params/t', 'params/txt/Embed_0/embedding']
  assert 'text tower' in report.summary()
  images = _images(2, 32, seed=4)
  np.testing.assert_allclose(_features(cfg, params, images), _hf_pooled(model, images),
                             atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------
# DINOv2: Hugging Face Dinov2Model / Dinov2WithRegistersModel.

def _hf_dinov2(seed=0, registers=0, std=0.1, **kw):
  import transformers as tr
  args = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=7, mlp_ratio=4)
  args.update(kw)
  if registers:
    model = tr.Dinov2WithRegistersModel(tr.Dinov2WithRegistersConfig(
        num_register_tokens=registers, **args))
  else:
    model = tr.Dinov2Model(tr.Dinov2Config(**args))
  return _randomise(model, seed, std)


@pytest.mark.parametrize('registers,family', [(0, 'dinov2'), (4, 'dinov2_reg')])
def test_hf_dinov2_converts_with_layer_scale_and_registers(registers, family):
  model = _hf_dinov2(registers=registers)
  params, cfg, report = _convert(_sd(model), 'dinov2')
  assert cfg['backbone'] == family
  assert report.unused == ['embeddings.mask_token']
  assert ('register_tokens' in params) == bool(registers)
  images = _images(3, 28)
  np.testing.assert_allclose(_features(cfg, params, images), _hf_pooled(model, images),
                             atol=1e-4, rtol=0)


def test_dinov2_position_resampling_matches_hf_interpolation():
  # Checkpoints are trained at 518 px; AIM runs at 224. Here 28 px (4x4) -> 42 px (6x6).
  model = _hf_dinov2(seed=1)
  params, cfg, report = registry.all_formats()['dinov2'].convert(_sd(model), heads=4, image_size=42)
  assert cfg['image_size'] == 42 and 'resampled' in report.summary()
  images = _images(2, 42, seed=3)
  np.testing.assert_allclose(_features(cfg, params, images), _hf_pooled(model, images),
                             atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------
# What AIM means on each family: at the official init it is the frame-wise image model.

def _tiny(backbone, **kw):
  cfg = dict(backbone=backbone, width=32, layers=2, heads=4, patch_size=8, image_size=32,
             num_frames=3, num_classes=5)
  if backbone.startswith('dinov2'):
    cfg.update(patch_size=7, image_size=28)
  cfg.update(kw)
  return resolve_model_config(cfg)


def _perturbed_init(cfg, seed=0):
  """Init, then every non-adapter parameter random (layer scale ~1, so it matters)."""
  model = build_model(cfg)
  shape = (2, cfg['num_frames'], cfg['image_size'], cfg['image_size'], 3)
  params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros(shape)))['params']
  flat = P.flatten(params)
  rng = np.random.RandomState(seed)
  for k, v in flat.items():
    if 'Adapter' not in k and 'temporal_embedding' not in k:
      flat[k] = jnp.asarray(rng.randn(*v.shape).astype(np.float32) * 0.3 + (
          1.0 if k.endswith(('/ls1', '/ls2', '/scale')) else 0.0))
  return model, P.unflatten(flat)


@pytest.mark.parametrize('backbone,num_tadapter', [
    ('vit_in21k', 1), ('siglip', 1), ('siglip', 2), ('dinov2', 1), ('dinov2_reg', 2)])
def test_aim_at_init_is_the_framewise_image_model_plus_mean_pooling(backbone, num_tadapter):
  cfg = _tiny(backbone, adapters=dict(num_tadapter=num_tadapter))
  model, params = _perturbed_init(cfg)
  video = jnp.asarray(np.random.RandomState(1).randn(
      2, 3, cfg['image_size'], cfg['image_size'], 3).astype(np.float32))
  _, state = model.apply({'params': params}, video, mutable=['intermediates'])
  features = state['intermediates']['features'][0]                   # (B, T, D)
  encoder_params = {k: v for k, v in params['backbone'].items() if k != 'temporal_embedding'}
  encoder_params = P.unflatten({k: v for k, v in P.flatten(encoder_params).items()
                                if 'Adapter' not in k})
  frames = video.reshape((-1,) + video.shape[2:])                     # (B*T, H, W, C)
  image = build_encoder(cfg).apply({'params': encoder_params}, frames)
  np.testing.assert_allclose(features, image.reshape(features.shape), atol=1e-5, rtol=0)
  # ... and the temporal branch does act once the adapters leave their init.
  flat = P.flatten(params)
  rng = np.random.RandomState(2)
  for k in flat:
    if 'T_Adapter/D_fc2/' in k:     # random: a constant shift would vanish in the LayerNorm
      flat[k] = jnp.asarray(rng.randn(*flat[k].shape).astype(np.float32))
  _, moved = model.apply({'params': P.unflatten(flat)}, video, mutable=['intermediates'])
  assert np.abs(moved['intermediates']['features'][0] - features).max() > 1e-3


@pytest.mark.parametrize('backbone', ['siglip', 'dinov2_reg'])
def test_adapters_off_is_exactly_the_image_model_tree_plus_temporal_embedding(backbone):
  cfg = _tiny(backbone, adapters=dict(enabled=False))
  model = build_model(cfg)
  shape = (1, cfg['num_frames'], cfg['image_size'], cfg['image_size'], 3)
  full = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros(shape))))
  image_shape = (1, cfg['image_size'], cfg['image_size'], 3)
  enc = jax.eval_shape(lambda: nn.unbox(build_encoder(cfg).init(
      jax.random.key(0), jnp.zeros(image_shape))))
  names = set(P.flatten(full['params']['backbone']))
  assert names - set(P.flatten(enc['params'])) == {'temporal_embedding'}
  assert set(P.flatten(enc['params'])) <= names


def test_siglip_freeze_rule_trains_ln_post_and_keeps_the_map_head_frozen():
  cfg = _tiny('siglip')
  model = build_model(cfg)
  shape = (1, cfg['num_frames'], cfg['image_size'], cfg['image_size'], 3)
  abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros(shape))))
  mask = P.flatten(P.trainable_mask(abstract['params']))
  assert mask['backbone/ln_post/scale']
  assert not any(v for k, v in mask.items() if 'MAPHead' in k)


# ---------------------------------------------------------------------------
# Real B/16 shapes (converted and checked against the reference forward).

@pytest.mark.slow
def test_b16_shapes_convert_and_match_for_every_format(timm, tmp_path):
  images = _images(1, 224)
  vit = _timm_vit(timm, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                  std=0.02)
  for sd, name in ((_sd(vit), 'timm_vit'),
                   (_google_npz_from_timm(_sd(vit), 12, tmp_path / 'b16.npz'), 'google_vit_npz')):
    params, cfg, _ = _convert(sd, name, heads=12)
    assert P.count(params) == 85_798_656    # ViT-B/16 IN-21K encoder without the classifier
    np.testing.assert_allclose(_features(cfg, params, images), _timm_features(vit, images),
                               atol=1e-4, rtol=0)
  del vit
  siglip = _hf_siglip(std=0.02, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, image_size=224, patch_size=16)
  params, cfg, _ = _convert(_sd(siglip), 'siglip', heads=12)
  np.testing.assert_allclose(_features(cfg, params, images), _hf_pooled(siglip, images),
                             atol=1e-4, rtol=0)
  del siglip
  dino = _hf_dinov2(std=0.02, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=14)
  params, cfg, _ = _convert(_sd(dino), 'dinov2', heads=12)
  np.testing.assert_allclose(_features(cfg, params, images), _hf_pooled(dino, images),
                             atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------
# `python -m aim_jax.convert image`: detection, resizing, the written checkpoint.

def _save_safetensors(sd, path):
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
  return str(path)


def _cli_convert(src, out, *args):
  from aim_jax import checkpoints
  assert convert_cli.main(['image', '--src', src, '--out', str(out), *args]) == 0
  params, cfg, metadata = checkpoints.load_params(str(out))
  return params, cfg, metadata


def test_cli_converts_a_timm_safetensors_file_by_detection(timm, tmp_path):
  model = _timm_vit(timm, seed=7)
  src = _save_safetensors(_sd(model), tmp_path / 'vit.safetensors')
  params, cfg, metadata = _cli_convert(src, tmp_path / 'out', '--heads', '4')
  assert metadata['format'] == 'timm_vit' and cfg['backbone'] == 'vit_in21k'
  images = _images(2, 32, seed=8)
  np.testing.assert_allclose(_features(cfg, params, images), _timm_features(model, images),
                             atol=1e-4, rtol=0)


def test_cli_converts_hf_siglip(tmp_path):
  # HF SigLIP shares HF CLIP's key names but has no class token: detected as SigLIP.
  model = _hf_siglip(seed=9)
  src = _save_safetensors(_sd(model), tmp_path / 'model.safetensors')
  params, cfg, metadata = _cli_convert(src, tmp_path / 'out', '--heads', '4')
  assert metadata['format'] == 'siglip' and cfg['backbone'] == 'siglip'
  images = _images(2, 32, seed=9)
  np.testing.assert_allclose(_features(cfg, params, images), _hf_pooled(model, images),
                             atol=1e-4, rtol=0)


def test_cli_converts_hf_dinov2_at_another_resolution(tmp_path):
  # Dinov2Model resamples without antialiasing, like the conversion (the registers model
  # of transformers uses antialias=True: see aim_jax/convert/formats/dinov2.py).
  model = _hf_dinov2(seed=10)
  src = _save_safetensors(_sd(model), tmp_path / 'model.safetensors')
  params, cfg, metadata = _cli_convert(src, tmp_path / 'out', '--heads', '4',
                                       '--image-size', '42')
  assert metadata['format'] == 'dinov2' and cfg['backbone'] == 'dinov2'
  assert cfg['image_size'] == 42
  images = _images(2, 42, seed=10)
  np.testing.assert_allclose(_features(cfg, params, images), _hf_pooled(model, images),
                             atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------
# A short training run starts from each converted family and its loss falls.

def _losses(stderr):
  out = {}
  for line in stderr.splitlines():
    if '] step ' in line and ' loss=' in line:
      out[int(line.split('] step ')[1].split('/')[0])] = float(line.split(' loss=')[1].split()[0])
  return out


@pytest.mark.slow
@pytest.mark.parametrize('family', ['vit_in21k', 'siglip', 'dinov2'])
def test_short_training_run_from_each_converted_family_learns(family, timm, tmp_path):
  import pathlib
  import subprocess
  # configs/tiny.py's shapes: width 32, 2 layers, 2 heads, patch 8, 32 px.
  if family == 'vit_in21k':
    sd = _sd(_timm_vit(timm, num_heads=2))
  elif family == 'siglip':
    sd = _sd(_hf_siglip(num_attention_heads=2))
  else:
    sd = _sd(_hf_dinov2(num_attention_heads=2, patch_size=8, image_size=32))
  src = _save_safetensors(sd, tmp_path / 'model.safetensors')
  fmt = {'vit_in21k': 'timm_vit', 'siglip': 'siglip', 'dinov2': 'dinov2'}[family]
  _cli_convert(src, tmp_path / 'ckpt', '--heads', '2', '--format', fmt)
  root = pathlib.Path(__file__).resolve().parents[1]
  cmd = [sys.executable, '-m', 'aim_jax.train', '--config', 'configs/tiny.py:steps=60',
         '--workdir', str(tmp_path / 'run'), '--config.progress_bar=False',
         f'--config.init_from={tmp_path / "ckpt"}', f'--config.model.backbone={family}',
         '--config.eval_every_steps=-1']
  # One CPU device: the run is about the converted weights, not the mesh (an 8-device
  # program takes a third longer to compile and start on this machine's two cores).
  out = subprocess.run(cmd, cwd=root, env=cpu_env(1), capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  losses = _losses(out.stderr)
  assert losses[max(losses)] < 0.8 * losses[min(losses)], losses


# ---------------------------------------------------------------------------
# Official ViT_ImageNet checkpoints through `python -m aim_jax.convert aim` and back.

@pytest.mark.parametrize('case', IN21K_CASES)
def test_official_in21k_checkpoint_converts_with_the_aim_command_and_exports_back(
    tmp_path, case):
  from aim_jax import checkpoints
  d, args, _, _, sd = _load_golden(case)
  torch.save({'meta': {'epoch': 30},
              'state_dict': {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}},
             tmp_path / 'vit_imagenet.pth')
  argv = ['aim', '--src', str(tmp_path / 'vit_imagenet.pth'), '--out', str(tmp_path / 'out'),
          '--heads', str(args['num_heads']), '--adapter-scale', str(args['adapter_scale'])]
  assert convert_cli.main(argv) == 0
  params, cfg, info = checkpoints.load_params(str(tmp_path / 'out'))
  assert cfg['backbone'] == 'vit_in21k' and info['mapped'] == len(sd) and not info['unused']
  logits = build_model(cfg).apply({'params': params}, _nthwc(d['input']))
  np.testing.assert_allclose(logits, d['logits'], atol=2e-5, rtol=0)
  assert convert_cli.main(['export-aim', '--src', str(tmp_path / 'out'), '--out',
                       str(tmp_path / 'back.pth')]) == 0
  back = torch.load(tmp_path / 'back.pth', map_location='cpu', weights_only=True)['state_dict']
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k].numpy(), v, err_msg=k)      # bit-exact


@pytest.mark.parametrize('kind', ['google_vit_npz', 'siglip'])
def test_cli_reads_jax_native_npz_checkpoints(timm, tmp_path, kind):
  if kind == 'google_vit_npz':
    model = _timm_vit(timm, seed=11)
    _google_npz_from_timm(_sd(model), 4, tmp_path / 'ViT-B_16.npz')
    reference = _timm_features
  else:
    model = _hf_siglip(seed=11)
    np.savez(tmp_path / 'ViT-B_16.npz', **_big_vision_from_hf(_sd(model), 4))
    reference = _hf_pooled
  params, cfg, metadata = _cli_convert(str(tmp_path / 'ViT-B_16.npz'), tmp_path / 'out',
                                       '--heads', '4')
  assert metadata['format'] == kind
  images = _images(2, 32, seed=11)
  np.testing.assert_allclose(_features(cfg, params, images), reference(model, images),
                             atol=1e-4, rtol=0)


def test_jax_native_checkpoints_carry_their_head_count(timm, tmp_path):
  npz = _google_npz_from_timm(_sd(_timm_vit(timm, seed=12)), 4, tmp_path / 'v.npz')
  _, cfg, _ = registry.all_formats()['google_vit_npz'].convert(npz)          # no heads given
  assert cfg['heads'] == 4
  with pytest.raises(official_names.ConversionError, match='query/kernel.*4 heads'):
    registry.all_formats()['google_vit_npz'].convert(npz, heads=2)
  bv = _big_vision_from_hf(_sd(_hf_siglip(seed=12)), 4)
  assert registry.all_formats()['siglip'].convert(bv)[1]['heads'] == 4


@pytest.mark.slow
@pytest.mark.parametrize('backbone', ['siglip', 'dinov2_reg'])
def test_scanned_layers_agree_with_the_loop_layout(backbone):
  cfg = _tiny(backbone)
  model, params = _perturbed_init(cfg)
  video = jnp.asarray(np.random.RandomState(3).randn(
      1, 3, cfg['image_size'], cfg['image_size'], 3).astype(np.float32))
  scanned = build_model(dict(cfg, scan_layers=True))
  np.testing.assert_allclose(scanned.apply({'params': P.to_scan_layout(params)}, video),
                             model.apply({'params': params}, video), atol=1e-5, rtol=0)


def test_naflex_siglip2_is_refused_by_name():
  from transformers import Siglip2VisionConfig, Siglip2VisionModel
  model = Siglip2VisionModel(Siglip2VisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
      patch_size=8, num_patches=16))
  with pytest.raises(official_names.ConversionError, match='NaFlex'):
    registry.all_formats()['siglip'].convert(_sd(model), heads=4)


# ---------------------------------------------------------------------------
# The head count is read where the source records it (config.json beside the weights),
# and guessed, with a notice, only where nothing does (aim_jax/convert/source_config.py).

def _saved_pretrained(model, directory):
  model.save_pretrained(str(directory))           # config.json + model.safetensors
  assert {'config.json', 'model.safetensors'} <= {p.name for p in directory.iterdir()}
  return str(directory)


@pytest.mark.parametrize('family', ['siglip', 'dinov2'])
def test_save_pretrained_heads_come_from_config_json_and_features_match(family, tmp_path):
  # Width 64 with 4 heads: head dim 16, so width/64 (1 head) would be silently wrong.
  if family == 'siglip':
    model = _hf_siglip(seed=13, hidden_size=64, intermediate_size=128, num_attention_heads=4)
    size = 32
  else:
    model = _hf_dinov2(seed=13, hidden_size=64, num_attention_heads=4)
    size = 28
  src = _saved_pretrained(model, tmp_path / 'hf')
  params, cfg, metadata = _cli_convert(src, tmp_path / 'out')         # no --heads
  assert metadata['format'] == family and cfg['heads'] == 4
  assert any(n.startswith('heads=4 read from') and 'num_attention_heads=4' in n
             for n in metadata['notices']), metadata['notices']
  assert not any('guessed' in n for n in metadata['notices'])
  images = _images(2, size, seed=13)
  np.testing.assert_allclose(_features(cfg, params, images), _hf_pooled(model, images),
                             atol=1e-5, rtol=0)
  # The same weights without their config: width/64 is a guess, and the report says so.
  bare = tmp_path / 'bare'
  bare.mkdir()
  (bare / 'model.safetensors').write_bytes((tmp_path / 'hf' / 'model.safetensors').read_bytes())
  _, cfg, metadata = _cli_convert(str(bare), tmp_path / 'out_bare')
  assert cfg['heads'] == 1
  assert 'heads=1 guessed as width/64: no config records it; pass --heads' in metadata['notices']


def test_heads_that_contradict_config_json_are_an_error_naming_both(tmp_path, capsys):
  src = _saved_pretrained(_hf_siglip(seed=14, hidden_size=64, intermediate_size=128,
                                     num_attention_heads=4), tmp_path / 'hf')
  assert convert_cli.main(['image', '--src', src, '--out', str(tmp_path / 'o'),
                           '--heads', '2']) != 0
  err = capsys.readouterr().err
  assert '--heads 2 contradicts' in err and 'num_attention_heads=4' in err, err
  # A config.json of another model (another width) is not read as this one's.
  blob = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  blob['hidden_size'] = 128
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps(blob))
  assert convert_cli.main(['image', '--src', src, '--out', str(tmp_path / 'o2')]) != 0
  err = capsys.readouterr().err
  assert '128 wide' in err and '64 wide' in err, err


def test_composite_hf_config_without_heads_uses_the_transformers_default(tmp_path):
  # Older transformers saved only non-default fields: `vision_config` of google/siglip-base-*
  # names no num_attention_heads, so SiglipVisionConfig's default (12) applies.
  from aim_jax.convert import source_config
  (tmp_path / 'config.json').write_text(json.dumps(
      {'model_type': 'siglip', 'vision_config': {'model_type': 'siglip_vision_model'}}))
  found = source_config.recorded('siglip', str(tmp_path))['heads']
  assert (found.value, found.width) == (12, 768)
  assert 'default' in found.why and 'vision_config.num_attention_heads' in found.why


def test_timm_config_json_records_the_heads(timm, tmp_path):
  from timm.models import _hub
  model = _randomise(timm.create_model(
      'vit_tiny_patch16_224', pretrained=False, num_classes=0, img_size=32, patch_size=8,
      embed_dim=64, depth=2, num_heads=4), 15)
  _hub.save_for_hf(model, str(tmp_path / 'hub'))        # config.json with model_args
  params, cfg, metadata = _cli_convert(str(tmp_path / 'hub'), tmp_path / 'out')
  assert metadata['format'] == 'timm_vit' and cfg['heads'] == 4
  assert any('model_args.num_heads=4' in n for n in metadata['notices'])
  images = _images(2, 32, seed=15)
  np.testing.assert_allclose(_features(cfg, params, images), _timm_features(model, images),
                             atol=1e-5, rtol=0)
