"""TFDS video data sets read through the same sampling and views (offline, mock_data)."""

import pytest

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')

from data_pipelines import config as config_lib  # noqa: E402
from data_pipelines import input_pipeline  # noqa: E402


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
