"""Bad input: reading skips, counts and names bad clips; preparation reports and skips."""

import json
import os

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

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
  with pytest.raises(RuntimeError, match='max_skip_rate.*(garbage|empty)'):
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
