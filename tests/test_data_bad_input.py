"""Bad input: reading skips, counts and names bad clips; preparation reports and skips."""

import json
import os
import re
import threading

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

from aim_jax import errors  # noqa: E402
from data_pipelines import annotations  # noqa: E402
from data_pipelines import config as config_lib  # noqa: E402
from data_pipelines import input_pipeline  # noqa: E402
from data_pipelines import prepare  # noqa: E402
from data_pipelines import records  # noqa: E402
from tests import data_helpers as h  # noqa: E402


def _jpegs(n, value=100):
  frame = np.full((24, 32, 3), value, np.uint8)
  return [tf.io.encode_jpeg(frame).numpy() for _ in range(n)]


@pytest.fixture
def bad_shard(tmp_path):
  good = [records.make_sequence_example(_jpegs(6), k % 4, filename=f'good{k}') for k in range(12)]
  bad = [
      records.make_sequence_example([b'not a jpeg at all'] * 6, 1, filename='garbage'),
      records.make_sequence_example([], 1, filename='empty'),
      records.make_sequence_example(_jpegs(6), 7, filename='badlabel'),
      records.make_sequence_example([j[:len(j) // 2] for j in _jpegs(6)], 2, filename='truncated'),
  ]
  order = good[:3] + [bad[0]] + good[3:6] + [bad[1]] + good[6:9] + [bad[2]] + good[9:] + [bad[3]]
  path = tmp_path / 'bad-train.tfrecord-00000-of-00001'
  with tf.io.TFRecordWriter(str(path)) as w:
    for ex in order:
      w.write(ex.SerializeToString())
  # the record count prepare would leave beside the shard: lets the reader count a clip
  # dropped at the very end of an epoch
  with open(prepare.shard_meta_path(str(path)), 'w') as f:
    json.dump({'complete': True, 'videos': len(order)}, f)
  cfg = config_lib.default_data_config()
  cfg.train_files = cfg.test_files = str(path)
  cfg.num_classes, cfg.num_frames, cfg.frame_interval = 4, 4, 1
  cfg.image_size, cfg.train_short_side, cfg.test_short_side = 16, 24, 16
  cfg.shuffle_buffer = 1  # keep file order so the stream positions are known
  cfg.skip_rate_min_examples = 10_000
  return cfg


def test_train_skips_counts_and_names_bad_clips(bad_shard):
  cfg = bad_shard
  it = input_pipeline.make_train_dataset(cfg, batch_size=12, seed=0, process_index=0,
                                         process_count=1)
  first = next(it)  # one epoch = 12 good clips, the 4 bad ones skipped
  assert first['video'].shape == (12, 4, 16, 16, 3)
  assert sorted(first['label'].tolist()) == sorted(k % 4 for k in range(12))
  next(it)  # the next epoch reveals the truncated clip at the end of the first
  reasons = {key: reason for _, key, reason in it.stats.named}
  assert reasons['garbage'] == 'frame is not a JPEG'
  assert reasons['empty'] == 'record has no frames'
  assert reasons['badlabel'].startswith('label 7 outside [0, 4)')
  assert 'truncated' not in reasons  # caught only by decoding, counted from its gap
  assert it.stats.decode_errors == 1


def test_skip_rate_threshold_stops_with_clear_error(bad_shard):
  cfg = bad_shard
  cfg.skip_rate_min_examples = 10
  cfg.max_skip_rate = 0.05
  it = input_pipeline.make_train_dataset(cfg, batch_size=6, seed=0, process_index=0,
                                         process_count=1)
  with pytest.raises(errors.DataError, match='max_skip_rate.*(garbage|empty)'):
    for _ in range(10):
      next(it)


def test_eval_skips_bad_clips_and_keeps_going(bad_shard):
  cfg = bad_shard
  cfg.test_clips, cfg.test_crops = 1, 1
  it = input_pipeline.make_eval_dataset(cfg, split='test', batch_size=5, process_index=0,
                                        process_count=1)
  keys = [k.decode() for b in it for k in b['key']]
  assert sorted(keys) == sorted(f'good{k}' for k in range(12))
  assert len(it.stats.named) == 3 and it.stats.decode_errors == 1  # truncated, at the end


def test_prepare_reports_and_skips_bad_videos(tmp_path):
  vids = tmp_path / 'vids'
  os.makedirs(vids)
  h.make_video(str(vids / 'ok.mp4'), 12)
  (vids / 'broken.mp4').write_bytes(b'\x00\x01garbage, not a video' * 10)
  (tmp_path / 'list.txt').write_text('ok.mp4 1\nbroken.mp4 0\nmissing.mp4 0\nok.mp4 9\n')
  entries = annotations.read('list', str(tmp_path / 'list.txt'), str(vids), num_classes=3)
  report = prepare.prepare(entries, out_dir=str(tmp_path / 'out'), name='x', split='train',
                           opts=prepare.Options(short_side=32), num_shards=1, progress=False)
  assert report['videos_written'] == 1
  reasons = {(f['key'], f['reason'].split(':')[0]) for f in report['failures']}
  assert ('missing', 'FileNotFoundError') in reasons
  assert any(k == 'broken' for k, _ in reasons)
  assert any('label 9 outside [0, 3)' in f['reason'] for f in report['failures'])
  assert len(report['failures']) == 3


def _write_shard(path, examples, meta: bool):
  """A shard of `examples` and, if `meta`, the JSON prepare leaves beside it (with bytes)."""
  data = [ex.SerializeToString() for ex in examples]
  with tf.io.TFRecordWriter(str(path)) as w:
    for d in data:
      w.write(d)
  if meta:
    with open(prepare.shard_meta_path(str(path)), 'w') as f:
      json.dump({'complete': True, 'videos': len(data), 'bytes': sum(map(len, data))}, f)
  return [len(d) for d in data]


@pytest.fixture(params=[False, True], ids=['no_json', 'prepare_json'])
def cut_shard(tmp_path, request):
  """Two shards of 6 clips; the second cut inside its 4th record (3 readable, 3 lost)."""
  good = tmp_path / 'cut-train.tfrecord-00000-of-00002'
  cut = tmp_path / 'cut-train.tfrecord-00001-of-00002'
  _write_shard(good, [records.make_sequence_example(_jpegs(6), k % 4, filename=f'a{k}')
                      for k in range(6)], request.param)
  sizes = _write_shard(cut, [records.make_sequence_example(_jpegs(6), k % 4, filename=f'b{k}')
                             for k in range(6)], request.param)
  with open(cut, 'r+b') as f:  # a copy that stopped half way through record 4
    f.truncate(sum(s + 16 for s in sizes[:3]) + 16 + sizes[3] // 2)
  cfg = config_lib.default_data_config()
  cfg.train_files = cfg.test_files = str(tmp_path / 'cut-train.tfrecord-*')
  cfg.num_classes, cfg.num_frames, cfg.frame_interval = 4, 4, 1
  cfg.image_size, cfg.train_short_side, cfg.test_short_side = 16, 24, 16
  cfg.test_clips = cfg.test_crops = 1
  cfg.shuffle_buffer = 1
  cfg.skip_rate_min_examples = 10_000
  return cfg, str(cut), request.param


def _shard_entries(stats, cut):
  return [(f, k, r) for f, k, r in stats.named if f == cut]


def test_truncated_shard_is_named_with_its_reason_in_eval(cut_shard):
  cfg, cut, has_json = cut_shard
  # the split holds 12 videos when prepare's JSON says so, else the 9 that can be read
  assert input_pipeline.count_examples(cfg, 'test') == (12 if has_json else 9)
  it = input_pipeline.make_eval_dataset(cfg, split='test', batch_size=4, process_index=0,
                                        process_count=1)
  keys = sorted(k.decode() for b in it for k in b['key'])
  assert keys == sorted([f'a{k}' for k in range(6)] + ['b0', 'b1', 'b2'])
  (f, key, reason), = _shard_entries(it.stats, cut)
  assert key == os.path.basename(cut)
  assert 'truncated' in reason and 'DataLossError' in reason
  assert ('after 3 of 6 records' if has_json else 'after 3 records') in reason
  assert it.stats.decode_errors == 0
  assert it.stats.lost_records == (3 if has_json else 1)


def test_truncated_shard_is_named_in_training_and_skip_rate_error(cut_shard):
  cfg, cut, has_json = cut_shard
  it = input_pipeline.make_train_dataset(cfg, batch_size=9, seed=0, process_index=0,
                                         process_count=1)
  b = next(it)  # one epoch: 9 readable clips
  assert b['video'].shape == (9, 4, 16, 16, 3)
  next(it)
  entries = _shard_entries(it.stats, cut)
  assert entries and all('truncated' in r and 'DataLossError' in r for _, _, r in entries)
  assert it.stats.decode_errors == 0  # not mistaken for JPEG decode errors
  cfg.skip_rate_min_examples, cfg.max_skip_rate = 5, 0.01
  it = input_pipeline.make_train_dataset(cfg, batch_size=3, seed=0, process_index=0,
                                         process_count=1)
  with pytest.raises(errors.DataError, match=r'first named: .*cut-train.tfrecord-00001-of-00002.*'
                                         r'truncated or corrupt'):
    for _ in range(10):
      next(it)


def test_truncated_faststart_mp4_and_one_frame_video_are_reported(tmp_path):
  """A faststart mp4 cut half way opens and decodes without error to a short clip; a 1-frame
  video decodes fine: prepare reports both (frames decoded vs stated), and --min_frames
  skips and lists videos below it."""
  vids = tmp_path / 'vids'
  os.makedirs(vids)
  full = h.make_video(str(vids / 'full.mp4'), 40, faststart=True)
  h.truncate_mp4(full, str(vids / 'cut.mp4'), keep=0.5)
  h.make_video(str(vids / 'one.mp4'), 1, faststart=True)
  h.make_video(str(vids / 'three.mp4'), 3)
  report = video_io_report(str(vids / 'cut.mp4'))
  assert report.expected == 40 and 0 < report.decoded < 30
  assert 'truncated or damaged' in report.shortfall()
  assert video_io_report(full).shortfall() == ''
  trimmed = video_io_report(full, start_s=0.4, end_s=1.2)  # a Kinetics-style trim window
  assert (trimmed.expected, trimmed.decoded, trimmed.shortfall()) == (20, 20, '')
  beyond = video_io_report(full, start_s=1.0, end_s=9.0)  # window past the end: 1 s stated
  assert (beyond.expected, beyond.decoded, beyond.shortfall()) == (15, 15, '')
  (tmp_path / 'list.txt').write_text('full.mp4 0\ncut.mp4 1\none.mp4 0\nthree.mp4 1\n')
  entries = annotations.read('list', str(tmp_path / 'list.txt'), str(vids), num_classes=2)
  out = prepare.prepare(entries, out_dir=str(tmp_path / 'out'), name='x', split='train',
                        opts=prepare.Options(short_side=32, min_frames=2, warn_frames=8),
                        num_shards=1, progress=False)
  assert out['videos_written'] == 3
  fail, = out['failures']
  assert fail['key'] == 'one' and 'fewer than --min_frames=2' in fail['reason']
  warnings = {w['key']: w for w in out['warnings']}
  assert sorted(warnings) == ['cut', 'three']
  cut = warnings['cut']
  assert cut['frames_stated'] == 40 and cut['frames_decoded'] == cut['frames_written'] < 30
  assert f"decoded {cut['frames_decoded']} of the 40 frames" in cut['reason']
  assert 'only 3 frame(s)' in warnings['three']['reason']
  with open(tmp_path / 'out' / 'x-train.report.json') as f:
    assert len(json.load(f)['warnings']) == 2
  # without --min_frames the 1-frame video is written, and still listed
  out = prepare.prepare(entries, out_dir=str(tmp_path / 'out2'), name='x', split='train',
                        opts=prepare.Options(short_side=32), num_shards=1, progress=False)
  assert out['videos_written'] == 4 and not out['failures']
  assert 'only 1 frame(s)' in {w['key']: w for w in out['warnings']}['one']['reason']


def video_io_report(path, **kw):
  from data_pipelines import video_io
  report = video_io.DecodeReport()
  frames = list(video_io.decode_video(path, report=report, **kw))
  assert len(frames) == report.decoded
  return report


def test_training_on_a_source_with_no_good_clip_stops_instead_of_hanging(tmp_path):
  """Every record fails the checks (here: frames that are not JPEG), so no batch can ever be
  made: the skip-rate error comes, naming the clips, instead of an endless filter."""
  path = tmp_path / 'png-train.tfrecord-00000-of-00001'
  png = tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy()
  _write_shard(path, [records.make_sequence_example([png] * 4, 0, filename=f'p{k}')
                      for k in range(5)], meta=False)
  cfg = config_lib.default_data_config()
  cfg.train_files = str(path)
  cfg.num_classes, cfg.num_frames, cfg.frame_interval, cfg.image_size = 2, 2, 1, 8
  cfg.skip_rate_min_examples = 20
  it = input_pipeline.make_train_dataset(cfg, batch_size=2, seed=0, process_index=0,
                                         process_count=1)
  result = {}

  def first_batch():  # in a thread: a stream that filters forever must fail the test, not hang it
    try:
      result['batch'] = next(it)
    except Exception as e:  # pylint: disable=broad-except
      result['error'] = e

  worker = threading.Thread(target=first_batch, daemon=True)
  worker.start()
  worker.join(timeout=180)
  assert 'error' in result, 'no error after 180 s: the stream skips every clip forever'
  assert isinstance(result['error'], errors.DataError)
  assert re.search(r'above data.max_skip_rate=0.01.*first named: p\d in .*png-train.*frame is '
                   r'not a JPEG', str(result['error'])), result['error']
