"""Behaviour that a plausible refactoring mistake could change without any other test noticing
(found by mutation testing). Each test checks the documented behaviour (docs/official_recipe.md,
docs/sampling.md, mmcv / mmaction2 / optax semantics), not the code's own output."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aim_jax import checkpoints, multiview, optim, steps
from aim_jax import params as P
from aim_jax.convert import official_names
from aim_jax.models import vit
from aim_jax.models.adapters import AdapterSpec, DropPath, layer_selection
from configs import common


# ----- adapters: positions (Table 7) and drop path ------------------------------------------

def test_every_other_adapts_the_even_blocks_as_the_converter_reads_them():
  # Blocks 0, 2, 4, ...: the layout official_names._position recognises as 'every_other'.
  assert layer_selection('every_other', 12) == (0, 2, 4, 6, 8, 10)
  for kind, count in (('bottom', 3), ('top', 3), ('every_other', 0)):
    assert official_names._position(list(layer_selection(kind, 12, count)), 12) == (kind, count)


def test_frame_drop_path_draws_per_clip_and_frame():
  """'frame' (ViT_ImageNet, batch-first (B*T, N, D)): one draw per (clip, frame)."""
  x = jnp.ones((2, 8, 5, 3))
  y = np.asarray(DropPath('frame').apply({}, x, 0.5, False, rngs={'dropout': jax.random.key(0)}))
  assert np.all(y == y[:, :, :1, :1])                    # shared by the tokens of a frame
  assert any(len(set(y[b, :, 0, 0])) > 1 for b in range(2))   # not shared by a clip's frames


def test_drop_path_rate_grows_from_zero_at_the_first_block():
  """docs/official_recipe.md#drop-path: rates linspace(0, rate, layers), first block 0."""
  model = vit.VisionTransformer(patch_size=8, width=32, layers=3, heads=2, image_size=16,
                                num_frames=2, adapters=AdapterSpec(), drop_path_rate=0.5)
  video = jax.random.normal(jax.random.key(0), (2, 2, 16, 16, 3))
  params = model.init(jax.random.key(1), video)['params']
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda p: p + 0.1 * rng.randn(*p.shape).astype(np.float32), params)

  def outs(key):
    _, state = model.apply({'params': params}, video, train=True, mutable=['intermediates'],
                           rngs={'dropout': jax.random.key(key)})
    inter = state['intermediates']
    return [np.asarray(inter[f'block{i}_out'][0]) for i in range(3)]

  a, b = outs(2), outs(3)
  np.testing.assert_array_equal(a[0], b[0])      # rate 0: the first block ignores the draw
  assert np.abs(a[2] - b[2]).max() > 1e-4        # the last block drops at 0.5


# ----- optimiser: groups act on the updates, clipping, schedule floor -------------------------

def _opt_cfg(**kw):
  c = common.get_base_config().optimizer
  c.update(kw)
  return c


def _tree():
  return {'backbone': {'ln_post': {'scale': jnp.ones(4)},
                       'resblocks_0': {'S_Adapter': {'D_fc1': {'kernel': jnp.ones((4, 2))}},
                                       'attn': {'out': {'bias': jnp.ones(4)}}}},
          'cls_head': {'fc_cls': {'kernel': jnp.ones((4, 3))}}}


@pytest.mark.parametrize('lr_mults,want', [
    # decoupled AdamW decay with zero gradients: update = -lr * lr_mult * wd * p
    ({}, {'backbone/ln_post/scale': 0.0,                       # exempt from decay
          'backbone/resblocks_0/S_Adapter/D_fc1/kernel': -0.05,
          'backbone/resblocks_0/attn/out/bias': 0.0,           # frozen
          'cls_head/fc_cls/kernel': -0.05}),
    ({'backbone': 0.1}, {'backbone/ln_post/scale': -0.005,     # 'backbone' wins: lr 0.1x, decays
                         'backbone/resblocks_0/S_Adapter/D_fc1/kernel': -0.005,
                         'backbone/resblocks_0/attn/out/bias': 0.0,
                         'cls_head/fc_cls/kernel': -0.05}),
])
def test_group_lr_mult_and_weight_decay_reach_the_updates(lr_mults, want):
  import ml_collections
  cfg = _opt_cfg(lr=1.0, warmup_epochs=0, lr_mults=ml_collections.ConfigDict(lr_mults))
  params = _tree()
  tx, _ = optim.make_optimizer(params, cfg, optim.make_schedule(cfg, 10, 100))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates = P.flatten(tx.update(zeros, tx.init(params), params)[0])
  for name, value in want.items():
    np.testing.assert_allclose(np.asarray(updates[name]), value, rtol=1e-6, err_msg=name)


