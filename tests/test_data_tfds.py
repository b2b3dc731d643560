"""TFDS video data sets read through the same sampling and views (offline, mock_data)."""

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')

from data_pipelines import config as config_lib  # noqa: E402
from data_pipelines import input_pipeline  # noqa: E402
from data_pipelines import tfds_source  # noqa: E402


def _cfg():
  cfg = config_lib.default_data_config()
  cfg.source, cfg.tfds_name, cfg.num_classes = 'tfds', 'ucf101', 101
  cfg.num_frames, cfg.frame_interval, cfg.image_size = 4, 2, 32
  cfg.train_short_side, cfg.test_short_side, cfg.shuffle_buffer = 64, 32, 4
  cfg.test_clips, cfg.test_crops = 2, 3
  return cfg


@pytest.mark.slow  # mock ucf101 frames are 256x256 JPEGs made on the fly: ~60 s here
def test_ucf101_mock_train_and_eval():
  cfg = _cfg()
  with tfds.testing.mock_data(num_examples=5):
    assert input_pipeline.count_examples(cfg, 'train') == 5
    it = input_pipeline.make_train_dataset(cfg, batch_size=3, seed=0, process_index=0,
                                           process_count=1)
    b = next(it)
    assert b['video'].shape == (3, 4, 32, 32, 3) and b['label'].shape == (3,)
    assert ((b['label'] >= 0) & (b['label'] < 101)).all()
    again = next(input_pipeline.make_train_dataset(cfg, batch_size=3, seed=0, process_index=0,
                                                   process_count=1))
    assert (again['video'] == b['video']).all()
    keys = []
    for pi in range(2):
      for e in input_pipeline.make_eval_dataset(cfg, split='test', batch_size=2, process_index=pi,
                                                process_count=2):
        assert e['video'].shape[1:] == (6, 4, 32, 32, 3)
        keys += [k.decode() for k in e['key']]
    assert sorted(keys) == sorted(f'ucf101:test:{i}' for i in range(5))


class TinyVideos(tfds.core.GeneratorBasedBuilder):
  """A TFDS video data set built offline in a second: 40 train, 6 test videos of 16x16."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'video': tfds.features.Video(shape=(None, 16, 16, 3), encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(num_classes=4),
        'video_id': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(40), 'test': self._generate_examples(6)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'video': np.full((4 + i % 3, 16, 16, 3), 5 * i, np.uint8), 'label': i % 4,
                'video_id': f'vid{i}'}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  TinyVideos(data_dir=data_dir).download_and_prepare()
  cfg = config_lib.default_data_config()
  cfg.source, cfg.tfds_name, cfg.tfds_data_dir, cfg.num_classes = 'tfds', 'tiny_videos', data_dir, 4
  cfg.num_frames, cfg.frame_interval, cfg.image_size = 2, 1, 16
  cfg.train_short_side = cfg.test_short_side = 16
  cfg.shuffle_buffer, cfg.flip_prob, cfg.area_range = 1, 0.0, (1.0, 1.0)
  return cfg


def test_train_fraction_keeps_a_counted_deterministic_subset(tiny):
  cfg = tiny
  assert input_pipeline.count_examples(cfg, 'train') == 40
  cfg.train_fraction = 0.5
  n = input_pipeline.count_examples(cfg, 'train')
  assert 10 < n < 30  # about half of 40
  # the same hash rule as the TFRecord source, on (tfds_name:split, position)
  positions = [i for i in range(40) if int(input_pipeline._keep_mask(
      tf.constant('tiny_videos:train'), tf.constant(i, tf.int64), 0.5))]
  assert len(positions) == n
  # one epoch of training sees exactly the kept videos, split over processes
  seen = []
  for pi in range(2):
    _, per_epoch = tfds_source.train_epochs(cfg, pi, 2, None)
    it = input_pipeline.make_train_dataset(cfg, batch_size=1, seed=0, process_index=pi,
                                           process_count=2)
    seen += [int(round(next(it)['video'][0, 0, 0, 0, 0] * config_lib.CLIP_STD[0]
                       + config_lib.CLIP_MEAN[0]) // 5) for _ in range(per_epoch)]
  ids = [int(ex['video_id'].decode()[3:]) for ex in tfds.as_numpy(
      tfds.builder('tiny_videos', data_dir=cfg.tfds_data_dir).as_dataset(
          split='train', shuffle_files=False))]
  assert sorted(seen) == sorted(ids[p] for p in positions)
  # evaluation ignores it
  assert input_pipeline.count_examples(cfg, 'test') == 6
