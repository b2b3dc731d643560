"""Frame index (data_pipelines/frame_index.py): exact spans, the same clips as whole records,
stale or missing indexes never used silently."""

import logging
import os

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

from data_pipelines import annotations  # noqa: E402
from data_pipelines import config as config_lib  # noqa: E402
from data_pipelines import frame_index  # noqa: E402
from data_pipelines import input_pipeline  # noqa: E402
from data_pipelines import prepare  # noqa: E402
from data_pipelines import records  # noqa: E402
from tests import data_helpers as h  # noqa: E402

LENGTHS = [40, 7, 33, 26, 60, 19]   # one video shorter than the 8-frame clip


def _frames(n, k):
  rng = np.random.RandomState(k)
  base = rng.randint(0, 255, (1, 24, 36, 3)).astype(np.float32)
  out = np.clip(base + rng.normal(0, 20, (n, 24, 36, 3)), 0, 255).astype(np.uint8)
  if n > 10:
    out[3:6] = out[3]  # identical consecutive frames: identical JPEG bytes
  return out


def _write_shards(d, name='idx', split='train'):
  """Two shards made with plain tf.train (no project code): DMVR's generator layout with
  timestamps, caption and audio in one, the plain layout in the other."""
  d.mkdir(parents=True, exist_ok=True)
  paths = [str(d / records.shard_name(name, split, i, 2)) for i in range(2)]
  h.write_dmvr_records(paths[0], [(f'plain{k}', k % 3, _frames(n, k))
                                  for k, n in enumerate(LENGTHS[:3])])
  with tf.io.TFRecordWriter(paths[1]) as w:
    for k, n in enumerate(LENGTHS[3:], 3):
      jpegs = [tf.io.encode_jpeg(f, quality=90).numpy() for f in _frames(n, k)]
      seq = h.dmvr_generator_record(jpegs, video_path=f'gen{k}.mp4', start=0.5, end=2.5,
                                    label_name=f'c{k % 3}', caption='a caption',
                                    label_map={f'c{i}': i for i in range(3)},
                                    audio=np.linspace(0, 1, 50).tolist())
      w.write(seq.SerializeToString())
  return paths, str(d / f'{name}-{split}.tfrecord-*')


def _index_entries(shard):
  raw = list(tf.data.TFRecordDataset(frame_index.index_path(shard)).as_numpy_iterator())
  return raw[0], [frame_index.parse_entry(r) for r in raw[1:]]


def test_index_spans_are_each_frames_jpeg_bytes_in_the_shard(tmp_path):
  paths, _ = _write_shards(tmp_path)
  for path in paths:
    stats = frame_index.build(path)
    blob = open(path, 'rb').read()
    assert frame_index.read_header(frame_index.index_path(path)) == (len(blob), stats['records'])
    recs = [records.parse_sequence_example(r) for r in tf.data.TFRecordDataset(path)]
    _, entries = _index_entries(path)
    assert len(entries) == len(recs) == stats['records'] == 3
    for rec, e in zip(recs, entries):
      frames = rec['frames'].numpy().tolist()
      spans = [blob[o:o + n] for o, n in zip(e['offsets'].numpy(), e['lengths'].numpy())]
      assert spans == frames and len(frames) in LENGTHS
      assert int(e['label']) == int(rec['label']) and e['filename'].numpy() == rec['filename']
      assert bool(e['jpeg_ok'])


def test_frames_read_one_by_one_or_by_one_covering_read_are_the_same(tmp_path):
  paths, _ = _write_shards(tmp_path)
  frame_index.build(paths[1])
  blob = open(paths[1], 'rb').read()
  _, entries = _index_entries(paths[1])
  off, length = entries[1]['offsets'].numpy(), entries[1]['lengths'].numpy()
  pick = np.array([9, 2, 2, 30])  # out of order, repeated, far apart
  want = [blob[o:o + n] for o, n in zip(off[pick], length[pick])]
  for covering in (False, True):
    got = frame_index._read_spans(paths[1].encode(), off[pick], length[pick], covering)
    assert got.tolist() == want
  with pytest.raises(ValueError, match='past the end of the file'):
    frame_index._read_spans(paths[1], np.array([len(blob) - 4]), np.array([10]), True)