def test_grad_clip_clips_the_gradients_before_adamw():
  """mmcv OptimizerHook(grad_clip): clip_grad_norm_ on the gradients, then the AdamW step,
  whose first update is lr * g / (|g| + eps) ~ lr * sign(g) whatever the gradient's norm."""
  cfg = _opt_cfg(lr=1.0, warmup_epochs=0, weight_decay=0.0, grad_clip_norm=0.1)
  params = {'cls_head': {'fc_cls': {'kernel': jnp.zeros(2)}}}
  tx, _ = optim.make_optimizer(params, cfg, optim.make_schedule(cfg, 10, 100))
  grads = {'cls_head': {'fc_cls': {'kernel': jnp.array([300.0, -400.0])}}}
  upd = tx.update(grads, tx.init(params), params)[0]['cls_head']['fc_cls']['kernel']
  np.testing.assert_allclose(np.asarray(upd), [-1.0, 1.0], rtol=1e-5)


def test_cosine_schedule_ends_at_min_lr():
  cfg = _opt_cfg(lr=1.0, min_lr=0.1, warmup_epochs=0, schedule='cosine_epoch')
  lr = optim.make_schedule(cfg, steps_per_epoch=10, total_steps=100)
  assert float(lr(0)) == pytest.approx(1.0)
  assert float(lr(50)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-6)   # cos(pi/2) = 0
  assert float(lr(99)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.9)), rel=1e-6)


# ----- train step: the loss against a hand-computed cross-entropy -----------------------------

class _Linear(nn.Module):
  """Logits linear in the clip, so that a clip paired with the wrong label shows."""
  num_classes: int = 4

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(self.num_classes, name='fc_cls')(x.reshape(x.shape[0], -1))


