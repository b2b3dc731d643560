"""Fused-attention plumbing: token padding with masked keys, the Pallas kernel, the
temporal attention forms and the split q/k/v projection give the unpadded XLA numbers.

On CPU the padded path runs jax.nn.dot_product_attention's XLA implementation with
`key_value_seq_lengths` (the same masking cuDNN gets) and the Pallas kernel runs
interpreted; the GPU kernels themselves are checked by the BENCHMARKS.md GPU plan.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aim_jax import params as P
from aim_jax.models import vit
from aim_jax.models.factory import build_model
from test_model import load_case, ncthw_to_nthwc

# 1 + 4*4 = 17 tokens: odd, like ViT-B/16's 197.
TINY = dict(patch_size=8, width=64, layers=2, heads=4, image_size=32, num_frames=4,
            num_classes=5, drop_path_rate=0.3, dropout_rate=0.0)


def _perturbed_params(cfg, batch=2, seed=0):
  """Init, then noise on every leaf: adapters' zero-init D_fc2 would make their
  gradients (and the temporal branch's effect) vanish."""
  model = build_model(cfg)
  video = jnp.zeros((batch, cfg['num_frames'], 32, 32, 3))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), video)['params'])
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


def _loss_and_trainable_grads(cfg, params, video, train=True):
  model = build_model(cfg)
  mask = P.flatten(P.trainable_mask(params))
  flat = P.flatten(params)
  trainable = {k: v for k, v in flat.items() if mask[k]}
  frozen = {k: v for k, v in flat.items() if not mask[k]}

  def loss(t):
    logits = model.apply({'params': P.unflatten({**frozen, **t})}, video, train=train,
                         rngs={'dropout': jax.random.key(3)})
    return jnp.sum(jnp.sin(logits))

  return jax.jit(jax.value_and_grad(loss))(trainable)


def _video(cfg, batch=2):
  return jax.random.normal(jax.random.key(7), (batch, cfg['num_frames'], 32, 32, 3))


def _assert_same(a, b, tol=1e-5):
  (la, ga), (lb, gb) = a, b
  np.testing.assert_allclose(la, lb, rtol=tol, atol=tol)
  assert ga.keys() == gb.keys()
  for k in ga:
    assert np.abs(np.asarray(ga[k])).max() > 0, k
    np.testing.assert_allclose(ga[k], gb[k], rtol=tol, atol=tol, err_msg=k)


@pytest.mark.parametrize('mode', ['stream', 'call'])
@pytest.mark.parametrize('multiple', [2, 8])
def test_padded_masked_attention_matches_unpadded_forward_and_backward(mode, multiple):
  """17 tokens padded to 18 / 24 with masked keys: same loss and same gradient of every
  trainable parameter in training mode (token drop path on), fp32."""
  params = _perturbed_params(TINY)
  video = _video(TINY)
  ref = _loss_and_trainable_grads(TINY, params, video)
  padded = dict(TINY, attention_impl='xla', attention_pad_multiple=multiple,
                attention_pad_mode=mode)
  _assert_same(_loss_and_trainable_grads(padded, params, video), ref)


def test_stream_padding_reaches_the_blocks_and_is_sliced_off():
  cfg = dict(TINY, attention_pad_multiple=8)
  model = build_model(cfg)
  assert model.backbone.token_padding() == (24, 1)
  assert build_model(dict(cfg, attention_pad_mode='call')).backbone.token_padding() == (17, 8)
  assert build_model(dict(TINY, attention_impl='cudnn')).backbone.token_padding() == (24, 1)
  assert build_model(TINY).backbone.token_padding() == (17, 1)     # XLA: nothing padded
  params = _perturbed_params(TINY)
  seen = []

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, vit.MultiHeadAttention):
      seen.append((args[0].shape, kwargs.get('axis'), kwargs.get('valid_len')))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(spy):
    logits = jax.jit(model.apply)({'params': params}, _video(cfg))
  assert logits.shape == (2, 5)
  assert {(s[2], a, v) for s, a, v in seen} == {(24, 1, None), (24, 2, 17)}


@pytest.mark.parametrize('case', ['aim_tiny_case1'])
def test_golden_logits_unchanged_with_stream_padding(case):
  """The official parity (tests/test_model.py) holds with the padded stream too."""
  d, _, cfg, params = load_case(case)
  model = build_model(dict(cfg, attention_pad_multiple=8))
  logits = model.apply({'params': params}, ncthw_to_nthwc(d['input']))
  np.testing.assert_allclose(logits, d['logits'], atol=2e-5, rtol=0)


