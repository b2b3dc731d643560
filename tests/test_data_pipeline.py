"""Real mp4s (PyAV) -> prepare -> DMVR shards -> train/eval pipelines, checked exactly."""

import glob
import json
import os

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')
pytest.importorskip('av')

from aim_jax import errors  # noqa: E402
from data_pipelines import annotations  # noqa: E402
from data_pipelines import config as config_lib  # noqa: E402
from data_pipelines import input_pipeline  # noqa: E402
from data_pipelines import prepare  # noqa: E402
from data_pipelines import records  # noqa: E402
from data_pipelines import video_io  # noqa: E402
from tests import data_helpers as h  # noqa: E402

# video k has LENGTHS[k] frames and label k % 3; one is shorter than the 16-frame window
LENGTHS = [20, 25, 30, 35, 40, 10, 45, 28]


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  d = tmp_path_factory.mktemp('data')
  os.makedirs(d / 'vids')
  lines = []
  for k, n in enumerate(LENGTHS):
    h.make_video(str(d / 'vids' / f'v{k}.mp4'), n)
    lines.append(f'v{k}.mp4 {k % 3}')
  (d / 'list.txt').write_text('\n'.join(lines))
  entries = annotations.read('list', str(d / 'list.txt'), str(d / 'vids'), num_classes=3)
  report = prepare.prepare(entries, out_dir=str(d / 'out'), name='toy', split='train',
                           opts=prepare.Options(short_side=64), num_shards=3, progress=False)
  return d, report


def make_cfg(d, **kw):
  cfg = config_lib.default_data_config()
  pattern = str(d / 'out' / 'toy-train.tfrecord-*')
  cfg.train_files = cfg.val_files = cfg.test_files = pattern
  cfg.num_classes = 3
  cfg.num_frames = 8
  cfg.frame_interval = 2
  cfg.image_size = 32
  cfg.train_short_side = 64
  cfg.test_short_side = 32
  cfg.shuffle_buffer = 8
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


def frame_indices(video):
  """Recovers frame indices from the normalised R channel of (..., T, H, W, 3) clips."""
  r = video[..., 0].mean(axis=(-1, -2)) * config_lib.CLIP_STD[0] + config_lib.CLIP_MEAN[0]
  return np.vectorize(h.frame_index)(r)


def test_prepare_report_and_shard_names(dataset):
  d, report = dataset
  assert report['videos_written'] == len(LENGTHS) and not report['failures']
  assert report['frames'] == sum(LENGTHS)
  # the shard glob matches only shards: per-shard JSON files are hidden
  names = sorted(os.path.basename(p) for p in glob.glob(str(d / 'out' / 'toy-train.tfrecord-*')))
  assert names == [f'toy-train.tfrecord-0000{i}-of-00003' for i in range(3)]
  with open(d / 'out' / 'toy-train.report.json') as f:
    assert json.load(f)['videos_written'] == len(LENGTHS)


def test_our_shards_read_with_plain_dmvr_parser(dataset):
  """A plain tf.data parser of the DMVR layout (not our code) reads our shards."""
  d, _ = dataset
  files = sorted(glob.glob(str(d / 'out' / 'toy-train.tfrecord-*')))
  seen = {}
  for raw in tf.data.TFRecordDataset(files):
    ctx, seq = tf.io.parse_single_sequence_example(
        raw, context_features={'clip/label/index': tf.io.VarLenFeature(tf.int64),
                               'clip/label/text': tf.io.FixedLenFeature([], tf.string),
                               'video/filename': tf.io.FixedLenFeature([], tf.string)},
        sequence_features={'image/encoded': tf.io.FixedLenSequenceFeature([], tf.string)})
    key = ctx['video/filename'].numpy().decode()
    k = int(key[1:])
    frames = seq['image/encoded']
    assert int(tf.sparse.to_dense(ctx['clip/label/index'])[0]) == k % 3
    assert frames.shape[0] == LENGTHS[k]
    img = tf.io.decode_jpeg(frames[3]).numpy()
    assert img.shape == (64, 96, 3)
    assert h.frame_index(img[..., 0].mean()) == 3
    seen[key] = True
  assert len(seen) == len(LENGTHS)


