"""The AIM model: parity with the official PyTorch code, init behaviour, execution options."""

import json

import flax.linen as nn
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aim_jax.convert import official_names
from aim_jax import params as P
from aim_jax.models import adapters as adapters_lib
from aim_jax.models.aim import average_views
from aim_jax.models.factory import build_encoder, build_model, resolve_model_config
from aim_jax.models.vit import MultiHeadAttention
from conftest import GOLDEN

CLIP_CASES = ['aim_tiny_case1', 'aim_tiny_case1_tadapter2']


def load_case(name):
  d = np.load(GOLDEN / f'{name}.npz')
  meta = json.loads(str(d['config_json'][0]))
  sd = {k[3:]: d[k] for k in d.files if k.startswith('sd/')}
  # Every setting is read from the data: heads and the joint scale are not in any tensor.
  cfg = official_names.infer_aim_config(sd, heads=meta['heads'],
                                        adapter_scale=meta['adapter_scale'])
  params, report = official_names.aim_params_from_state_dict(sd, cfg['heads'], cfg['backbone'])
  assert not report.unused and len(report.mapped) == len(sd)
  return d, meta, cfg, params


def ncthw_to_nthwc(x):
  return jnp.asarray(x).transpose(0, 2, 3, 4, 1)


def run(cfg, params, video, **kw):
  model = build_model(cfg)
  logits, state = model.apply({'params': params}, video, mutable=['intermediates'], **kw)
  return logits, state['intermediates']


@pytest.mark.parametrize('case', CLIP_CASES)
def test_matches_official_outputs_and_intermediates(case):
  d, meta, cfg, params = load_case(case)
  assert cfg['num_frames'] == meta['num_frames'] and cfg['num_classes'] == meta['num_classes']
  assert cfg['adapters']['num_tadapter'] == meta['num_tadapter']
  logits, inter = run(cfg, params, ncthw_to_nthwc(d['input']))
  b, t = d['input'].shape[0], meta['num_frames']
  n, dim = d['interm/after_ln_pre'].shape[1:]
  bb = inter['backbone']
  # after_ln_pre: (B*T, N, D) batch-major.
  np.testing.assert_allclose(bb['after_ln_pre'][0].reshape(b * t, n, dim),
                             d['interm/after_ln_pre'], atol=1e-4, rtol=0)
  for i in range(meta['layers']):
    # Official blocks are sequence-first (N, B*T, D); ours (B, T, N, D).
    ref = d[f'interm/block{i}_out'].transpose(1, 0, 2).reshape(b, t, n, dim)
    np.testing.assert_allclose(bb[f'block{i}_out'][0], ref, atol=1e-4, rtol=0)
  # features: (B, D, T, 1, 1) official; ours (B, T, D).
  np.testing.assert_allclose(inter['features'][0], d['features'][..., 0, 0].transpose(0, 2, 1),
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(logits, d['logits'], atol=2e-5, rtol=0)


@pytest.mark.parametrize('case', CLIP_CASES)
def test_multiview_prob_average_matches_official_scores(case):
  d, meta, cfg, params = load_case(case)
  mv = jnp.asarray(d['multiview_input'])                  # (1, V, C, T, H, W)
  v = mv.shape[1]
  video = ncthw_to_nthwc(mv.reshape((-1,) + mv.shape[2:]))  # (V, T, H, W, C)
  logits, _ = run(cfg, params, video)
  scores = average_views(logits, v, 'prob')
  np.testing.assert_allclose(scores, d['multiview_scores'], atol=2e-5, rtol=0)


def _exclude_cls_from_temporal(next_fun, args, kwargs, context):
  out = next_fun(*args, **kwargs)
  if isinstance(context.module, MultiHeadAttention) and kwargs.get('axis') == 1:
    if isinstance(out, tuple):             # (output without its bias, the bias) for an adapter
      return (out[0].at[:, :, 0].set(0.0),) + out[1:]
    return out.at[:, :, 0].set(0.0)
  return out


def test_parity_check_catches_class_token_left_out_of_temporal_attention():
  d, _, cfg, params = load_case('aim_tiny_case1')
  with nn.intercept_methods(_exclude_cls_from_temporal):
    logits, _ = run(cfg, params, ncthw_to_nthwc(d['input']))
  assert np.abs(np.asarray(logits) - d['logits']).max() > 1e-3


def test_parity_check_catches_tanh_gelu_in_adapters(monkeypatch):
  d, _, cfg, params = load_case('aim_tiny_case1')
  monkeypatch.setattr(adapters_lib, 'gelu_exact', lambda x: jax.nn.gelu(x, approximate=True))
  logits, _ = run(cfg, params, ncthw_to_nthwc(d['input']))
  assert np.abs(np.asarray(logits) - d['logits']).max() > 2e-5


TINY = dict(patch_size=8, width=64, layers=2, heads=4, image_size=32, num_frames=4,
            num_classes=5, drop_path_rate=0.2)


def _init(cfg, video, seed=0):
  return nn.unbox(build_model(cfg).init(jax.random.key(seed), video))['params']


def _video(b=2, t=4, r=32, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, t, r, r, 3))