def _linear_setup(batch=8, k=4):
  rng = np.random.default_rng(0)
  video = rng.standard_normal((batch, 2, 2, 2, 3)).astype(np.float32)
  labels = rng.integers(0, k, batch).astype(np.int32)
  model = _Linear(k)
  params = model.init(jax.random.key(0), jnp.asarray(video))['params']
  params = jax.tree.map(lambda p: p + 0.5 * rng.standard_normal(p.shape).astype(np.float32),
                        params)
  logits = np.asarray(model.apply({'params': params}, video), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return model, params, video, labels, logp


def _train_metrics(model, params, video, labels, step=0, **kw):
  tx = optax.sgd(0.1)
  state = {'step': jnp.asarray(step, jnp.int32), 'params': params, 'opt_state': tx.init(params)}
  trainable = frozenset(P.flatten(params))
  _, m = steps.train_step(state, {'video': video, 'label': labels}, model=model, tx=tx,
                          trainable=trainable, seed=0,
                          num_classes=params['fc_cls']['bias'].shape[0], **kw)
  return m


@pytest.mark.parametrize('accum', [1, 4])
def test_loss_is_the_mean_cross_entropy_of_each_clip_with_its_own_label(accum):
  model, params, video, labels, logp = _linear_setup()
  want = -logp[np.arange(len(labels)), labels].mean()
  m = _train_metrics(model, params, video, labels, accum_steps=accum)
  assert float(m['loss']) == pytest.approx(want, rel=1e-5)


def test_label_smoothing_target_is_one_minus_s_plus_s_over_k():
  """docs/official_recipe.md#head: target (1 - eps) * one_hot + eps / K."""
  model, params, video, labels, logp = _linear_setup()
  s, k = 0.2, logp.shape[1]
  target = np.full(logp.shape, s / k)
  target[np.arange(len(labels)), labels] += 1 - s
  want = -(target * logp).sum(-1).mean()
  m = _train_metrics(model, params, video, labels, label_smoothing=s)
  assert float(m['loss']) == pytest.approx(want, rel=1e-5)


def test_mixup_mixes_the_labels_with_the_clips():
  """Beta(a, a) with a tiny a puts lam at ~0 or ~1. At ~1 nothing is mixed; at ~0 every clip
  is replaced by its reversed partner, and so must its label be: either way the loss is the
  unmixed loss. (Over 8 steps both ends occur.)"""
  model, params, video, labels, logp = _linear_setup()
  want = -logp[np.arange(len(labels)), labels].mean()
  for step in range(8):
    m = _train_metrics(model, params, video, labels, step=step, mixup_alpha=1e-3)
    assert float(m['loss']) == pytest.approx(want, rel=1e-3), step


# ----- multi-view evaluation: top-5 ---------------------------------------------------------

def test_top5_counts_a_label_ranked_fifth_and_not_one_ranked_sixth():
  k = 6
  ranks = np.arange(k, 0, -1, dtype=np.float32)          # class c has score k - c
  logits = np.stack([ranks, ranks])[:, None]               # (2 videos, 1 view, K)
  labels = np.array([4, 5])                                # ranked 5th, 6th
  videos = logits.reshape(2, 1, 1, 1, k, 1)
  res = multiview.evaluate(lambda p, v: v[:, 0, 0, :, 0], {},
                           [dict(video=videos, label=labels)], num_classes=k, num_views=1,
                           batch_size=2, progress=False)
  assert res.metrics['top5'] == pytest.approx(0.5)
  assert res.metrics['top1'] == 0.0


def test_padded_batch_is_the_smallest_whose_views_fill_every_shard():
  """B*V rows are split evenly over the devices (8 CPU devices in the tests): the padded
  batch is the smallest B >= batch_size with B*V a multiple of the device count."""
  mesh = multiview.eval_mesh()
  shards = len(jax.devices())
  for views in (1, 2, 3, 4, 6):
    for batch in range(1, 20):
      want = next(b for b in itertools.count(batch) if (b * views) % shards == 0)
      assert multiview.padded_batch_size(batch, views, mesh) == want, (batch, views)


# ----- checkpoints: best/ keeps the highest top-1 ----------------------------------------------

def test_best_checkpoint_keeps_the_highest_top1(tmp_path):
  ckpt = checkpoints.TrainCheckpointer(str(tmp_path), keep=2, async_save=False)
  ckpt.save_best(5, {'w': np.zeros(2, np.float32)}, {'top1': 0.3, 'step': 5})
  ckpt.save_best(10, {'w': np.ones(2, np.float32)}, {'top1': 0.6, 'step': 10})
  ckpt.wait()
  assert ckpt.best_metric() == pytest.approx(0.6)
  assert ckpt.best.best_step() == 10
  ckpt.close()


# ----- parameter layouts: layer order with 10 or more blocks ----------------------------------

def test_scan_layout_stacks_layers_in_numeric_order():
  loop = {f'backbone/resblocks_{i}/ln_1/scale': np.full((2,), i, np.float32) for i in range(12)}
  scan = P.flatten(P.to_scan_layout(P.unflatten(loop)))
  np.testing.assert_array_equal(scan['backbone/resblocks/ln_1/scale'][:, 0], np.arange(12))
  back = P.flatten(P.to_loop_layout(P.unflatten(scan)))
  for name, value in loop.items():
    np.testing.assert_array_equal(back[name], value)


# ----- clip ops: mmcv rounding and crop offsets on the other orientation -----------------------

def test_short_side_resize_rounds_the_long_side_of_a_tall_video():
  tf = pytest.importorskip('tensorflow')
  del tf
  from data_pipelines import ops
  # mmcv rescale_size: int(x * scale + 0.5); 320 * 224 / 240 = 298.67 -> 299.
  h, w = ops.short_side_size(320, 240, 224)
  assert (int(h), int(w)) == (299, 224)


def test_center_crop_rounds_an_odd_margin_down():
  tf = pytest.importorskip('tensorflow')
  from data_pipelines import ops
  x = np.zeros((1, 9, 11, 2), np.float32)
  x[..., 0] = np.arange(11)[None, None]                   # column index
  x[..., 1] = np.arange(9)[None, :, None]                 # row index
  c = ops.center_crop(tf.constant(x), 4).numpy()
  # docs/sampling.md#center-crop: left = (11 - 4) // 2 = 3, top = (9 - 4) // 2 = 2
  assert c[0, 0, 0, 0] == 3 and c[0, 0, 0, 1] == 2


def test_frame_index_marks_a_record_with_one_non_jpeg_frame_not_ok():
  """'jpeg' is 1 only if *every* frame starts with the JPEG SOI marker (frame_index.py), as
  the reader without an index checks every frame."""
  tf = pytest.importorskip('tensorflow')
  from data_pipelines import frame_index, records
  jpeg = tf.io.encode_jpeg(np.zeros((8, 8, 3), np.uint8)).numpy()
  for frames, ok in (([jpeg, jpeg], True), ([jpeg, b'not a jpeg'], False)):
    data = records.make_sequence_example(frames, 1, filename='v').SerializeToString()
    raw = frame_index.entry(0, data, frames, 1, b'v')
    assert bool(frame_index.parse_entry(tf.constant(raw))['jpeg_ok']) == ok
