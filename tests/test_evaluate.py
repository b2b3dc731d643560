"""Multi-view evaluation: sharding does not change results, every video counts once,
the view average is the official one, metrics and reports are right, errors name the cause."""

import json
import pathlib
import subprocess
import sys
import textwrap

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDEN, ROOT, cpu_env

from aim_jax import checkpoints, errors, evaluate, multiview, reports, run_config
from aim_jax import params as P
from aim_jax.convert import official_names
from aim_jax.models.aim import average_views
from aim_jax.models.factory import build_model

TINY = dict(patch_size=8, width=32, layers=2, heads=2, image_size=32, num_frames=4,
            num_classes=5, variant='')



def reference_scores(apply_fn, params, videos: np.ndarray, num_views: int,
                     average_clips: str = 'prob') -> np.ndarray:
  """Unsharded, one video at a time: (N, V, T, H, W, C) -> (N, K). For checks."""
  apply_fn = jax.jit(apply_fn)
  out = []
  for v in videos:
    logits = apply_fn(params, jnp.asarray(v))   # (V, K)
    out.append(np.asarray(average_views(logits, num_views, average_clips))[0])
  return np.stack(out)

def tiny_params(cfg=TINY, seed=0):
  """Init params, perturbed so that adapters and head are not zero (a real function)."""
  model = build_model(cfg)
  init = jax.jit(model.init)   # compiled: eager init of even a tiny ViT is slow op by op
  params = nn.unbox(init(jax.random.key(seed), jnp.zeros((1, 4, 32, 32, 3))))['params']
  rng = np.random.RandomState(seed + 1)
  return model, jax.tree.map(
      lambda x: np.asarray(x) + 0.05 * rng.randn(*x.shape).astype(np.float32), params)


def tiny_videos(n, views, seed=0):
  rng = np.random.RandomState(seed)
  return (rng.randn(n, views, 4, 32, 32, 3).astype(np.float32),
          rng.randint(0, 5, n).astype(np.int32))


def batches_of(videos, labels, batch_size, first_key=0):
  for i in range(0, len(videos), batch_size):
    yield dict(video=videos[i:i + batch_size], label=labels[i:i + batch_size],
               key=np.array([f'vid{first_key + j:03d}'.encode()
                             for j in range(i, min(i + batch_size, len(videos)))]))