def _framewise_clip(cfg, params, video):
  """Frame-wise CLIP image encoder, mean over frames, then the head."""
  enc = build_encoder(cfg)
  enc_params = {k: v for k, v in params['backbone'].items()
                if k != 'temporal_embedding' and 'Adapter' not in k}
  enc_params = {k: ({n: w for n, w in v.items() if 'Adapter' not in n} if isinstance(v, dict)
                    else v) for k, v in enc_params.items()}
  b, t = video.shape[:2]
  feats = enc.apply({'params': enc_params}, video.reshape((b * t,) + video.shape[2:]))
  pooled = feats.reshape(b, t, -1).mean(1)
  fc = params['cls_head']['fc_cls']
  return pooled @ fc['kernel'] + fc['bias']


@pytest.mark.parametrize('num_tadapter', [1, 2])
def test_aim_at_official_init_equals_framewise_clip_plus_mean_pooling(num_tadapter):
  cfg = dict(TINY, adapters=dict(num_tadapter=num_tadapter))
  video = _video()
  params = _init(cfg, video)
  flat = P.flatten(params)
  assert all(np.all(np.asarray(v) == 0) for k, v in flat.items() if '/D_fc2/' in k)
  assert np.all(np.asarray(params['backbone']['temporal_embedding']) == 0)
  logits = build_model(cfg).apply({'params': params}, video)
  np.testing.assert_allclose(logits, _framewise_clip(cfg, params, video), atol=2e-5)


def test_adapters_off_is_framewise_clip_and_tree_is_clip_plus_temporal_embedding():
  cfg = dict(TINY, adapters=dict(enabled=False))
  video = _video()
  params = _init(cfg, video)
  assert not any('Adapter' in k for k in P.flatten(params))
  params['backbone']['temporal_embedding'] = jnp.zeros_like(
      params['backbone']['temporal_embedding'])
  logits = build_model(cfg).apply({'params': params}, video)
  np.testing.assert_allclose(logits, _framewise_clip(cfg, params, video), atol=2e-5)


def test_each_adaptation_switches_on_its_own():
  names = {}
  for which in ('spatial', 'temporal', 'joint'):
    flags = {k: k == which for k in ('spatial', 'temporal', 'joint')}
    params = _init(dict(TINY, adapters=flags), _video())
    names[which] = {k.split('/')[2] for k in P.flatten(params) if 'Adapter' in k}
  assert names == {'spatial': {'S_Adapter'}, 'temporal': {'T_Adapter'},
                   'joint': {'MLP_Adapter'}}


