"""Second round of mutation testing (input pipeline, annotations, RandAugment, predict): each
test pins documented behaviour (docs/data.md, docs/data_pipeline.md, imgaug semantics, the
doc strings) that a plausible refactoring mistake could change without another test failing.
Expectations come from arithmetic or the documented rule, not from the code's own output."""

import json

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

from aim_jax import predict  # noqa: E402
from data_pipelines import annotations  # noqa: E402
from data_pipelines import config as config_lib  # noqa: E402
from data_pipelines import input_pipeline  # noqa: E402
from data_pipelines import randaugment as ra  # noqa: E402
from data_pipelines import records  # noqa: E402


def _jpegs(n, value=100):
  frame = np.full((24, 32, 3), value, np.uint8)
  return [tf.io.encode_jpeg(frame).numpy() for _ in range(n)]


def _write_shard(path, examples):
  with tf.io.TFRecordWriter(str(path)) as w:
    for ex in examples:
      w.write(ex.SerializeToString())
  return str(path)


def _labelled_shards(tmp_path, num_shards, per_shard):
  """Shards of tiny records whose label is the record's global number (distinct labels)."""
  jpegs, n = _jpegs(4), 0
  for s in range(num_shards):
    exs = []
    for _ in range(per_shard):
      exs.append(records.make_sequence_example(jpegs, n, filename=f'v{n}'))
      n += 1
    _write_shard(tmp_path / f'toy-train.tfrecord-{s:05d}-of-{num_shards:05d}', exs)
  return str(tmp_path / 'toy-train.tfrecord-*'), n


def _cfg(pattern, num_classes, **kw):
  cfg = config_lib.default_data_config()
  cfg.train_files = cfg.val_files = cfg.test_files = pattern
  cfg.num_classes, cfg.num_frames, cfg.frame_interval = num_classes, 2, 1
  cfg.image_size, cfg.train_short_side, cfg.test_short_side = 16, 24, 16
  cfg.test_clips, cfg.test_crops = 1, 1
  cfg.flip_prob = 0.0
  cfg.skip_rate_min_examples = 10_000
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


# ----- input pipeline ---------------------------------------------------------------------

def test_train_fraction_keeps_the_documented_subset_in_every_training_epoch(tmp_path):
  """docs/data.md: a record is kept when the hash bucket of SHARD:POSITION falls below the
  fraction; the training stream (not only count_examples) holds exactly those, each epoch."""
  pattern, n = _labelled_shards(tmp_path, 2, 12)
  cfg = _cfg(pattern, n, train_fraction=0.5, shuffle_buffer=32)
  want = set()
  for s in range(2):
    for k in range(12):
      ident = f'toy-train.tfrecord-{s:05d}-of-00002:{k}'
      if int(tf.strings.to_hash_bucket_fast(ident, 1_000_000)) < 500_000:
        want.add(s * 12 + k)
  assert 0 < len(want) < n
  assert input_pipeline.count_examples(cfg, 'train') == len(want)
  it = input_pipeline.make_train_dataset(cfg, batch_size=len(want), seed=0, process_index=0,
                                         process_count=1)
  for _ in range(2):
    assert set(next(it)['label'].tolist()) == want


def test_each_epoch_reshuffles_the_records_of_a_single_shard(tmp_path):
  """One shard (no file order to shuffle): the record shuffle itself must change per epoch."""
  pattern, n = _labelled_shards(tmp_path, 1, 12)
  cfg = _cfg(pattern, n, shuffle_buffer=12)
  it = input_pipeline.make_train_dataset(cfg, batch_size=n, seed=0, process_index=0,
                                         process_count=1)
  epochs = [next(it)['label'].tolist() for _ in range(3)]
  for e in epochs:
    assert sorted(e) == list(range(n))
  assert len({tuple(e) for e in epochs}) == 3