@pytest.mark.parametrize('temporal', ['elementwise', 'pallas', 'dot_product_attention'])
def test_temporal_attention_forms_match_einsum(temporal):
  params = _perturbed_params(TINY)
  video = _video(TINY)
  ref = _loss_and_trainable_grads(TINY, params, video)
  _assert_same(_loss_and_trainable_grads(dict(TINY, temporal_attention=temporal), params, video),
               ref)


def test_split_qkv_projection_matches_fused():
  """Same loss and the same gradient of every parameter, the (D, 3, H, hd) kernel too."""
  params = _perturbed_params(TINY)
  video = _video(TINY)
  full = lambda c: jax.jit(jax.value_and_grad(
      lambda p: jnp.sum(jnp.sin(build_model(c).apply({'params': p}, video)))))(params)
  (l1, g1), (l2, g2) = full(TINY), full(dict(TINY, qkv_projection='split'))
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  g1, g2 = P.flatten(g1), P.flatten(g2)
  assert 'backbone/resblocks_0/attn/qkv/kernel' in g1
  for k in g1:
    np.testing.assert_allclose(g1[k], g2[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_cudnn_path_gets_an_even_padded_length_and_a_length_mask(monkeypatch):
  """attention_impl='cudnn' (checked on CPU by recording the calls): the spatial
  attention sees 17 tokens padded to 24 with key_value_seq_lengths 17 and no bias (cuDNN
  refuses odd lengths under grad), the temporal one (B, T, L*H, hd) with the heads
  folded; numbers as the XLA path."""
  calls = []
  real = jax.nn.dot_product_attention

  def record(q, k, v, bias=None, mask=None, *, implementation=None, **kw):
    calls.append((q.shape, implementation, bias is None and mask is None,
                  None if kw.get('key_value_seq_lengths') is None
                  else np.asarray(kw['key_value_seq_lengths']).tolist()))
    return real(q, k, v, bias, mask, implementation='xla', **kw)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', record)
  cfg = dict(TINY, temporal_attention='dot_product_attention', dropout_rate=0.0)
  params = _perturbed_params(cfg)
  video = _video(cfg)
  ref = _loss_and_trainable_grads(cfg, params, video)
  calls.clear()
  got = _loss_and_trainable_grads(dict(cfg, attention_impl='cudnn', qkv_projection='split'),
                                  params, video)
  _assert_same(got, ref)
  assert {(c[0], c[1], c[2]) for c in calls} == {((8, 24, 4, 16), 'cudnn', True),
                                                 ((2, 4, 24 * 4, 16), 'cudnn', True)}
  assert [c[3] for c in calls if c[0][1] == 24] == [[17] * 8] * 2
  assert all(c[3] is None for c in calls if c[0][1] == 4)


def test_pallas_attention_interpreted_matches_xla():
  """attention_impl='pallas' (jax.experimental.pallas.ops.gpu.attention, interpreted on
  CPU): tokens padded to 32 with padded keys in their own segment; temporal attention
  folded into the heads. One clip of two frames keeps the interpreter quick."""
  cfg = dict(TINY, num_frames=2, temporal_attention='dot_product_attention')
  params = _perturbed_params(cfg, batch=1)
  video = _video(cfg, batch=1)
  ref = _loss_and_trainable_grads(cfg, params, video)
  pallas = dict(cfg, attention_impl='pallas', qkv_projection='split')
  assert build_model(pallas).backbone.token_padding() == (32, 1)
  _assert_same(_loss_and_trainable_grads(pallas, params, video), ref, tol=2e-5)


def test_attention_helper_pads_and_masks_per_call():
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (3, 11, 2, 8)) for kk in ks)
  ref = jax.nn.dot_product_attention(q, k, v)
  y = vit.attention(q, k, v, pad_multiple=16)
  assert y.shape == q.shape
  np.testing.assert_allclose(y, ref, atol=1e-6)
  # Keys past valid_len carry no weight: changing them changes nothing for real queries.
  k2 = k.at[:, 7:].set(100.0)
  y1 = vit.attention(q, k, v, valid_len=7)
  y2 = vit.attention(q, k2, v.at[:, 7:].multiply(3.0), valid_len=7)
  np.testing.assert_allclose(y1[:, :7], y2[:, :7], atol=1e-6)
  np.testing.assert_allclose(y1[:, :7], jax.nn.dot_product_attention(q[:, :7], k[:, :7],
                                                                    v[:, :7]), atol=1e-6)