@pytest.mark.parametrize('recipe', ['k400', 'ssv2', 'eval'])
def test_reading_through_the_index_gives_the_clips_of_whole_records(tmp_path, recipe):
  paths, pattern = _write_shards(tmp_path)
  for path in paths:
    frame_index.build(path)
  cfg = config_lib.default_data_config()
  cfg.train_files = cfg.test_files = pattern
  cfg.num_classes, cfg.num_frames, cfg.frame_interval = 3, 8, 2
  cfg.image_size, cfg.train_short_side, cfg.test_short_side = 32, 32, 32
  cfg.shuffle_buffer = 4
  cfg.autotune = False  # fixed parallelism: no autotuner thread to wait for at iterator deletion
  if recipe == 'ssv2':
    cfg.sampling, cfg.flip_prob = 'uniform', 0.0
    cfg.randaugment_n, cfg.randaugment_m, cfg.random_erasing_prob = 4, 7, 0.25

  def batches(mode):
    cfg.frame_index = mode
    if recipe == 'eval':
      it = input_pipeline.make_eval_dataset(cfg, split='test', batch_size=4, process_index=0,
                                            process_count=1)
      return list(it)
    it = input_pipeline.make_train_dataset(cfg, batch_size=4, seed=3, process_index=0,
                                           process_count=1)
    return [next(it) for _ in range(5)]  # three epochs of six videos

  whole, indexed = batches('off'), batches('require')
  assert len(whole) == len(indexed) > 1
  for a, b in zip(whole, indexed):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_prepare_writes_the_index_that_a_rebuild_gives(tmp_path):
  vids = tmp_path / 'vids'
  vids.mkdir()
  for k in range(4):
    h.make_video(str(vids / f'v{k}.mp4'), 9 + k, height=32, width=48)
  (tmp_path / 'list.txt').write_text(''.join(f'v{k}.mp4 {k % 2}\n' for k in range(4)))
  entries = annotations.read('list', str(tmp_path / 'list.txt'), str(vids), num_classes=2)
  out = tmp_path / 'out'
  prepare.prepare(entries, out_dir=str(out), name='p', split='train',
                  opts=prepare.Options(short_side=32), num_shards=2, progress=False)
  written_by_prepare = []
  for i in range(2):
    shard = str(out / records.shard_name('p', 'train', i, 2))
    written = open(frame_index.index_path(shard), 'rb').read()
    written_by_prepare.append(written)
    frame_index.build(shard)
    assert open(frame_index.index_path(shard), 'rb').read() == written
  assert sorted(os.listdir(out))[0].startswith('.')  # hidden: the reader skips it
  # A preparation finished without indexes (an older version) gets them when resumed,
  # without rewriting its shards.
  shard = str(out / records.shard_name('p', 'train', 0, 2))
  os.remove(frame_index.index_path(shard))
  mtime = os.path.getmtime(shard)
  prepare.prepare(entries, out_dir=str(out), name='p', split='train',
                  opts=prepare.Options(short_side=32), num_shards=2, progress=False)
  assert os.path.getmtime(shard) == mtime
  assert open(frame_index.index_path(shard), 'rb').read() == written_by_prepare[0]


