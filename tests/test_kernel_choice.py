"""model.norm_impl / model.mlp_impl = 'auto' (models/kernel_choice.py): XLA's until a GPU has
timed the Pallas kernels; then, on that platform, the kernels after a device check."""

import functools

import pytest

from aim_jax.models import factory, kernel_choice as KC

CFG = dict(width=64, layers=1, heads=2, patch_size=8, image_size=16, num_frames=2,
           num_classes=3, dtype='bfloat16')


def _built(platform, check=True, **fields):
  backbone = factory.build_model(dict(CFG, **fields), platform=platform, check=check).backbone
  return backbone.norm_impl, backbone.mlp_impl


def _no_check():
  pytest.fail('the kernels were checked')


def test_auto_is_xla_until_a_platform_is_listed(monkeypatch):
  assert KC.PALLAS_PLATFORMS == ()        # no GPU has timed the kernels yet
  monkeypatch.setattr(KC, 'kernels_check', _no_check)
  assert _built('gpu', check=False, attention_impl='xla') == ('xla', 'xla')
  assert _built('cpu') == ('xla', 'xla')


def test_on_a_listed_platform_auto_takes_the_kernels_where_they_apply(monkeypatch):
  monkeypatch.setattr(KC, 'PALLAS_PLATFORMS', ('gpu',))
  monkeypatch.setattr(KC, 'kernels_check', lambda: (True, ''))
  on_gpu = functools.partial(_built, 'gpu', attention_impl='xla')
  assert on_gpu() == ('pallas', 'pallas')
  assert on_gpu(joint_mlp='separate') == ('pallas', 'xla')   # no fused MLP for the kernel
  assert on_gpu(norm_impl='xla') == ('xla', 'pallas')         # a field set is kept
  monkeypatch.setattr(KC, 'kernels_check', _no_check)
  assert on_gpu(dtype='float32') == ('xla', 'xla')            # half precision only
  assert _built('cpu') == ('xla', 'xla')
  assert _built('tpu', attention_impl='xla') == ('xla', 'xla')
  swin = KC.choose(factory.resolve_model_config(dict(CFG, backbone='swin')), 'gpu')
  assert (swin['norm_impl'], swin['mlp_impl']) == ('xla', 'xla')


def test_a_failed_check_keeps_xla_with_one_warning(monkeypatch, caplog):
  monkeypatch.setattr(KC, 'PALLAS_PLATFORMS', ('gpu',))
  monkeypatch.setattr(KC, 'kernels_check', lambda: (False, 'loss differs from XLA by 0.5'))
  monkeypatch.setattr(KC, '_WARNED', set())
  with caplog.at_level('WARNING'):
    assert _built('gpu', attention_impl='xla') == ('xla', 'xla')
    assert _built('gpu', attention_impl='xla') == ('xla', 'xla')
  assert caplog.text.count('the Pallas kernels failed their check on this device') == 1
  assert 'loss differs from XLA by 0.5' in caplog.text


def test_the_check_refuses_kernels_that_fail_or_disagree():
  real = functools.partial(factory.build_model, check=False)

  class Off:
    """The XLA model with its logits 50% off: a kernel that computes something else."""

    def __init__(self, model):
      self.model, self.init = model, model.init

    def apply(self, *args, **kwargs):
      return 1.5 * self.model.apply(*args, **kwargs)

  def wrong(cfg):
    xla = real(dict(cfg, norm_impl='xla', mlp_impl='xla'))
    return Off(xla) if cfg['norm_impl'] == 'pallas' else xla

  def broken(cfg):
    if cfg['norm_impl'] == 'pallas':
      raise RuntimeError('Triton: no kernel for this device\nsecond line')
    return real(cfg)

  ok, why = KC.compare_with_xla(wrong)
  assert not ok and why.startswith('loss differs from XLA by')
  assert KC.compare_with_xla(broken) == (False, 'RuntimeError: Triton: no kernel for this device')
  right = lambda cfg: real(dict(cfg, norm_impl='xla', mlp_impl='xla'))
  assert KC.compare_with_xla(right) == (True, '')


def test_the_check_passes_the_real_kernels():
  """Nothing replaced: the Pallas LayerNorms and MLP kernels (Pallas's interpreter on this
  CPU) against XLA in the check's small ViT, forward and backward."""
  assert KC.compare_with_xla() == (True, '')