def test_plain_encoder_is_a_clip_image_model_with_clip_names():
  cfg = resolve_model_config(dict(TINY, output_dim=32))
  enc = build_encoder(cfg)
  images = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  params = nn.unbox(enc.init(jax.random.key(0), images))['params']
  chex.assert_shape(enc.apply({'params': params}, images), (3, 32))
  sd = official_names.encoder_to_state_dict(params, heads=4)
  expected = {'class_embedding', 'positional_embedding', 'proj', 'conv1.weight',
              'ln_pre.weight', 'ln_pre.bias', 'ln_post.weight', 'ln_post.bias'}
  for i in range(2):
    expected |= {f'transformer.resblocks.{i}.{n}' for n in (
        'attn.in_proj_weight', 'attn.in_proj_bias', 'attn.out_proj.weight',
        'attn.out_proj.bias', 'ln_1.weight', 'ln_1.bias', 'ln_2.weight', 'ln_2.bias',
        'mlp.c_fc.weight', 'mlp.c_fc.bias', 'mlp.c_proj.weight', 'mlp.c_proj.bias')}
  assert set(sd) == expected
  chex.assert_shape([sd['conv1.weight'], sd['transformer.resblocks.0.attn.in_proj_weight']],
                    [(64, 3, 8, 8), (192, 64)])


def test_jit_and_eager_agree():
  d, _, cfg, params = load_case('aim_tiny_case1')
  model = build_model(cfg)
  video = ncthw_to_nthwc(d['input'])
  eager = model.apply({'params': params}, video)
  jitted = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, video)
  np.testing.assert_allclose(eager, jitted, atol=1e-5)


def test_bf16_compute_stays_within_documented_tolerance_of_fp32():
  """bf16 compute, fp32 params: logits within 0.05 abs (documented in README)."""
  d, _, cfg, params = load_case('aim_tiny_case1')
  video = ncthw_to_nthwc(d['input'])
  ref = build_model(cfg).apply({'params': params}, video)
  lo = build_model(dict(cfg, dtype='bfloat16')).apply({'params': params}, video)
  assert lo.dtype == jnp.float32  # the head computes in fp32
  err = float(np.abs(np.asarray(lo) - np.asarray(ref)).max())
  assert err < 0.05, err
  assert err > 0  # it really ran in bf16


def test_scan_and_remat_agree_with_loop_and_keep_the_checkpoint_layout():
  d, _, cfg, params = load_case('aim_tiny_case1')
  video = ncthw_to_nthwc(d['input'])
  ref = build_model(cfg).apply({'params': params}, video)
  scan_cfg = dict(cfg, scan_layers=True, remat_policy='full')
  scan_model = build_model(scan_cfg)
  abstract = jax.eval_shape(lambda: nn.unbox(scan_model.init(jax.random.key(0), video)))
  scanned = P.match_layout(params, abstract['params'])
  assert 'resblocks' in scanned['backbone'] and 'resblocks_0' not in scanned['backbone']
  assert jax.tree.structure(scanned) == jax.tree.structure(abstract['params'])
  out = scan_model.apply({'params': scanned}, video)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  for policy in ('full', 'dots_with_no_batch_dims_saveable'):
    remat = build_model(dict(cfg, remat_policy=policy)).apply({'params': params}, video)
    np.testing.assert_allclose(remat, ref, atol=1e-5)
  # The official names come back unchanged from the scanned tree.
  back = official_names.aim_params_to_state_dict(scanned, cfg['heads'])
  sd = official_names.aim_params_to_state_dict(params, cfg['heads'])
  assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)


def test_gradients_reach_every_trainable_leaf_and_frozen_leaves_are_excluded():
  cfg = dict(TINY)
  video = _video()
  model = build_model(cfg)
  params = _init(cfg, video)
  mask = P.trainable_mask(params)
  flat_mask = P.flatten(mask)
  trainable = {k for k, m in flat_mask.items() if m}
  assert trainable and all(any(s in k for s in P.OFFICIAL_TRAINABLE) for k in trainable)
  assert 'backbone/resblocks_0/attn/qkv/kernel' not in trainable
  labels = jnp.array([1, 3])

  def loss(p):
    logits = model.apply({'params': p}, video, train=True, rngs={'dropout': jax.random.key(2)})
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()

  grads = P.flatten(jax.jit(jax.grad(loss))(params))
  for k in trainable:
    assert np.all(np.isfinite(grads[k]))
  # Zero-initialised D_fc2 gets gradient; so do head, ln_post and temporal embedding.
  for k in ('backbone/resblocks_0/T_Adapter/D_fc2/kernel',
            'backbone/resblocks_1/MLP_Adapter/D_fc2/kernel',
            'backbone/resblocks_1/S_Adapter/D_fc2/kernel',
            'backbone/temporal_embedding', 'backbone/ln_post/scale', 'cls_head/fc_cls/kernel'):
    assert np.abs(grads[k]).max() > 0, k