def test_attention_options_errors_name_the_field():
  video = jnp.zeros((1, 4, 32, 32, 3))
  for bad, field in [(dict(attention_impl='flash'), 'model.attention_impl'),
                     (dict(attention_pad_mode='once'), 'model.attention_pad_mode'),
                     (dict(attention_pad_multiple=-1), 'model.attention_pad_multiple'),
                     (dict(qkv_projection='packed'), 'model.qkv_projection'),
                     (dict(temporal_attention='flash'), 'model.temporal_attention'),
                     (dict(remat_policy='save_only_these_names'), 'model.remat_policy')]:
    with pytest.raises(ValueError, match=field):
      build_model(dict(TINY, **bad)).init(jax.random.key(0), video)
  with pytest.raises(ValueError, match='multiple of 16'):
    build_model(dict(TINY, attention_impl='pallas', attention_pad_multiple=6)).init(
        jax.random.key(0), video)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs an NVIDIA GPU (cuDNN, Triton)')
@pytest.mark.parametrize('impl', ['cudnn', 'pallas'])
@pytest.mark.parametrize('temporal', ['elementwise', 'pallas', 'dot_product_attention'])
def test_fused_kernels_on_gpu_match_xla(impl, temporal):
  """The GPU smoke test of the BENCHMARKS.md GPU plan: the real kernels, forward and
  backward, bf16 compute, against the XLA path (cuDNN on CUDA 13 may have no execution
  plan: jax-ml/jax#32430; then only the Pallas rows apply)."""
  cfg = dict(TINY, heads=1, temporal_attention=temporal, dtype='bfloat16',  # head dim 64
             attention_impl='xla', qkv_projection='fused')
  params = _perturbed_params(cfg)
  video = _video(cfg)
  ref = _loss_and_trainable_grads(cfg, params, video)
  got = _loss_and_trainable_grads(dict(cfg, attention_impl=impl, qkv_projection='split'),
                                  params, video)
  (la, ga), (lb, gb) = got, ref
  np.testing.assert_allclose(la, lb, rtol=3e-2, atol=3e-2)
  for k in ga:
    scale = float(np.abs(np.asarray(gb[k], np.float32)).max()) + 1e-6
    err = float(np.abs(np.asarray(ga[k], np.float32) - np.asarray(gb[k], np.float32)).max())
    assert err <= 5e-2 * scale, (k, err, scale)


def test_evaluation_may_switch_the_attention_options_of_a_checkpoint():
  """The new fields are execution options: evaluating a default-trained checkpoint with
  cuDNN, padding and split q/k/v is not an architecture mismatch."""
  from aim_jax.run_config import merge_model_config
  fast = dict(TINY, attention_impl='cudnn', attention_pad_multiple=16, attention_pad_mode='call',
              qkv_projection='split', temporal_attention='elementwise')
  merged = merge_model_config(fast, TINY)
  assert {k: merged[k] for k in ('attention_impl', 'attention_pad_multiple', 'attention_pad_mode',
                                 'qkv_projection', 'temporal_attention')} == {
      'attention_impl': 'cudnn', 'attention_pad_multiple': 16, 'attention_pad_mode': 'call',
      'qkv_projection': 'split', 'temporal_attention': 'elementwise'}


def test_stream_padding_under_layer_scan_and_remat():
  """scan_layers + remat carry the padded stream too (valid_len is a static block field).
  (Scan draws its drop-path masks per layer differently from the loop: compare scans.)"""
  params = P.to_scan_layout(_perturbed_params(TINY))
  video = _video(TINY)
  scan = dict(TINY, scan_layers=True, remat_policy='full')
  ref = _loss_and_trainable_grads(scan, params, video)
  _assert_same(_loss_and_trainable_grads(dict(scan, attention_pad_multiple=8), params, video),
               ref)


# -- model.attention_impl='auto' (models/attention_choice.py) -----------------------------
from aim_jax.models import attention_choice as AC  # noqa: E402
from aim_jax.models.factory import resolve_model_config  # noqa: E402


def _chosen(platform, check=False, **fields):
  cfg = AC.choose(resolve_model_config(dict(TINY, **fields)), platform, check)
  return tuple(cfg[k] for k in AC.FIELDS)