def test_count_examples_from_report_and_by_reading(dataset, tmp_path):
  d, _ = dataset
  cfg = make_cfg(d)
  assert input_pipeline.count_examples(cfg, 'train') == len(LENGTHS)
  # without the JSON files the shards are counted by reading them
  for p in glob.glob(str(d / 'out' / 'toy-train.tfrecord-*')):
    os.symlink(p, tmp_path / os.path.basename(p))
  cfg.val_files = str(tmp_path / '*')
  assert input_pipeline.count_examples(cfg, 'val') == len(LENGTHS)
  cfg.train_fraction = 0.5
  n = input_pipeline.count_examples(cfg, 'train')
  assert 0 < n < len(LENGTHS)


def test_record_counts_come_from_the_json_files_on_a_non_local_file_system(dataset):
  """Shards copied with their prepare JSON files to a file system that is not the local one
  (TF's ram://, standing in for gs://) keep their counts: no shard has to be read to count it,
  from the per-shard JSON or, without it, from the split's report."""
  d, _ = dataset
  local = sorted(glob.glob(str(d / 'out' / 'toy-train.tfrecord-*')))
  for with_shard_json in (True, False):
    root = f'ram://counts_{int(with_shard_json)}/out'
    tf.io.gfile.makedirs(root)
    names = [os.path.basename(p) for p in local] + ['toy-train.report.json']
    if with_shard_json:
      names += [f'.{os.path.basename(p)}.json' for p in local]
    for name in names:
      tf.io.gfile.copy(str(d / 'out' / name), f'{root}/{name}', overwrite=True)
    shards = input_pipeline._shard_meta([f'{root}/{os.path.basename(p)}' for p in local])
    counts = [s.records for s in shards]
    assert all(c > 0 for c in counts) and sum(counts) == len(LENGTHS), (with_shard_json, counts)


def test_train_batches_dense_indices_labels_and_determinism(dataset):
  d, _ = dataset
  cfg = make_cfg(d, flip_prob=0.0)
  it = input_pipeline.make_train_dataset(cfg, batch_size=4, seed=3, process_index=0,
                                         process_count=1)
  batches = [next(it) for _ in range(5)]  # 20 clips: more than two epochs of 8
  for b in batches:
    assert b['video'].shape == (4, 8, 32, 32, 3) and b['video'].dtype == np.float32
    assert b['label'].dtype == np.int32
    idx = frame_indices(b['video'])
    for clip in idx:
      n = next(n for n in LENGTHS if (clip < n).all() and _dense_ok(clip, n))
      assert n
  # labels agree with the clip's video: identify the video by its frame count pattern
  epoch = np.concatenate([b['label'] for b in batches])[:8]
  assert sorted(epoch.tolist()) == sorted(k % 3 for k in range(len(LENGTHS)))
  again = input_pipeline.make_train_dataset(cfg, batch_size=4, seed=3, process_index=0,
                                            process_count=1)
  for b in batches:
    b2 = next(again)
    np.testing.assert_array_equal(b['video'], b2['video'])
    np.testing.assert_array_equal(b['label'], b2['label'])
  other = next(input_pipeline.make_train_dataset(cfg, batch_size=4, seed=4, process_index=0,
                                                 process_count=1))
  assert not np.array_equal(other['video'], batches[0]['video'])
  # resume at step 3 continues the same stream (crosses an epoch boundary: 12 % 8 = 4)
  resumed = input_pipeline.make_train_dataset(cfg, batch_size=4, seed=3, process_index=0,
                                              process_count=1, start_step=3)
  for b in batches[3:]:
    b2 = next(resumed)
    np.testing.assert_array_equal(b['video'], b2['video'])
    np.testing.assert_array_equal(b['label'], b2['label'])


def _dense_ok(clip, n):
  """Indices of a dense clip: consecutive steps of 2 modulo n, in range."""
  return all((clip[i + 1] - clip[i]) % n == 2 % n for i in range(len(clip) - 1))


def test_short_video_wraps_around(dataset):
  d, _ = dataset
  cfg = make_cfg(d, flip_prob=0.0, frame_interval=2)
  it = input_pipeline.make_train_dataset(cfg, batch_size=8, seed=0, process_index=0,
                                         process_count=1)
  b = next(it)
  idx = frame_indices(b['video'])
  # the 10-frame video (label 5 % 3 = 2) needs a 16-frame window: offset 0, looped indices
  assert [0, 2, 4, 6, 8, 0, 2, 4] in idx.tolist()