def test_resume_with_more_processes_than_shards_continues_each_process_stream(tmp_path):
  """1 shard, 3 processes: process 0 keeps records 0, 3, 6 of 8 (3 per epoch, not 8 // 3);
  `start_step` must continue its uninterrupted stream (module docstring: determinism)."""
  pattern, n = _labelled_shards(tmp_path, 1, 8)
  cfg = _cfg(pattern, n, shuffle_buffer=1)
  full = input_pipeline.make_train_dataset(cfg, batch_size=1, seed=0, process_index=0,
                                           process_count=3)
  stream = [int(next(full)['label'][0]) for _ in range(7)]
  assert sorted(stream[:3]) == [0, 3, 6]
  for start in (2, 4):
    resumed = input_pipeline.make_train_dataset(cfg, batch_size=1, seed=0, process_index=0,
                                                process_count=3, start_step=start)
    assert [int(next(resumed)['label'][0]) for _ in range(7 - start)] == stream[start:]


def test_eval_counts_a_decode_error_at_the_end_of_a_process_share(tmp_path):
  """7 records over 3 processes: process 0 holds 0, 3, 6 (three, not 7 // 3); the last one
  fails to decode and is counted, though no later clip reveals its gap."""
  jpegs = _jpegs(4)
  exs = [records.make_sequence_example(jpegs, k % 2, filename=f'good{k}') for k in range(6)]
  exs.append(records.make_sequence_example([j[:len(j) // 2] for j in jpegs], 1,
                                           filename='truncated'))
  path = _write_shard(tmp_path / 'bad-test.tfrecord-00000-of-00001', exs)
  cfg = _cfg(path, 2)
  keys, errors_seen = [], 0
  for pi in range(3):
    it = input_pipeline.make_eval_dataset(cfg, split='test', batch_size=2, process_index=pi,
                                          process_count=3)
    keys += [k.decode() for b in it for k in b['key']]
    errors_seen += it.stats.decode_errors
  assert sorted(keys) == [f'good{k}' for k in range(6)]
  assert errors_seen == 1


def test_more_processes_than_shards_partition_the_records(tmp_path):
  """input_pipeline.make_train_dataset: 'fewer shards than processes: every process reads
  all, keeps every pc-th record' -- of one stream, so that together each epoch of the
  processes is every record once (each process once drew its own shard order: overlaps)."""
  pattern, n = _labelled_shards(tmp_path, 3, 2)   # 6 records, 3 shards, 4 processes
  cfg = _cfg(pattern, n, shuffle_buffer=1)
  epochs = [[], [], []]
  for pi in range(4):
    it = input_pipeline.make_train_dataset(cfg, batch_size=len(range(pi, n, 4)), seed=0,
                                           process_index=pi, process_count=4)
    for labels in epochs:
      labels += next(it)['label'].tolist()   # one epoch of this process
  for labels in epochs:
    assert sorted(labels) == list(range(n))


# ----- annotations --------------------------------------------------------------------------

def test_kinetics_classes_are_the_sorted_names_whatever_the_row_order(tmp_path):
  """Without --labels the indices are the sorted class names: train and val CSVs, whose rows
  come in different orders, get the same mapping."""
  csv = tmp_path / 'train.csv'
  csv.write_text('label,youtube_id,time_start,time_end,split\n'
                 'zumba,aaa,0,10,train\nabseiling,bbb,0,10,train\nmarching,ccc,0,10,train\n')
  entries = annotations.read('kinetics', str(csv), str(tmp_path))
  assert [(e.label_text, e.label) for e in entries] == [('zumba', 2), ('abseiling', 0),
                                                        ('marching', 1)]


def test_a_json_class_dict_orders_names_by_their_integer_index(tmp_path):
  """read_class_names: a {name: index} dict (SSv2 labels.json, indices as strings) gives the
  names in index order, numerically ('10' after '2')."""
  path = tmp_path / 'labels.json'
  path.write_text(json.dumps({'b': '0', 'a': '1', 'c': '10', 'd': '2'}))
  names = annotations.read_class_names(str(path))
  assert names[:3] == ['b', 'a', 'd'] and names[-1] == 'c'
  list_file = tmp_path / 'l.txt'
  list_file.write_text('x.mp4 a\ny.mp4 d\n')
  entries = annotations.read('list', str(list_file), str(tmp_path), labels=str(path))
  assert [e.label for e in entries] == [1, 2]


# ----- RandAugment --------------------------------------------------------------------------

def test_randaugment_signs_are_drawn_both_ways_with_probability_half():
  """docs/data_pipeline.md: 'Ops with a sign draw it per op (p 0.5)' (imgaug's random sign)."""
  signs = np.concatenate([ra.draw(tf.constant([s, 5]), 4, 7)[3].numpy() for s in range(200)])
  assert set(signs.tolist()) == {-1.0, 1.0}
  assert 0.4 < np.mean(signs < 0) < 0.6


# ----- predict ------------------------------------------------------------------------------

class _MeanPredictor:
  """Stands in for predict.Predictor: one logit per clip, its mean value (and its negation)."""

  def clip_shape(self, layout):
    return (2, 4, 4, 3) if layout == 'NTHWC' else (3, 2, 4, 4)

  def logits(self, clips, batch_size=8):
    m = clips.reshape(len(clips), -1).mean(axis=1)
    return np.stack([m, -m], axis=1)


def test_predict_array_keeps_each_videos_views_together():
  """A 6-D (N, V, ...) array -> (N, V, K) logits: [n, v] is the logit of video n's view v."""
  n, v = 2, 3
  value = np.arange(n * v, dtype=np.float32).reshape(n, v)   # clip [i, j] is all value[i, j]
  array = np.broadcast_to(value[:, :, None, None, None, None], (n, v, 2, 4, 4, 3))
  out = predict.predict_array(_MeanPredictor(), np.array(array), 'NTHWC')
  assert out.shape == (n, v, 2)
  np.testing.assert_allclose(out[..., 0], value)


# ----- training loop: step counts and cadence ----------------------------------------------

def _tiny_config(**kw):
  from configs import tiny
  c = tiny.get_config()
  c.unlock()
  c.progress_bar = False
  for k, v in kw.items():
    target, name = c, k.split('.')
    for part in name[:-1]:
      target = target[part]
    target[name[-1]] = v
  return c


def test_steps_per_epoch_drops_the_last_partial_batch():
  """configs/common.py: steps_per_epoch 0 = num_train_examples (or counted) // batch_size
  (training batches drop their remainder)."""
  from aim_jax import train

  class Data:
    @staticmethod
    def count_examples(cfg, split):
      return 165

  c = _tiny_config(steps_per_epoch=0, batch_size=8)
  assert train.steps_per_epoch(c, Data) == 20


def test_plan_evaluates_every_five_epochs_by_default_and_counts_epochs_to_steps():
  """eval_every_steps 0: every 5 epochs (the official recipe); total_steps 0: total_epochs *
  steps_per_epoch."""
  from aim_jax import train
  plan = train.Plan(_tiny_config(eval_every_steps=0, total_steps=0, total_epochs=2.5))
  assert plan.steps_per_epoch == 20
  assert plan.eval_every == 100 and plan.total_steps == 50


def test_the_last_step_is_saved_and_evaluated_off_the_cadence(tmp_path):
  """A run whose length is not a multiple of checkpoint.every_steps / eval_every_steps still
  saves and evaluates its last step (else the final steps' work is lost)."""
  import os

  from aim_jax import train
  c = _tiny_config(total_steps=3, **{'checkpoint.every_steps': 2, 'checkpoint.async_save': False,
                                     'eval_every_steps': 2, 'log_every_steps': 2})
  outcome = train.train_and_evaluate(c, str(tmp_path / 'wd'))
  saved = os.listdir(tmp_path / 'wd' / 'checkpoints')
  assert sorted(int(p) for p in saved if p.isdigit()) == [2, 3]
  assert 'val_top1' in outcome