def test_auto_is_cudnn_on_a_gpu_in_half_precision_and_xla_elsewhere():
  assert resolve_model_config(TINY)['attention_impl'] == 'auto'        # the default
  fast = ('cudnn', 'split', 'elementwise')
  plain = ('xla', 'fused', 'einsum')
  assert _chosen('gpu', dtype='bfloat16') == fast
  assert _chosen('gpu', dtype='float16') == fast
  assert _chosen('gpu', dtype='float32') == plain        # cuDNN flash attention: half only
  assert _chosen('cpu', dtype='bfloat16') == plain
  assert _chosen('tpu', dtype='bfloat16') == plain
  # Explicit fields are kept; 'auto' companions follow an explicit kernel.
  assert _chosen('gpu', dtype='bfloat16', attention_impl='xla') == plain
  assert _chosen('cpu', attention_impl='pallas') == ('pallas', 'split', 'elementwise')
  assert _chosen('gpu', dtype='bfloat16', temporal_attention='einsum') == (
      'cudnn', 'split', 'einsum')
  assert _chosen('cpu', attention_impl='', qkv_projection='split') == ('xla', 'split', 'einsum')
  with pytest.raises(ValueError, match='model.qkv_projection must be one of'):
    resolve_model_config(dict(TINY, qkv_projection='fast'))


def test_auto_falls_back_to_pallas_then_xla_with_a_warning_when_the_checks_fail(monkeypatch,
                                                                               caplog):
  """cuDNN failing its check makes 'auto' the Pallas flash attention (its own check passed),
  with its companion layout; both failing, XLA. One warning per kernel and reason."""
  monkeypatch.setattr(AC, 'cudnn_check', lambda: (False, 'XlaRuntimeError: no execution plan'))
  monkeypatch.setattr(AC, 'pallas_check', lambda: (True, ''))
  monkeypatch.setattr(AC, '_WARNED', set())
  with caplog.at_level('WARNING'):
    assert _chosen('gpu', check=True, dtype='bfloat16') == ('pallas', 'split', 'elementwise')
    assert _chosen('gpu', check=True, dtype='bfloat16')[0] == 'pallas'
  assert 'cuDNN attention failed its check' in caplog.text and 'no execution plan' in caplog.text
  assert 'using the Pallas flash attention' in caplog.text
  assert caplog.text.count('failed its check') == 1          # once, not once per model
  caplog.clear()
  monkeypatch.setattr(AC, 'pallas_check', lambda: (False, 'pallas output differs from XLA by 1'))
  with caplog.at_level('WARNING'):
    assert _chosen('gpu', check=True, dtype='bfloat16') == ('xla', 'fused', 'einsum')
    assert _chosen('gpu', check=True, dtype='bfloat16')[0] == 'xla'
  assert caplog.text.count('failed its check') == 1          # cuDNN's was said already
  assert 'the Pallas flash attention failed its check on this GPU (pallas output differs' in (
      caplog.text) and 'using XLA attention' in caplog.text
  monkeypatch.setattr(AC, 'cudnn_check', lambda: (True, ''))
  assert _chosen('gpu', check=True, dtype='bfloat16')[0] == 'cudnn'
  # float32 and other platforms never run a check.
  monkeypatch.setattr(AC, 'cudnn_check', lambda: pytest.fail('checked'))
  assert _chosen('gpu', check=True, dtype='float32')[0] == 'xla'
  assert _chosen('cpu', check=True, dtype='bfloat16')[0] == 'xla'


def test_the_pallas_check_runs_the_kernel_on_the_spatial_case_only(monkeypatch):
  """The Pallas check runs the real kernel (Pallas's interpreter on this CPU) in the spatial
  case, padded to its 32-token tiles, and passes; the temporal case (8 frames: the companion
  layout computes it element-wise, and the kernel's tiles need 16) is not given to it. A
  kernel that is wrong there is refused."""
  seen = []

  def recorded(q, k, v, *, impl, **kw):
    seen.append((q.shape, impl, kw['pad_multiple']))
    return vit.attention(q, k, v, impl=impl, **kw)

  assert AC._compare_with_xla('pallas', recorded) == (True, '')
  assert {s for s in seen if s[1] == 'pallas'} == {((2, 20, 2, 64), 'pallas', 32)}
  # Also when the model is built while a function is traced: the kernel's body is traced,
  # not evaluated (forcing evaluation there failed: "Evaluation rule for 'program_id'").
  inside = {}
  jax.jit(lambda x: inside.setdefault('r', AC._compare_with_xla('pallas')) and x)(1.0)
  assert inside['r'] == (True, '')

  def wrong(q, k, v, *, impl, **kw):
    y = vit.attention(q, k, v, impl=impl, **kw)
    return y if impl == 'xla' else y.at[:, 0].add(0.5)

  ok, why = AC._compare_with_xla('pallas', wrong)
  assert not ok and why.startswith('pallas output differs from XLA by') and '(2, 20, 2, 64)' in why