def test_eval_views_match_official_test_clips_and_every_video_once(dataset):
  d, _ = dataset
  cfg = make_cfg(d, test_clips=3, test_crops=3)
  keys, by_key = [], {}
  for pi in range(2):
    for b in input_pipeline.make_eval_dataset(cfg, split='test', batch_size=3, process_index=pi,
                                              process_count=2):
      assert b['video'].shape[1:] == (9, 8, 32, 32, 3)
      for key, label, video in zip(b['key'], b['label'], b['video']):
        k = int(key.decode()[1:])
        assert label == k % 3
        keys.append(k)
        by_key[k] = video
  assert sorted(keys) == list(range(len(LENGTHS)))
  from tests.test_data_sampling_ops import ref_dense_test
  for k, video in by_key.items():
    want = ref_dense_test(LENGTHS[k], 8, 2, 3)
    idx = frame_indices(video)  # (9, 8): crop-major, then clip
    for crop in range(3):
      np.testing.assert_array_equal(idx[crop * 3:(crop + 1) * 3], want)
    # ThreeCrop on 32x48 frames: G ramp increases from the left crop to the right crop
    g = video[..., 1].mean(axis=(1, 2, 3))
    assert g[0] < g[6] < g[3]  # left < middle < right (views 0, 6, 3 are clip 0 of each crop)