def test_drop_path_is_per_token_position_like_the_official_code():
  dp = adapters_lib.DropPath('token')
  x = jnp.ones((4, 3, 50, 8))
  y = dp.apply({}, x, 0.5, False, rngs={'dropout': jax.random.key(0)})
  per_token = np.asarray(y)[..., 0]                        # (B, T, L)
  # one draw per token position, shared by every clip and frame
  assert np.all(per_token == per_token[:1, :1])
  assert 0 < (per_token[0, 0] == 0).sum() < 50
  y = adapters_lib.DropPath('sample').apply({}, x, 0.5, False, rngs={'dropout': jax.random.key(0)})
  assert np.all(np.asarray(y)[:, :1] == np.asarray(y))


@pytest.mark.parametrize('cfg,tunable,total', [
    (dict(variant='B/16'), 10_966_672, 96_764_560),
    (dict(variant='B/16', num_frames=32), 10_985_104, 96_782_992),
    (dict(variant='B/16', num_classes=174, adapters=dict(num_tadapter=2, scale=1.0)),
     14_343_342, 100_141_230),
    (dict(variant='B/16', num_frames=32, num_classes=48), 10_714_416, 96_512_304),
    (dict(variant='L/14'), 38_261_136, 341_438_864),
])
def test_tunable_parameter_counts_match_the_official_model(cfg, tunable, total):
  model = build_model(cfg)
  c = resolve_model_config(cfg)
  shape = (1, c['num_frames'], c['image_size'], c['image_size'], 3)
  abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros(shape))))
  assert P.parameter_counts(abstract['params']) == (tunable, total)


def test_config_errors_name_the_field():
  with pytest.raises(KeyError, match='model.adapter_ratio'):
    resolve_model_config(dict(adapter_ratio=0.5))
  with pytest.raises(KeyError, match='model.adapters.ratoi'):
    resolve_model_config(dict(adapters=dict(ratoi=0.5)))
  model = build_model(TINY)
  with pytest.raises(ValueError, match='num_frames=4'):
    model.init(jax.random.key(0), jnp.zeros((1, 8, 32, 32, 3)))


@pytest.mark.parametrize('dtype, tol', [('float32', 1e-5), ('bfloat16', 2e-2)])
def test_temporal_attention_in_place_equals_the_transposed_layout(dtype, tol):
  """model.temporal_attention: 'einsum' attends over T on (B, T, L, ...) without moving
  the activations; 'dot_product_attention' swaps to (B, L, T, D). Same logits and
  adapter gradients (the goldens above run the default)."""
  d, _, cfg, params = load_case('aim_tiny_case1')
  video = ncthw_to_nthwc(d['input'])

  def loss_and_grads(impl):
    model = build_model(dict(cfg, dtype=dtype, temporal_attention=impl))
    f = lambda p: jnp.sum(model.apply({'params': p}, video) ** 2)
    return jax.jit(jax.value_and_grad(f))(params)

  (l1, g1), (l2, g2) = loss_and_grads('einsum'), loss_and_grads('dot_product_attention')
  np.testing.assert_allclose(l1, l2, rtol=tol)
  t_adapter = lambda g: g['backbone']['resblocks_0']['T_Adapter']['D_fc1']['kernel']
  assert float(np.abs(t_adapter(g1)).max()) > 0
  np.testing.assert_allclose(t_adapter(g1), t_adapter(g2), rtol=tol, atol=tol * 1e-2)
  with pytest.raises(ValueError, match='model.temporal_attention'):
    resolve_model_config(dict(temporal_attention='flash'))
