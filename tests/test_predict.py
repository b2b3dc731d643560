"""Single-video prediction and the array mode: same answers as the model on the same input,
official logits from an official-layout array, errors that name the file."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDEN, ROOT, cpu_env
from test_evaluate import TINY, tiny_params

from aim_jax.convert import cli as convert_cli
from aim_jax import errors
from aim_jax import predict
from aim_jax import checkpoints
from aim_jax.convert import official_names
from aim_jax.models.aim import average_views


def write_mp4(path, frames=40, height=40, width=56, seed=0):
  """A small H.264 file with moving coloured blocks, encoded with PyAV."""
  import av
  rng = np.random.RandomState(seed)
  base = rng.randint(0, 255, (height, width, 3)).astype(np.uint8)
  with av.open(str(path), mode='w') as container:
    stream = container.add_stream('libx264', rate=10)
    stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
    for t in range(frames):
      frame = np.roll(base, shift=2 * t, axis=1)
      frame[:, :8] = (t * 6) % 255
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp('ckpt') / 'tiny'
  _, params = tiny_params()
  checkpoints.save_params(str(path), params, TINY, {'source': 'test'})
  return str(path)


def test_video_top_k_equals_model_on_the_same_preprocessed_clip(tiny_checkpoint, tmp_path):
  from data_pipelines import video_io
  video = tmp_path / 'clip.mp4'
  write_mp4(video)
  predictor = predict.Predictor(tiny_checkpoint)
  # Without --config the data settings are the defaults with the checkpoint's shape.
  data = predictor.data_config
  assert (data.num_frames, data.image_size, data.num_classes) == (4, 32, 5)
  views = data.test_clips * data.test_crops
  rows = predict.top_k(predictor.video_scores(str(video)), 3)

  clip = video_io.load_video_clip(str(video), data, split='test')   # (V, T, H, W, 3)
  assert clip.shape == (views, 4, 32, 32, 3)
  model, params = tiny_params()
  logits = model.apply({'params': params}, jnp.asarray(clip))
  want = np.asarray(average_views(logits, views, 'prob'))[0]
  assert [r['class_index'] for r in rows] == list(np.argsort(-want)[:3])
  np.testing.assert_allclose([r['score'] for r in rows], np.sort(want)[::-1][:3], atol=1e-5)
  assert sum(np.asarray(want)) == pytest.approx(1.0, abs=1e-5)


def test_unreadable_or_missing_video_is_named(tiny_checkpoint, tmp_path):
  predictor = predict.Predictor(tiny_checkpoint)
  with pytest.raises(errors.DataError, match='video file .*nothing.mp4 does not exist'):
    predictor.video_scores(str(tmp_path / 'nothing.mp4'))
  bad = tmp_path / 'broken.mp4'
  bad.write_bytes(b'this is not a video' * 100)
  with pytest.raises(predict.VideoReadError, match='cannot read video .*broken.mp4'):
    predictor.video_scores(str(bad))


def test_missing_checkpoint_is_named(tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match='missing_ckpt does not exist'):
    predict.Predictor(str(tmp_path / 'missing_ckpt'))


@pytest.mark.parametrize('case', ['aim_tiny_case1', 'aim_tiny_case1_tadapter2'])
def test_array_mode_reproduces_official_logits(case, tmp_path):
  d = np.load(GOLDEN / f'{case}.npz')
  meta = json.loads(str(d['config_json'][0]))
  sd = {k[3:]: d[k] for k in d.files if k.startswith('sd/')}
  cfg = official_names.infer_aim_config(sd, heads=meta['heads'],
                                        adapter_scale=meta['adapter_scale'])
  params, _ = official_names.aim_params_from_state_dict(sd, cfg['heads'], cfg['backbone'])
  ckpt = tmp_path / 'official'
  checkpoints.save_params(str(ckpt), params, cfg)
  predictor = predict.Predictor(str(ckpt))
  x = d['input']                                              # (B, C, T, H, W)
  np.testing.assert_allclose(predict.predict_array(predictor, x, 'NCTHW'), d['logits'],
                             atol=2e-5, rtol=0)
  np.testing.assert_allclose(
      predict.predict_array(predictor, x.transpose(0, 2, 3, 4, 1), 'NTHWC'), d['logits'],
      atol=2e-5, rtol=0)
  mv = d['multiview_input']                                   # (1, V, C, T, H, W)
  view_logits = predict.predict_array(predictor, mv, 'NCTHW')  # (1, V, K)
  assert view_logits.shape == (1, mv.shape[1], cfg['num_classes'])
  np.testing.assert_allclose(average_views(jnp.asarray(view_logits[0]), mv.shape[1]),
                             d['multiview_scores'], atol=2e-5, rtol=0)
  with pytest.raises(ValueError, match=r'the model takes \(N, '):
    predict.predict_array(predictor, x, 'NTHWC')               # wrong layout -> wrong shape


@pytest.mark.slow
def test_command_line_prints_top_k_with_label_names(tiny_checkpoint, tmp_path):
  video = tmp_path / 'clip.mp4'
  write_mp4(video, seed=3)
  labels = tmp_path / 'classes.txt'
  labels.write_text('\n'.join(['walk', 'run', 'jump', 'swim', 'climb']) + '\n')
  env = cpu_env(1)
  base = [sys.executable, '-m', 'aim_jax.predict', '--checkpoint', tiny_checkpoint,
          '--video', str(video), '--top-k', '2']
  cmd = base + ['--labels', str(labels), '--output', str(tmp_path / 'top.json')]
  proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  top = json.loads((tmp_path / 'top.json').read_text())['top_k']
  assert [r['rank'] for r in top] == [1, 2]
  expected = predict.top_k(predict.Predictor(tiny_checkpoint).video_scores(str(video)), 2,
                           ['walk', 'run', 'jump', 'swim', 'climb'])
  assert [r['class_name'] for r in top] == [r['class_name'] for r in expected]
  assert f'1. {expected[0]["score"]:8.4f}  {expected[0]["class_name"]}' in proc.stdout
  assert 'checkpointer' not in proc.stderr.lower() and 'config:' not in proc.stderr

  (tmp_path / 'three.txt').write_text('a\nb\nc\n')
  proc = subprocess.run(base + ['--labels', str(tmp_path / 'three.txt')], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert 'three.txt has 3 class names but the model head has 5 classes' in proc.stderr


@pytest.mark.slow  # three interpreters that import jax
def test_command_line_array_of_another_shape_or_no_array_is_one_line(tiny_checkpoint, tmp_path):
  predictor = predict.Predictor(tiny_checkpoint)
  t, s = TINY['num_frames'], TINY['image_size']
  nthwc, flat, text = tmp_path / 'nthwc.npy', tmp_path / 'flat.npy', tmp_path / 'text.npy'
  np.save(nthwc, np.zeros((2, t, s, s, 3), np.float32))      # the other layout
  np.save(flat, np.zeros((3, t, s, s), np.float32))          # 4-D
  text.write_text('not an array')
  nan = tmp_path / 'nan.npy'
  bad = np.zeros((1, 3, t, s, s), np.float32)
  bad[0, 0, 0, 0, :2] = np.nan
  np.save(nan, bad)
  assert predictor.clip_shape('NCTHW') == (3, t, s, s)
  for path, message in (
      (nthwc, f'array file {nthwc}: array of shape (2, {t}, {s}, {s}, 3): the model takes '
              f'(N, 3, {t}, {s}, {s}) or (N, V, 3, {t}, {s}, {s}) in NCTHW (C, T, H, W); this '
              'is the NTHWC layout: --layout NTHWC'),
      (flat, f'array file {flat}: array of shape (3, {t}, {s}, {s}): expected 5-D NCTHW'),
      (text, f'array file {text}: '),
      (nan, f'array file {nan}: 2 of {bad.size} values are NaN or infinite')):
    proc = subprocess.run([sys.executable, '-m', 'aim_jax.predict', '--checkpoint',
                           tiny_checkpoint, '--array', str(path), '--output',
                           str(tmp_path / 'out.npy')], env=cpu_env(1), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('predict: DataError: ' + message), last
  assert not (tmp_path / 'out.npy').exists()


def test_output_is_checked_before_the_model_runs(tiny_checkpoint, tmp_path, monkeypatch):
  clip = tmp_path / 'clip.npy'
  np.save(clip, np.zeros((1, 3, TINY['num_frames'], TINY['image_size'], TINY['image_size']),
                         np.float32))
  (tmp_path / 'a_file').write_text('')
  import types
  ran = []
  monkeypatch.setattr(predict, 'Predictor', lambda *a, **k: ran.append(1))
  cases = [(dict(output=str(clip)), '--output .* is the input file itself'),
           (dict(output=str(tmp_path)), '--output .* is a folder'),
           (dict(output=str(tmp_path / 'a_file' / 'x.npy')), 'cannot make its folder'),
           (dict(batch_size=0), '--batch_size=0 must be >= 1'),
           (dict(top_k=0), '--top_k=0 must be >= 1')]
  for change, message in cases:
    args = dict(video='', array=str(clip), layout='NCTHW', batch_size=8, top_k=5,
                output=str(tmp_path / 'logits.npy'), labels='', checkpoint=tiny_checkpoint,
                which='latest', config=None)
    args.update(change)
    with pytest.raises(errors.ConfigError, match=message):
      predict._predict(types.SimpleNamespace(**args))
  assert not ran                                           # refused before any model loads
  assert np.load(clip).shape[0] == 1                       # the input is untouched
  args.update(output=str(tmp_path / 'new' / 'logits.npy'), top_k=5)
  predict._check_output(args['output'], args['array'])     # a new folder is made
  assert (tmp_path / 'new').is_dir()


def test_data_settings_come_from_the_config_or_the_training_run(tmp_path):
  from test_evaluate import _training_workdir

  from configs import tiny
  workdir = tmp_path / 'run'
  _, _, config = _training_workdir(workdir, dict(TINY))
  with config.unlocked():
    config.data.test_clips = 2
    config.eval.average_clips = 'score'
  predictor = predict.Predictor(str(workdir), config, which='best')
  assert predictor.data_config.test_clips == 2 and predictor.average_clips == 'score'
  # Without --config, a workdir's own run config gives the data settings.
  predictor = predict.Predictor(str(workdir))
  def as_json(c):   # tuples come back from config.json as lists
    return json.loads(json.dumps(c.to_dict()))

  assert as_json(predictor.data_config) == as_json(tiny.get_config().data)
  with pytest.raises(ValueError, match=r'model.num_classes: config 7, checkpoint 5'):
    with config.unlocked():
      config.model.num_classes = 7
    predict.Predictor(str(workdir), config)


@pytest.mark.torch
def test_official_checkpoint_through_convert_predicts_official_logits(tmp_path):
  """The documented path: official .pth -> `aim_jax.convert aim` -> `predict --array`."""
  torch = pytest.importorskip('torch')

  d = np.load(GOLDEN / 'aim_tiny_case1_tadapter2.npz')
  meta = json.loads(str(d['config_json'][0]))
  sd = {k[3:]: torch.from_numpy(np.array(d[k])) for k in d.files if k.startswith('sd/')}
  src = tmp_path / 'official_names.pth'
  torch.save({'state_dict': sd}, src)
  out = tmp_path / 'converted'
  assert convert_cli.main(['aim', '--src', str(src), '--out', str(out),
                           '--heads', str(meta['heads']),
                       '--adapter-scale', str(meta['adapter_scale'])]) in (0, None)
  np.save(tmp_path / 'input.npy', d['input'])
  env = cpu_env(1)
  proc = subprocess.run([sys.executable, '-m', 'aim_jax.predict', '--checkpoint', str(out),
                         '--array', str(tmp_path / 'input.npy'), '--layout', 'NCTHW',
                         '--output', str(tmp_path / 'logits.npy')], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  np.testing.assert_allclose(np.load(tmp_path / 'logits.npy'), d['logits'], atol=2e-5, rtol=0)


def test_evaluate_and_predict_share_the_checkpoint_flags():
  """--checkpoint (required), --which and --labels come from one definition in both commands."""
  code = '''
import json, sys
from absl import flags
from aim_jax import {module} as m
m._define_flags()
F = flags.FLAGS
print(json.dumps({{n: [F[n].help, F[n].default, sorted(getattr(F[n].parser, 'enum_values', None)
                                                       or [])]
                  for n in ('checkpoint', 'which', 'labels')}}))
try:
  F(['prog'])
except flags.IllegalFlagValueError as e:
  print('required:', 'checkpoint' in str(e))
'''
  env = cpu_env(1)
  seen = {}
  for module in ('evaluate', 'predict'):
    proc = subprocess.run([sys.executable, '-c', code.format(module=module)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    seen[module] = json.loads(lines[0])
    assert lines[1] == 'required: True', (module, lines)
  assert seen['evaluate'] == seen['predict']
  assert seen['predict']['which'][1:] == ['latest', ['best', 'latest']]


@pytest.mark.slow  # two interpreters that import jax and TensorFlow
def test_command_line_missing_or_broken_video_is_one_line(tiny_checkpoint, tmp_path):
  env = cpu_env(1)
  missing = tmp_path / 'nothing.mp4'
  bad = tmp_path / 'broken.mp4'
  bad.write_bytes(b'this is not a video' * 100)
  for video, message in ((missing, f'video file {missing} does not exist'),
                         (bad, f'cannot read video {bad}: ')):
    proc = subprocess.run([sys.executable, '-m', 'aim_jax.predict', '--checkpoint',
                           tiny_checkpoint, '--video', str(video)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]     # errors.EXIT_USER_ERROR
    assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('predict: ') and message in last, proc.stderr[-2000:]