def test_a_stale_or_missing_index_is_not_used_and_require_names_the_shard(tmp_path, caplog):
  paths, pattern = _write_shards(tmp_path)
  for path in paths:
    frame_index.build(path)
  cfg = config_lib.default_data_config()
  cfg.test_files = pattern
  cfg.num_classes, cfg.num_frames, cfg.sampling = 3, 4, 'uniform'
  cfg.image_size, cfg.test_short_side, cfg.test_clips, cfg.test_crops = 32, 32, 1, 1
  cfg.autotune = False

  def keys(mode):
    cfg.frame_index = mode
    return sorted(k.decode() for b in input_pipeline.make_eval_dataset(
        cfg, split='test', batch_size=4, process_index=0, process_count=1) for k in b['key'])

  assert len(keys('require')) == 6
  # a record appended to shard 1 after indexing: its index describes another file
  with open(paths[0], 'rb') as src:
    n = int.from_bytes(src.read(8), 'little')
    src.seek(0)
    first = src.read(frame_index.record_size(b'') + n)
  with open(paths[1], 'ab') as f:
    f.write(first)
  with caplog.at_level(logging.WARNING):
    got = keys('auto')
  assert len(got) == 7 and got.count('plain0') == 2   # whole records: the new one is read
  assert frame_index.index_path(paths[1]) in caplog.text and 'Ignoring frame index' in caplog.text
  with pytest.raises(ValueError, match=r'frame_index=require: .*idx-train.tfrecord-00001-of-00002'):
    keys('require')
  os.remove(frame_index.index_path(paths[0]))
  with pytest.raises(ValueError, match='idx-train.tfrecord-00000-of-00002 has no usable'):
    keys('require')
  # the check a run makes before it writes anything (train's plan, evaluate) says the same
  with pytest.raises(ValueError, match='idx-train.tfrecord-00000-of-00002 has no usable'):
    input_pipeline.split_files(cfg, 'test')
  cfg.frame_index = 'auto'
  assert input_pipeline.split_files(cfg, 'test') == paths
  cfg.frame_index = 'sometimes'
  with pytest.raises(ValueError, match="data.frame_index must be 'auto', 'off' or 'require'"):
    keys('sometimes')


def test_command_line_builds_indexes_and_names_a_bad_file(tmp_path, capsys):
  paths, pattern = _write_shards(tmp_path)
  assert frame_index.main([pattern]) == 0
  out = capsys.readouterr().out
  assert all(os.path.exists(frame_index.index_path(p)) for p in paths)
  assert f'{frame_index.index_path(paths[0])}: 3 records, {sum(LENGTHS[:3])} frames' in out
  assert frame_index.main([str(tmp_path / 'none-*')]) == 2
  assert 'no file matches' in capsys.readouterr().err


def test_command_line_names_each_file_it_cannot_index_on_one_clean_line(tmp_path, capsys):
  """Not a TFRecord, a truncated shard, records that are not SequenceExamples: one line each,
  naming the file, without TensorFlow's internals; exit status 2; the good shard is indexed."""
  paths, _ = _write_shards(tmp_path / 'shards')
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / 'a-junk.tfrecord').write_bytes(b'not a tfrecord at all, just some bytes')
  blob = open(paths[1], 'rb').read()
  (bad / 'b-cut.tfrecord').write_bytes(blob[:-100])          # the last of 3 records cut
  with tf.io.TFRecordWriter(str(bad / 'c-notproto.tfrecord')) as w:
    w.write(b'\xff\xff\xff not a protocol buffer')
  (bad / 'd-good.tfrecord').write_bytes(open(paths[0], 'rb').read())
  assert frame_index.main([str(bad / '*.tfrecord')]) == 2
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  want = [f'{bad / "a-junk.tfrecord"}: truncated or corrupt after 0 records (corrupted record',
          f'{bad / "b-cut.tfrecord"}: truncated or corrupt after 2 records (truncated record',
          f'{bad / "c-notproto.tfrecord"}: record 0 is not a tf.train.SequenceExample (']
  assert len(err) == 3, err
  for line, start in zip(err, want):
    assert line.startswith(f'frame_index: {start}') and line.endswith('); not indexed'), line
    assert '{{' not in line and 'function_node' not in line and '[Op:' not in line, line
  for name in ('a-junk', 'b-cut', 'c-notproto'):
    assert not os.path.exists(frame_index.index_path(str(bad / f'{name}.tfrecord')))
  good = str(bad / 'd-good.tfrecord')
  assert f'{frame_index.index_path(good)}: 3 records' in captured.out
  assert frame_index.read_header(frame_index.index_path(good))[1] == 3


def test_tf_error_line_keeps_the_message_without_internals():
  raw = ('{{function_node __wrapped__IteratorGetNext_output_types_1_device_/job:localhost/'
         'replica:0/task:0/device:CPU:0}} corrupted record at 0 (Is this even a TFRecord file?) '
         '[Op:IteratorGetNext] name: \nsecond line')
  assert frame_index.tf_error_line(raw) == 'corrupted record at 0 (Is this even a TFRecord file?)'
  assert frame_index.tf_error_line('truncated record at 30') == 'truncated record at 30'