def test_eval_uniform_sampling_val_split(dataset):
  d, _ = dataset
  cfg = make_cfg(d, sampling='uniform', val_clips=1, val_crops=1)
  from tests.test_data_sampling_ops import ref_segments
  for b in input_pipeline.make_eval_dataset(cfg, split='val', batch_size=8, process_index=0,
                                            process_count=1):
    assert b['video'].shape == (8, 1, 8, 32, 32, 3)
    for key, video in zip(b['key'], b['video']):
      n = LENGTHS[int(key.decode()[1:])]
      start, end = ref_segments(n, 8)
      assert frame_indices(video)[0].tolist() == [(s + e) // 2 for s, e in zip(start, end)]


def test_train_flip_and_processes_disjoint(dataset):
  d, _ = dataset
  cfg = make_cfg(d, flip_prob=1.0, area_range=(1.0, 1.0), aspect_ratio_range=(1.5, 1.5))
  b = next(input_pipeline.make_train_dataset(cfg, batch_size=2, seed=0, process_index=0,
                                             process_count=1))
  g = b['video'][..., 1].mean(axis=(0, 1, 2))  # G ramp along width
  assert g[0] > g[-1]  # flipped: ramp decreases
  # two processes read disjoint shards (3 shards: process 0 gets 0 and 2, process 1 gets 1):
  # one epoch of each holds exactly the labels of its shards
  cfg = make_cfg(d, flip_prob=0.0)
  files = input_pipeline.list_files(cfg.train_files)
  for pi in range(2):
    mine = files[pi::2]
    want = sorted(int(records.parse_sequence_example(r)['label'])
                  for r in tf.data.TFRecordDataset(mine))
    it = input_pipeline.make_train_dataset(cfg, batch_size=len(want), seed=0, process_index=pi,
                                           process_count=2)
    assert sorted(next(it)['label'].tolist()) == want


def test_load_video_clip_matches_eval_pipeline(dataset):
  d, _ = dataset
  cfg = make_cfg(d, test_clips=2, test_crops=1)
  views = video_io.load_video_clip(str(d / 'vids' / 'v3.mp4'), cfg, split='test')
  assert views.shape == (2, 8, 32, 32, 3) and views.dtype == np.float32
  from tests.test_data_sampling_ops import ref_dense_test
  np.testing.assert_array_equal(frame_indices(views), ref_dense_test(LENGTHS[3], 8, 2, 2))
  for b in input_pipeline.make_eval_dataset(cfg, split='test', batch_size=8, process_index=0,
                                            process_count=1):
    i = [k.decode() for k in b['key']].index('v3')
    # same frames, same geometry; differences are only the JPEG round trip of the records
    assert np.abs(b['video'][i] - views).mean() < 0.05


def test_records_written_with_plain_tf_train_read_by_pipeline(tmp_path):
  """DMVR-layout records made without our code are read by our pipeline."""
  vids = []
  for k in range(4):
    frames = np.zeros((12 + k, 40, 60, 3), np.uint8)
    for i in range(frames.shape[0]):
      frames[i, ..., 0] = h.frame_value(i)
      frames[i, ..., 2] = h.frame_value(i)
    vids.append((f'clip{k}', k, frames))
  h.write_dmvr_records(str(tmp_path / 'dmvr-test.tfrecord-00000-of-00001'), vids)
  cfg = config_lib.default_data_config()
  cfg.test_files = str(tmp_path / 'dmvr-test.tfrecord-*')
  cfg.num_classes, cfg.num_frames, cfg.sampling = 4, 4, 'uniform'
  cfg.image_size, cfg.test_short_side, cfg.test_clips, cfg.test_crops = 32, 32, 1, 1
  got = {}
  for b in input_pipeline.make_eval_dataset(cfg, split='test', batch_size=4, process_index=0,
                                            process_count=1):
    for key, label, video in zip(b['key'], b['label'], b['video']):
      got[key.decode()] = (int(label), frame_indices(video)[0].tolist())
  from tests.test_data_sampling_ops import ref_segments
  for k in range(4):
    start, end = ref_segments(12 + k, 4)
    assert got[f'clip{k}'] == (k, [(s + e) // 2 for s, e in zip(start, end)])


def test_pattern_matching_nothing_names_it(tmp_path):
  cfg = config_lib.default_data_config()
  cfg.train_files = str(tmp_path / 'nothing-*.tfrecord')
  with pytest.raises(errors.DataError, match='nothing-'):
    input_pipeline.make_train_dataset(cfg, batch_size=2, seed=0, process_index=0, process_count=1)
  with pytest.raises(errors.DataError, match='train_files'):
    input_pipeline.count_examples(cfg, 'train')


def test_a_wide_glob_takes_the_shards_not_the_files_prepare_writes_beside_them(dataset, caplog):
  # prepare writes .SHARD.json and the frame index .SHARD.frames beside each shard; unlike a
  # shell, tf.io.gfile.glob matches hidden names, so 'out/*train*' finds them too.
  d, report = dataset
  wide = str(d / 'out' / '*train*')
  hidden = [p for p in os.listdir(d / 'out') if p.startswith('.') and 'train' in p]
  assert any(p.endswith('.frames') for p in hidden), os.listdir(d / 'out')
  shards = input_pipeline.list_files(wide, 'train_files')
  assert shards == sorted(glob.glob(str(d / 'out' / 'toy-train.tfrecord-*')))
  cfg = make_cfg(d, train_files=wide, val_files=wide)
  assert input_pipeline.count_examples(cfg, 'val') == len(LENGTHS)
  with caplog.at_level('WARNING'):
    batch = next(input_pipeline.make_eval_dataset(cfg, split='val', batch_size=len(LENGTHS),
                                                  process_index=0, process_count=1))
  assert sorted(k.decode() for k in batch['key']) == sorted(f'v{k}' for k in range(len(LENGTHS)))
  assert 'frame index' not in caplog.text and 'Skipping' not in caplog.text, caplog.text
  only_hidden = str(d / 'out' / '.toy-train*')
  with pytest.raises(errors.DataError, match=r'val_files: pattern .* matches no shard, only'):
    input_pipeline.list_files(only_hidden, 'val_files')
  with pytest.raises(errors.ConfigError, match='data.test_files is empty'):
    input_pipeline.split_files(make_cfg(d, test_files=''), 'test')


def test_a_folder_given_for_shards_is_named_and_a_subfolder_a_glob_matches_is_no_shard(dataset):
  d, _ = dataset
  out = d / 'out'
  for folder in (str(out), str(out) + '/'):
    with pytest.raises(errors.ConfigError, match=r"data.train_files: '.*out/?' is a folder; "
                       r"give a glob of its shards, such as '.*out/\*-of-\*'"):
      input_pipeline.list_files(folder, 'train_files')
  (out / 'toy-train.tfrecord-extra').mkdir()   # a folder a wide glob also matches
  try:
    shards = input_pipeline.list_files(str(out / 'toy-train.tfrecord-*'), 'train_files')
    assert shards == sorted(p for p in glob.glob(str(out / 'toy-train.tfrecord-*'))
                            if os.path.isfile(p)) and shards
    with pytest.raises(errors.DataError, match=r'matches no shard, only 1 folder'):
      input_pipeline.list_files(str(out / 'toy-train.tfrecord-ex*'), 'train_files')
  finally:
    (out / 'toy-train.tfrecord-extra').rmdir()


@pytest.mark.slow  # RandAugment builds 14 op branches per draw: ~30 s of tracing here
def test_ssv2_and_k400_large_recipes_run_and_stay_deterministic(dataset):
  d, _ = dataset
  cfg = make_cfg(d, sampling='uniform', flip_prob=0.0, randaugment_n=4, randaugment_m=7,
                 random_erasing_prob=0.25, color_jitter=0.1)
  a = next(input_pipeline.make_train_dataset(cfg, batch_size=4, seed=1, process_index=0,
                                             process_count=1))
  b = next(input_pipeline.make_train_dataset(cfg, batch_size=4, seed=1, process_index=0,
                                             process_count=1))
  assert a['video'].shape == (4, 8, 32, 32, 3) and np.isfinite(a['video']).all()
  np.testing.assert_array_equal(a['video'], b['video'])


def test_more_processes_than_shards_split_records(dataset):
  """4 processes, 3 shards: every process reads all shards and keeps every 4th record."""
  d, _ = dataset
  cfg = make_cfg(d, flip_prob=0.0)
  labels = []
  for pi in range(4):
    it = input_pipeline.make_train_dataset(cfg, batch_size=2, seed=0, process_index=pi,
                                           process_count=4)
    labels += next(it)['label'].tolist()  # 8 records / 4 processes = one epoch of 2 each
  assert sorted(labels) == sorted(k % 3 for k in range(len(LENGTHS)))


def test_shards_split_unevenly_over_processes_are_said_once(dataset, caplog):
  d, _ = dataset                    # 3 shards
  cfg = make_cfg(d, flip_prob=0.0)
  for pc, pi, said in ((2, 0, True), (2, 1, False), (3, 0, False), (4, 0, False)):
    caplog.clear()
    with caplog.at_level('WARNING'):
      input_pipeline.make_train_dataset(cfg, batch_size=1, seed=0, process_index=pi,
                                        process_count=pc)
    assert (('3 shards over 2 processes: 1 read 2 shards each, the other 1 read 1, so a video '
             'of the latter is trained on about 2.00x as often') in caplog.text) == said, \
        (pc, pi, caplog.text)


def test_synthetic_source_shapes():
  cfg = config_lib.default_data_config()
  cfg.source, cfg.num_classes, cfg.num_frames, cfg.image_size = 'synthetic', 5, 4, 16
  b = next(input_pipeline.make_train_dataset(cfg, batch_size=3, seed=0, process_index=0,
                                             process_count=1))
  assert b['video'].shape == (3, 4, 16, 16, 3) and b['label'].shape == (3,)
  cfg.test_clips, cfg.test_crops = 2, 3
  e = next(iter(input_pipeline.make_eval_dataset(cfg, split='test', batch_size=4,
                                                 process_index=0, process_count=1)))
  assert e['video'].shape == (4, 6, 4, 16, 16, 3) and len(e['key']) == 4


def test_synthetic_source_resumes_and_splits_between_processes():
  from data_pipelines import synthetic
  cfg = config_lib.default_data_config()
  cfg.source, cfg.num_classes, cfg.num_frames, cfg.image_size = 'synthetic', 5, 2, 8
  it = synthetic.make_train_dataset(cfg, batch_size=3, seed=4, process_index=0, process_count=1)
  batches = [next(it) for _ in range(3)]
  resumed = next(synthetic.make_train_dataset(cfg, batch_size=3, seed=4, process_index=0,
                                              process_count=1, start_step=2))
  np.testing.assert_array_equal(resumed['video'], batches[2]['video'])
  np.testing.assert_array_equal(resumed['label'], batches[2]['label'])
  other = next(synthetic.make_train_dataset(cfg, batch_size=3, seed=4, process_index=1,
                                            process_count=2))
  assert not np.array_equal(other['video'], batches[0]['video'])
  # Labels are learnable: the clip's mean is its label's shift.
  for b in batches:
    shift = b['label'] / 4 * 2 - 1
    np.testing.assert_allclose(b['video'].mean((1, 2, 3, 4)), shift, atol=0.05)
  # Evaluation: every video of the split once over the processes, the same video whichever
  # process reads it.
  keys, videos = [], {}
  for pi in range(3):
    for b in synthetic.make_eval_dataset(cfg, split='val', batch_size=5, process_index=pi,
                                         process_count=3):
      keys += list(b['key'])
      videos.update(zip(b['key'], b['video']))
  assert sorted(keys) == sorted(f'synthetic-{i}'.encode() for i in range(32))
  alone = {k: v for b in synthetic.make_eval_dataset(cfg, split='val', batch_size=32,
                                                     process_index=0, process_count=1)
           for k, v in zip(b['key'], b['video'])}
  for k, v in alone.items():
    np.testing.assert_array_equal(videos[k], v)


def test_autotune_off_gives_the_same_stream(dataset):
  """`data.autotune=False` (projects/moving_digits/config.py) changes only the threads, never
  the clips."""
  d, _ = dataset
  on = input_pipeline.make_train_dataset(make_cfg(d, autotune=True), batch_size=4, seed=5)
  off = input_pipeline.make_train_dataset(make_cfg(d, autotune=False), batch_size=4, seed=5)
  for _ in range(4):
    a, b = next(on), next(off)
    np.testing.assert_array_equal(a['video'], b['video'])
    np.testing.assert_array_equal(a['label'], b['label'])


def _jpeg_frames(n):
  return [tf.io.encode_jpeg(np.full((24, 32, 3), h.frame_value(i), np.uint8)).numpy()
          for i in range(n)]


def test_parser_returns_every_dmvr_context_field():
  """Records as DMVR's own generator writes them: every context field comes back."""
  label_map = {'space': 0, 'javeline_throw': 1}
  seq = h.dmvr_generator_record(
      _jpeg_frames(5), video_path='/tmp/BRKM_Javeline_Throw.webm', start=0.0, end=3.0,
      label_name='javeline_throw', caption='someone is throwing a javeline',
      label_map=label_map, audio=np.linspace(-1, 1, 480).tolist())
  ex = records.parse_sequence_example(seq.SerializeToString())
  assert ex['frames'].shape == (5,)
  assert int(ex['label']) == 1 and ex['labels'].numpy().tolist() == [1]
  assert int(ex['label_count']) == 1
  assert ex['label_text'].numpy().tolist() == [b'javeline_throw']
  assert ex['caption'].numpy().tolist() == [b'someone is throwing a javeline']
  assert ex['filename'].numpy() == b'/tmp/BRKM_Javeline_Throw.webm'
  assert (int(ex['start_us']), int(ex['end_us'])) == (0, 3_000_000)
  # no label, no caption and no frames, as the generator writes an unlabelled, empty clip
  bare = h.dmvr_generator_record([], video_path='/v/x.mp4', start=1.5, end=6.0)
  ex = records.parse_sequence_example(bare.SerializeToString())
  assert ex['frames'].shape == (0,) and int(ex['label']) == -1 and int(ex['label_count']) == 0
  assert ex['label_text'].shape == (0,) and ex['caption'].shape == (0,)
  assert (int(ex['start_us']), int(ex['end_us'])) == (1_500_000, 6_000_000)
  # the other spellings in use: clip/label/string, several captions and labels, video_id
  seq = tf.train.SequenceExample()
  seq.context.feature['clip/label/index'].int64_list.value[:] = [42, 7]
  seq.context.feature['clip/label/string'].bytes_list.value[:] = [b'label', b'other']
  seq.context.feature['caption/string'].bytes_list.value[:] = [b'hello world', b'again']
  seq.context.feature['video_id'].bytes_list.value[:] = [b'vid42']
  seq.feature_lists.feature_list['image/encoded'].feature.add().bytes_list.value[:] = \
      _jpeg_frames(1)
  ex = records.parse_sequence_example(seq.SerializeToString())
  assert int(ex['label']) == 42 and ex['labels'].numpy().tolist() == [42, 7]
  assert ex['label_text'].numpy().tolist() == [b'label', b'other']
  assert ex['caption'].numpy().tolist() == [b'hello world', b'again']
  assert ex['filename'].numpy() == b'vid42'
  assert (int(ex['start_us']), int(ex['end_us'])) == (-1, -1)
  # our writer stores the same fields under the same keys
  ours = records.make_sequence_example(_jpeg_frames(2), 3, 'abseiling', 'k1', 2_000_000,
                                       12_000_000)
  ex = records.parse_sequence_example(ours.SerializeToString())
  assert ex['label_text'].numpy().tolist() == [b'abseiling']
  assert (ex['filename'].numpy(), int(ex['start_us']), int(ex['end_us'])) == (
      b'k1', 2_000_000, 12_000_000)


def test_dmvr_generator_records_read_by_pipeline(tmp_path):
  """Shards as DMVR's generator writes them (one with an empty clip) evaluate here, keyed by
  the video path; the empty clip is named, not a parse failure."""
  label_map = {'a': 0, 'b': 1}
  path = tmp_path / 'gen-00000-of-00001'
  with tf.io.TFRecordWriter(str(path)) as w:
    for k in range(3):
      w.write(h.dmvr_generator_record(
          _jpeg_frames(6 + k), video_path=f'/videos/v{k}.mp4', start=0.0, end=1.0,
          label_name='ab'[k % 2], caption=f'clip {k}', label_map=label_map).SerializeToString())
    w.write(h.dmvr_generator_record([], video_path='/videos/empty.mp4', start=0.0,
                                    end=1.0).SerializeToString())
  cfg = config_lib.default_data_config()
  cfg.test_files = str(path)
  cfg.num_classes, cfg.num_frames, cfg.frame_interval = 2, 4, 1
  cfg.image_size, cfg.test_short_side, cfg.test_clips, cfg.test_crops = 16, 16, 1, 1
  it = input_pipeline.make_eval_dataset(cfg, split='test', batch_size=4, process_index=0,
                                        process_count=1)
  got = {k.decode(): int(y) for b in it for k, y in zip(b['key'], b['label'])}
  assert got == {f'/videos/v{k}.mp4': k % 2 for k in range(3)}
  assert [(k, r) for _, k, r in it.stats.named] == [('/videos/empty.mp4', 'record has no frames')]
  assert it.stats.decode_errors == 0


def _ten_crop_reference(frames, size):
  """mmaction2 TenCrop on (T, H, W, C): corners and centre with step (side - size)//4 per
  axis, each crop followed by its horizontal flip."""
  _, hgt, wid, _ = frames.shape
  ws, hs = (wid - size) // 4, (hgt - size) // 4
  out = []
  for x, y in ((0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs)):
    crop = frames[:, y:y + size, x:x + size]
    out += [crop, crop[:, :, ::-1]]
  return np.stack(out)


def test_ten_crop_matches_mmaction_layout():
  frames = np.random.RandomState(0).randint(0, 255, (3, 41, 57, 3)).astype(np.float32)
  for size in (32, 41):
    got = input_pipeline.ten_crop(tf.constant(frames), size).numpy()
    np.testing.assert_array_equal(got, _ten_crop_reference(frames, size))


def test_view_settings_checked_with_one_line_error_naming_the_field(dataset):
  d, _ = dataset
  for field, value in (('test_crops', 2), ('val_crops', 5), ('test_clips', 0)):
    cfg = make_cfg(d, **{field: value})
    split = field.split('_')[0]
    with pytest.raises(ValueError, match=rf'^data\.{field}={value} ') as err:
      input_pipeline.make_eval_dataset(cfg, split=split, batch_size=2, process_index=0,
                                       process_count=1)
    assert '\n' not in str(err.value)
    with pytest.raises(ValueError, match=rf'^data\.{field}={value} '):  # before training starts
      input_pipeline.make_train_dataset(cfg, batch_size=2, seed=0, process_index=0,
                                        process_count=1)
  cfg = make_cfg(d, test_crops=2)
  with pytest.raises(ValueError, match=r'^data\.test_crops=2 '):
    video_io.load_video_clip(str(d / 'vids' / 'v0.mp4'), cfg)


def test_eval_ten_crops(dataset):
  d, _ = dataset
  cfg = make_cfg(d, test_clips=2, test_crops=10)
  b = next(iter(input_pipeline.make_eval_dataset(cfg, split='test', batch_size=3,
                                                 process_index=0, process_count=1)))
  assert b['video'].shape == (3, 20, 8, 32, 32, 3)
  v = b['video'][0].reshape(10, 2, 8, 32, 32, 3)  # crop-major, then clip
  np.testing.assert_array_equal(v[1], v[0][..., ::-1, :])  # each crop, then its flip
  assert not np.array_equal(v[0], v[2])  # upper left vs upper right of a 32x48 frame