def test_on_a_gpu_without_cudnn_auto_builds_a_pallas_model_with_the_real_checks(monkeypatch,
                                                                                 caplog):
  """Nothing replaced: this CPU has no cuDNN, so the real cuDNN check fails as on a GPU whose
  cuDNN has no execution plan; the real Pallas check passes (the kernel through Pallas's
  interpreter); the model built for 'gpu' runs the Pallas attention with its companion layout
  and gives XLA's logits."""
  monkeypatch.setattr(AC, '_WARNED', set())
  AC.cudnn_check.cache_clear()
  AC.pallas_check.cache_clear()
  cfg = dict(TINY, num_frames=2, dtype='bfloat16')
  with caplog.at_level('WARNING'):
    model = build_model(cfg, platform='gpu')
  assert 'cuDNN attention failed its check on this GPU' in caplog.text
  assert 'using the Pallas flash attention' in caplog.text
  assert 'the Pallas flash attention failed' not in caplog.text
  backbone = model.backbone
  assert (backbone.attention_impl, backbone.qkv_projection, backbone.temporal_attention) == (
      'pallas', 'split', 'elementwise')
  video = _video(cfg, batch=1)
  reference = build_model(cfg)                               # this CPU: 'auto' is XLA
  params = _perturbed_params(cfg, batch=1)
  run = lambda m: np.asarray(jax.jit(lambda p: m.apply({'params': p}, video))(params),
                             np.float32)
  got, want = run(model), run(reference)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2 * np.abs(want).max())


def test_the_cudnn_check_refuses_a_kernel_that_fails_or_disagrees_with_xla():
  def wrong(q, k, v, *, impl, **kw):              # right for XLA, 10% off for the kernel
    y = vit.attention(q, k, v, impl='xla', **kw)
    return y if impl == 'xla' else y * 1.1

  def broken(q, k, v, *, impl, **kw):
    if impl != 'xla':
      raise RuntimeError('cuDNN: no execution plan\nsecond line')
    return vit.attention(q, k, v, impl='xla', **kw)

  def right(q, k, v, *, impl, **kw):              # the kernel's padding, XLA's arithmetic
    return vit.attention(q, k, v, impl='xla', **kw)

  ok, why = AC._compare_with_xla('cudnn', wrong)
  assert not ok and why.startswith('cudnn output differs from XLA by') and '(2, 20, 2, 64)' in why

  def wrong_temporal(q, k, v, *, impl, **kw):     # right in the spatial case only
    y = vit.attention(q, k, v, impl='xla', **kw)
    return y if impl == 'xla' or q.shape[1] != 8 else y.at[:, 3].add(1.0)

  ok, why = AC._compare_with_xla('cudnn', wrong_temporal)
  assert not ok and '(2, 8, 48, 64)' in why
  assert AC._compare_with_xla('cudnn', broken) == (
      False, 'RuntimeError: cuDNN: no execution plan')
  assert AC._compare_with_xla('cudnn', right) == (True, '')
  # A model built while a function is traced (inside jax.jit) gets the same answer.
  inside = {}
  jax.jit(lambda x: inside.setdefault('r', AC._compare_with_xla('cudnn', right)) and x)(1.0)
  assert inside['r'] == (True, '')


def test_the_auto_choice_reaches_the_model_and_follows_the_mesh_devices(monkeypatch):
  """build_model(platform='gpu') runs cuDNN attention (recorded here, XLA underneath) on the
  padded stream, the temporal attention element-wise (through cuDNN when set to
  'dot_product_attention'); a train state on this machine's CPU devices chooses XLA."""
  from aim_jax import sharding, train_state
  from configs import tiny
  calls = []
  real = jax.nn.dot_product_attention

  def record(q, k, v, bias=None, mask=None, *, implementation=None, **kw):
    calls.append((q.shape, implementation))
    return real(q, k, v, bias, mask, implementation='xla', **kw)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', record)
  cfg = dict(TINY, dtype='bfloat16')
  model = build_model(cfg, platform='gpu', check=False)
  model.init(jax.random.key(0), _video(cfg))
  # The spatial attention only: the temporal one is element-wise on a GPU (no cuDNN call).
  assert {c for c in calls} == {((8, 24, 4, 16), 'cudnn')}
  calls.clear()
  build_model(dict(cfg, temporal_attention='dot_product_attention'), platform='gpu',
              check=False).init(jax.random.key(0), _video(cfg))
  assert {c for c in calls} == {((8, 24, 4, 16), 'cudnn'), ((2, 4, 24 * 4, 16), 'cudnn')}
  assert AC.platform_of(jax.devices()) == ('cpu', True)
  c = tiny.get_config()
  setup = train_state.create_train_state(c, sharding.make_mesh(c.mesh), steps_per_epoch=2)
  block = setup.model.backbone
  assert (block.attention_impl, block.qkv_projection, block.temporal_attention) == (
      'xla', 'fused', 'einsum')