def run_script(code, tmp_path, devices=8, timeout=300):
  env = cpu_env(devices, PYTHONPATH=f'{ROOT}:{ROOT / "tests"}')
  script = tmp_path / 'script.py'
  script.write_text(textwrap.dedent(code))
  proc = subprocess.run([sys.executable, str(script)], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


# --------------------------------------------------------------------------- sharding

SHARDED = """
import jax, numpy as np
from aim_jax import multiview
from test_evaluate import tiny_params, tiny_videos, batches_of
assert jax.device_count() == 8
model, params = tiny_params()
videos, labels = tiny_videos(13, 3)
out = {}
meshes = {'data8': multiview.eval_mesh(),
          'data4_model2': jax.make_mesh((4, 2), ('data', 'model'),
                                        axis_types=(jax.sharding.AxisType.Auto,) * 2)}
for name, mesh in meshes.items():
  res = multiview.evaluate(multiview.model_apply_fn(model), params, batches_of(videos, labels, 4),
                          num_classes=5, num_views=3, batch_size=4, mesh=mesh,
                          keep_scores=True, expected_count=13, progress=False)
  out[name + '/scores'] = res.scores
  out[name + '/keys'] = np.array(res.keys)
  out[name + '/labels'] = res.labels
  out[name + '/confusion'] = res.confusion
  out[name + '/padded'] = multiview.padded_batch_size(4, 3, mesh)
  out[name + '/metrics'] = np.array(__import__('json').dumps(res.metrics))
np.savez('{out}', **out)
"""


@pytest.mark.slow
def test_sharded_eval_on_8_devices_equals_single_device_loop_with_ragged_last_batch(tmp_path):
  # 13 videos in batches of 4: 4, 4, 4, 1. On the 8-way data mesh 4 videos x 3 views = 12
  # rows do not split over 8 devices, so each batch is padded to 8 videos as well.
  out = tmp_path / 'sharded.npz'
  run_script(SHARDED.replace('{out}', str(out)), tmp_path)
  got = np.load(out)
  model, params = tiny_params()
  videos, labels = tiny_videos(13, 3)
  want = reference_scores(multiview.model_apply_fn(model), params, videos, 3)
  assert int(got['data8/padded']) == 8 and int(got['data4_model2/padded']) == 4
  for name in ('data8', 'data4_model2'):
    np.testing.assert_allclose(got[f'{name}/scores'], want, atol=2e-6, rtol=0)
    assert list(got[f'{name}/keys']) == [f'vid{i:03d}' for i in range(13)]
    np.testing.assert_array_equal(got[f'{name}/labels'], labels)
    m = json.loads(str(got[f'{name}/metrics']))
    assert m['num_evaluated'] == 13 and m['num_skipped'] == 0
    assert got[f'{name}/confusion'].sum() == 13
    assert m['top1'] == pytest.approx(np.mean(want.argmax(1) == labels))


def test_padded_batch_fills_the_local_shards():
  one = multiview.eval_mesh(jax.devices()[:1])
  assert multiview.padded_batch_size(5, 3, one) == 5
  # 8 devices in-process (conftest): 5 videos x 3 views = 15 rows pad to 8 videos (24 rows).
  assert multiview.padded_batch_size(5, 3, multiview.eval_mesh()) == 8


def test_ragged_batches_in_process_equal_the_video_by_video_loop():
  # The fast counterpart of the 8-device test: 7 videos in batches of 3 (3, 3, 1).
  model, params = tiny_params()
  videos, labels = tiny_videos(7, 2, seed=4)
  res = multiview.evaluate(multiview.model_apply_fn(model), params, batches_of(videos, labels, 3),
                          num_classes=5, num_views=2, batch_size=3, keep_scores=True,
                          expected_count=7, progress=False)
  want = reference_scores(multiview.model_apply_fn(model), params, videos, 2)
  np.testing.assert_allclose(res.scores, want, atol=2e-6, rtol=0)
  assert res.keys == [f'vid{i:03d}' for i in range(7)] and res.metrics['num_evaluated'] == 7
  np.testing.assert_array_equal(res.topk_classes, np.argsort(-want, axis=1, kind='stable'))


# --------------------------------------------------------------------------- view averaging

@pytest.mark.parametrize('case', ['aim_tiny_case1', 'aim_tiny_case1_tadapter2'])
def test_multiview_average_reproduces_official_scores(case):
  d = np.load(GOLDEN / f'{case}.npz')
  meta = json.loads(str(d['config_json'][0]))
  sd = {k[3:]: d[k] for k in d.files if k.startswith('sd/')}
  cfg = official_names.infer_aim_config(sd, heads=meta['heads'],
                                        adapter_scale=meta['adapter_scale'])
  params, _ = official_names.aim_params_from_state_dict(sd, cfg['heads'], cfg['backbone'])
  mv = d['multiview_input']                                   # (1, V, C, T, H, W)
  video = mv.transpose(0, 1, 3, 4, 5, 2)                      # (1, V, T, H, W, C)
  model = build_model(cfg)
  res = multiview.evaluate(multiview.model_apply_fn(model), params,
                          [dict(video=video, label=np.array([0]), key=np.array([b'golden']))],
                          num_classes=cfg['num_classes'], num_views=mv.shape[1], batch_size=1,
                          keep_scores=True, progress=False)
  np.testing.assert_allclose(res.scores, d['multiview_scores'], atol=2e-5, rtol=0)
  np.testing.assert_allclose(res.topk_scores[0], np.sort(d['multiview_scores'][0])[::-1][:5],
                             atol=2e-5)


def _view_logits_apply(params, video):
  """Fake model: a view's logits are written in its first frame, row 0, channel 0."""
  return video[:, 0, 0, :, 0]                                 # (N, K)


def _logit_videos(logits):
  """(N, V, K) logits -> (N, V, 1, 1, W=K, 1) videos that _view_logits_apply reads back."""
  n, v, k = logits.shape
  return logits.reshape(n, v, 1, 1, k, 1).astype(np.float32)


def test_metrics_by_hand_with_padding_and_score_mode():
  # 5 videos, 2 views, 6 classes. Video i's two views favour classes chosen below.
  k = 6
  logits = np.full((5, 2, k), -5.0, np.float32)
  # video 0 label 0: both views say 0 -> correct.
  logits[0, :, 0] = 5.0
  # video 1 label 1: views say 2 (strongly) and 1 (weakly) -> prob average picks 2.
  logits[1, 0, 2], logits[1, 1, 1] = 9.0, 5.0
  # video 2 label 1: both views say 1.
  logits[2, :, 1] = 5.0
  # video 3 label 3: top-1 is 4, the label is second.
  logits[3, :, 4], logits[3, :, 3] = 5.0, 4.0
  # video 4 label 5: label ranked last of six -> not in top-5.
  logits[4, :, :5] = np.arange(5, dtype=np.float32)
  labels = np.array([0, 1, 1, 3, 5])
  videos = _logit_videos(logits)
  batches = [dict(video=videos[:3], label=labels[:3]), dict(video=videos[3:], label=labels[3:])]
  res = multiview.evaluate(_view_logits_apply, {}, batches, num_classes=k, num_views=2,
                          batch_size=3, expected_count=6, keep_scores=True, progress=False)
  m = res.metrics
  assert m['num_evaluated'] == 5 and m['num_skipped'] == 1
  assert m['top1'] == pytest.approx(2 / 5)
  assert m['top5'] == pytest.approx(4 / 5)
  # Classes present among the labels: 0 (1/1), 1 (1/2), 3 (0/1), 5 (0/1).
  assert m['mean_class_accuracy'] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
  np.testing.assert_array_equal(res.topk_classes[:, 0], [0, 2, 1, 4, 4])
  assert res.confusion[1, 2] == 1 and res.confusion[3, 4] == 1
  probs = jax.nn.softmax(logits, axis=-1).mean(axis=1)
  np.testing.assert_allclose(res.scores, probs, atol=1e-6)
  assert res.keys == [f'p0:{i}' for i in range(5)]
  # 'score' averages logits: video 1 becomes (9 - 5) / 2 = 2 for class 2 vs (5 - 5) / 2 = 0
  # for class 1 ... still 2; check the values, not just the argmax.
  res = multiview.evaluate(_view_logits_apply, {}, batches, num_classes=k, num_views=2,
                          batch_size=3, average_clips='score', keep_scores=True,
                          progress=False)
  np.testing.assert_allclose(res.scores, logits.mean(axis=1), atol=1e-6)


def test_batch_errors_name_the_problem():
  videos = _logit_videos(np.zeros((2, 2, 3)))
  with pytest.raises(ValueError, match=r'V=3'):
    multiview.evaluate(_view_logits_apply, {}, [dict(video=videos, label=np.zeros(2))],
                      num_classes=3, num_views=3, batch_size=2, progress=False)
  with pytest.raises(ValueError, match='outside'):
    multiview.evaluate(_view_logits_apply, {}, [dict(video=videos, label=np.array([0, 7]))],
                      num_classes=3, num_views=2, batch_size=2, progress=False)
  with pytest.raises(ValueError, match="average_clips"):
    multiview.make_eval_step(_view_logits_apply, multiview.eval_mesh(), 2, 'max')


# --------------------------------------------------------------------------- reports

def test_reports_round_trip_and_per_class_table(tmp_path):
  names = ['run', 'jump', 'swim']
  confusion = np.array([[2, 1, 0], [0, 0, 0], [1, 0, 3]])
  table = reports.per_class_table(confusion, names)
  assert table[0]['accuracy'] == pytest.approx(2 / 3)
  assert table[0]['most_confused_with'] == 'jump'
  assert table[1]['accuracy'] is None and table[1]['videos'] == 0
  rows = reports.prediction_rows(['a', 'b'], np.array([0, 2]), np.array([[0, 1], [1, 2]]),
                                 np.array([[0.7, 0.2], [0.5, 0.4]]), names)
  assert rows[0]['correct'] and not rows[1]['correct'] and rows[1]['topk_names'] == ['jump', 'swim']
  for fmt in ('csv', 'jsonl'):
    path = reports.write_predictions(str(tmp_path / f'p.{fmt}'), rows)
    assert reports.read_predictions(path) == rows
  png = reports.plot_confusion(str(tmp_path / 'c.png'), confusion, names)
  assert pathlib.Path(png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert reports.plot_confusion(str(tmp_path / 'big.png'),
                                np.zeros((reports.MAX_PLOT_CLASSES + 1,) * 2, int)) is None


def test_labels_file_must_match_the_head(tmp_path):
  path = tmp_path / 'classes.txt'
  path.write_text('run\njump\nswim\n')
  assert reports.read_class_names(str(path), 3) == ['run', 'jump', 'swim']
  with pytest.raises(errors.DataError, match=r'classes.txt has 3 class names but the model head '
                                          r'has 5'):
    reports.read_class_names(str(path), 5)
  (tmp_path / 'indexed.txt').write_text('0 run\n1 jump fast\n')
  assert reports.read_class_names(str(tmp_path / 'indexed.txt'), 2) == ['run', 'jump fast']


# --------------------------------------------------------------------------- checkpoints

def test_missing_checkpoint_is_named(tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match='nowhere.*does not exist'):
    checkpoints.load_checkpoint(str(tmp_path / 'nowhere'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(checkpoints.CheckpointError, match='neither a parameter checkpoint'):
    checkpoints.load_checkpoint(str(tmp_path / 'empty'))


def test_config_and_checkpoint_model_must_agree():
  ckpt = dict(TINY)
  merged = run_config.merge_model_config(dict(TINY, dtype='bfloat16', scan_layers=True), ckpt)
  assert merged['dtype'] == 'bfloat16' and merged['scan_layers'] and merged['num_frames'] == 4
  with pytest.raises(ValueError, match=r'model.num_frames: config 8, checkpoint 4'):
    run_config.merge_model_config(dict(TINY, num_frames=8), ckpt)
  with pytest.raises(ValueError, match=r'model.num_classes.*model.adapters.scale'):
    run_config.merge_model_config(dict(TINY, num_classes=7, adapters=dict(scale=1.0)), ckpt)


def test_checkpoint_params_are_checked_against_the_model(tmp_path):
  _, params = tiny_params()
  _, loaded, _ = checkpoints.prepare_model(dict(TINY, scan_layers=True), params)
  assert P.is_scan_layout(loaded) and not P.is_scan_layout(params)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'cls_head/fc_cls/bias: checkpoint shape \(5,\), model shape \(6,\)'):
    checkpoints.prepare_model(dict(TINY, num_classes=6), params)


def write_tiny_records(directory, num_videos=11, bad_label_at=4, frames=12):
  """DMVR SequenceExample shards of small JPEG videos; one record has an out-of-range label."""
  import tensorflow as tf

  from data_pipelines import records
  rng = np.random.RandomState(0)
  directory.mkdir(parents=True, exist_ok=True)
  shards = [tf.io.TFRecordWriter(str(directory / records.shard_name('tiny', 'test', i, 2)))
            for i in range(2)]
  for v in range(num_videos):
    video = rng.randint(0, 255, (frames, 40, 48, 3)).astype(np.uint8)
    jpegs = [tf.io.encode_jpeg(f).numpy() for f in video]
    label = 7 if v == bad_label_at else v % 5
    ex = records.make_sequence_example(jpegs, label, filename=f'video_{v:02d}.mp4')
    shards[v % 2].write(ex.SerializeToString())
  for w in shards:
    w.close()
  return str(directory / 'tiny-test.tfrecord-*')


@pytest.mark.slow
def test_evaluate_entry_point_end_to_end_on_tiny_tfrecords(tmp_path):
  """`python -m aim_jax.evaluate` on a converted-style checkpoint and real TFRecords:
  8 devices, 2 clips x 3 crops, a ragged last batch, one unusable record skipped."""
  cfg = dict(TINY)
  _, params = tiny_params(cfg)
  ckpt = tmp_path / 'ckpt'
  checkpoints.save_params(str(ckpt), params, cfg, {'source': 'test'})
  pattern = write_tiny_records(tmp_path / 'records')
  out = tmp_path / 'out'
  env = cpu_env(8)
  # 10 usable videos in global batches of 4: the last batch holds 2.
  cmd = [sys.executable, '-m', 'aim_jax.evaluate', '--config', 'configs/tiny.py',
         '--checkpoint', str(ckpt), '--output_dir', str(out), '--config.eval.split=test',
         '--config.eval.batch_size=4', '--config.data.source=tfrecord',
         f'--config.data.test_files={pattern}', '--config.data.test_clips=2',
         '--config.data.test_crops=3', '--config.data.test_short_side=32',
         '--predictions_format', 'jsonl', '--noprogress']
  proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  summary = json.loads((out / 'summary.json').read_text())
  m = summary['metrics']
  assert m['num_evaluated'] == 10 and m['num_skipped'] == 1 and m['num_views'] == 6
  assert summary['devices'] == 8
  assert [s['key'] for s in summary['skipped_named']] == ['video_04.mp4']
  rows = reports.read_predictions(str(out / 'predictions.jsonl'))
  assert sorted(r['video_id'] for r in rows) == [f'video_{v:02d}.mp4' for v in range(11)
                                                  if v != 4]
  assert m['top1'] == pytest.approx(np.mean([r['correct'] for r in rows]))
  assert (out / 'confusion.png').exists() and (out / 'per_class.csv').exists()
  assert 'top1' in proc.stdout
  # The log is the project's: no orbax INFO chatter, no dump of the whole config.
  assert '/orbax/' not in proc.stderr and 'checkpointer' not in proc.stderr.lower(), \
      proc.stderr[-2000:]
  assert 'logical_axis_rules' not in proc.stderr and 'config:' not in proc.stderr

  # A config whose model disagrees with the checkpoint is refused, naming the field.
  proc = subprocess.run(cmd + ['--config.model.num_frames=8', '--config.data.num_frames=8'],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode != 0 and 'model.num_frames: config 8, checkpoint 4' in proc.stderr

def _training_workdir(path, cfg):
  """A workdir as training writes it: frozen/ once, trainable leaves per step, best/."""
  from aim_jax import steps
  from aim_jax import checkpoints
  from configs import tiny
  _, params = tiny_params(cfg)
  names = steps.trainable_names(P.trainable_mask(params))
  train, frozen = steps.split_params(params, names)
  later = {k: v + 1.0 for k, v in train.items()}
  config = tiny.get_config()
  checkpoints.start_run(str(path), config, cfg, {'source': 'test'})   # first, as a run does
  ckpt = checkpoints.TrainCheckpointer(str(path), keep=2, async_save=False)
  ckpt.save_frozen(frozen)
  ckpt.save_best(5, train, {'top1': 0.5, 'step': 5})
  import optax
  ckpt.save(10, later, optax.adam(1e-3).init(later), {'step': 10})
  ckpt.close()
  return params, P.unflatten({**frozen, **later}), config


def test_training_workdir_latest_and_best(tmp_path):
  workdir = tmp_path / 'run'
  best, latest, _ = _training_workdir(workdir, dict(TINY))
  for which, want in (('latest', latest), ('best', best)):
    params, model_cfg, kind = checkpoints.load_checkpoint(str(workdir), which)
    assert kind == 'workdir' and model_cfg['num_frames'] == 4
    chex.assert_trees_all_equal(P.flatten(params), P.flatten(want))   # keys, shapes, values


@pytest.mark.slow
def test_evaluate_from_the_best_checkpoint_of_a_training_workdir(tmp_path):
  workdir = tmp_path / 'run'
  _, _, config = _training_workdir(workdir, dict(TINY))
  with config.unlocked():
    config.eval.split = 'test'
    config.eval.batch_size = 6
  labels = tmp_path / 'classes.txt'
  labels.write_text('a\nb\nc\nd\ne\n')
  res = evaluate.evaluate_checkpoint(config, str(workdir), which='best', labels_file=str(labels),
                                     progress=False)
  out = workdir / 'eval_test_best'
  assert res.metrics['num_evaluated'] == 32
  assert len(reports.read_predictions(str(out / 'predictions.csv'))) == 32
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['which'] == 'best' and summary['checkpoint_kind'] == 'workdir'
  assert (out / 'per_class.csv').read_text().splitlines()[1].split(',')[1] == 'a'


WORKER = """
import json, sys
import jax
pid, port, out, predictions = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                           process_id=pid)
import numpy as np
from aim_jax import evaluate
from aim_jax import multiview
from test_evaluate import tiny_params, tiny_videos, batches_of
assert jax.device_count() == 8 and jax.local_device_count() == 4
model, params = tiny_params()
videos, labels = tiny_videos(13, 3)
# Unequal process shards: process 0 reads 9 videos (batches 4, 4, 1), process 1 reads 4.
sl = slice(0, 9) if pid == 0 else slice(9, 13)
res = multiview.evaluate(multiview.model_apply_fn(model), params,
                        batches_of(videos[sl], labels[sl], 4, sl.start), num_classes=5,
                        num_views=3, batch_size=4, keep_scores=True, expected_count=13,
                        progress=False)
# What evaluate_checkpoint writes: one file, by process 0, with both processes' videos.
written = evaluate.write_predictions(predictions, res, ['a', 'b', 'c', 'd', 'e'])
assert (written is not None) == (pid == 0), written
np.savez(out, scores=res.scores, labels=res.labels, confusion=res.confusion,
         metrics=np.array(json.dumps(res.metrics)))
"""


@pytest.mark.slow
def test_two_processes_with_unequal_shards_count_every_video_once(tmp_path):
  """Multi-host path (jax.distributed on localhost, 2 processes x 4 CPU devices)."""
  import socket
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  script = tmp_path / 'worker.py'
  script.write_text(WORKER)
  env = cpu_env(4, PYTHONPATH=f'{ROOT}:{ROOT / "tests"}')
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port),
                             str(tmp_path / f'out{i}.npz'),
                             str(tmp_path / 'predictions' / 'predictions.csv')], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  for p in procs:
    log = p.communicate(timeout=300)[0]
    assert p.returncode == 0, log[-3000:]
  outs = [np.load(tmp_path / f'out{i}.npz') for i in range(2)]
  model, params = tiny_params()
  videos, labels = tiny_videos(13, 3)
  want = reference_scores(multiview.model_apply_fn(model), params, videos, 3)
  np.testing.assert_allclose(np.concatenate([o['scores'] for o in outs]), want, atol=2e-6)
  np.testing.assert_array_equal(np.concatenate([o['labels'] for o in outs]), labels)
  for o in outs:   # metrics are reduced over both processes
    m = json.loads(str(o['metrics']))
    assert m['num_evaluated'] == 13 and o['confusion'].sum() == 13
    assert m['top1'] == pytest.approx(np.mean(want.argmax(1) == labels))
  # One predictions file: every video once, in process order, with its own prediction.
  assert [p.name for p in (tmp_path / 'predictions').iterdir()] == ['predictions.csv']
  rows = reports.read_predictions(str(tmp_path / 'predictions' / 'predictions.csv'))
  assert [r['video_id'] for r in rows] == [f'vid{i:03d}' for i in range(13)]
  assert [r['label'] for r in rows] == labels.tolist()
  assert [r['topk_classes'][0] for r in rows] == want.argmax(1).tolist()
  assert [r['label_name'] for r in rows] == ['abcde'[c] for c in labels]
  np.testing.assert_allclose([r['topk_scores'][0] for r in rows], want.max(1), atol=1e-5)


def test_routine_orbax_warnings_are_quiet_others_pass():
  import logging

  def record(path, level, msg):
    return logging.LogRecord('absl', level, path, 1, msg, (), None)
  keep = errors._QuietLibraries().filter
  orbax = '/site-packages/orbax/checkpoint/checkpoint_manager.py'
  assert not keep(record(orbax, logging.INFO, 'Saving item'))
  assert not keep(record(orbax, logging.WARNING, 'Given directory is read only=%s'))
  assert not keep(record(orbax, logging.WARNING, 'Metadata file does not exist: %s'))
  assert keep(record(orbax, logging.WARNING, 'Something else went wrong: %s'))
  assert keep(record(orbax, logging.ERROR, 'Given directory is read only=%s'))
  assert keep(record('/aim_jax/train.py', logging.INFO, 'step 1'))


def test_no_video_evaluated_or_a_file_as_output_dir_is_an_error_before_any_report(tmp_path):
  from configs import tiny
  workdir = tmp_path / 'run'
  _training_workdir(workdir, dict(TINY))
  not_records = tmp_path / 'v0.mp4'
  not_records.write_bytes(b'not a TFRecord file')
  config = tiny.get_config()
  config.unlock()
  config.data.source, config.data.val_files = 'tfrecord', str(not_records)
  with pytest.raises(errors.DataError, match=rf"no video of split 'val' was evaluated "
                                             rf"\(data.val_files='{not_records}'"):
    evaluate.evaluate_checkpoint(config, str(workdir), output_dir=str(tmp_path / 'rep'),
                                 progress=False)
  assert not (tmp_path / 'rep').exists()
  with pytest.raises(errors.ConfigError, match=rf'--output_dir {not_records} is a file'):
    evaluate.evaluate_checkpoint(tiny.get_config(), str(workdir), output_dir=str(not_records),
                                 progress=False)
