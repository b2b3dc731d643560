r"""Input-pipeline throughput: clips per second per CPU core, by stage.

  python -m benchmarks.pipeline_benchmark [--seconds 15] [--cores 1,all] [--out BENCH.json]

Writes synthetic DMVR records (256x340 JPEG frames at quality 90, ~25 KB each, like
`prepare` output at short side 256), then times, each in a fresh process pinned to N cores:

Rates are reported per wall-clock second and per CPU-second of the process (the per-core
cost, robust to other load on a shared machine).

  parse      read + parse + sample indices (no decoding)
  decode     + decode the sampled JPEGs (crop window only)
  train      full training clip: + resize 224, flip, normalise, batch (recipe default)
  train_ra   + RandAugment(4, 7) + random erasing 0.25 (SSv2 recipe: imgaug's RandAugment
             with its flip and crop, uniform sampling)
  eval       test views: 3 clips x 1 crop at short side 224 (K400 recipe); rates are
             videos (3 views each): whole epochs of 144 videos, each pipeline's
             construction and first batch (its start) left out
  eval_3crop test views: 1 clip x 3 crops (SSv2 / Diving-48 recipe), videos per second
  eval_224, eval_3crop_224
             the same on a test split prepared at the test short side (`prepare
             --short_side 224`): 224x298 frames, no resize left to do
  train_long `train` on 300-frame records (10 s at 30 fps): the cost of long videos
  STAGE_whole  any stage with `data.frame_index='off'`: whole records read and parsed
             instead of only the sampled frames through the frame index (the records
             carry one, as `prepare` writes them)
for 8x224 and 16x224 clips, and a bare `tf.io.decode_jpeg` of 224x224 frames as the bound.
Each row also gives the cores needed for 500 clips/s (500 / clips per CPU-second); the eval
rows count videos (the JSON keeps the `clips_*` keys for both).
"""

import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_float('seconds', 15.0, 'Timed seconds per measurement (after warm-up).')
  flags.DEFINE_string('cores', '1,all', 'Comma-separated core counts ("all" = every core).')
  flags.DEFINE_string('frames', '8,16', 'Clip lengths.')
  flags.DEFINE_string('stages', 'parse,decode,train,train_ra,eval,eval_3crop,eval_224,'
                      'eval_3crop_224,train_long,jpeg_bound', 'Stages.')
  flags.DEFINE_string('records', '', 'Directory for the synthetic records (default: temp).')
  flags.DEFINE_string('out', '', 'Write results as JSON here.')
  flags.DEFINE_string('worker', '', 'Internal: run one measurement "stage:frames:cores:dir".')


def _base_stage(stage: str) -> tuple:
  """'STAGE_whole' -> ('STAGE', 'off'); 'STAGE' -> ('STAGE', 'auto'): the stage and the
  `data.frame_index` it runs with."""
  return (stage[:-len('_whole')], 'off') if stage.endswith('_whole') else (stage, 'auto')


def write_records(out_dir: str, num_videos: int = 48, num_frames: int = 64,
                  name: str = 'bench', short_side: int = 256) -> str:
  """Synthetic records as `prepare --short_side S` writes them: the 256x340 frames below,
  resized to short side S (bilinear, as prepare's resize) when S is not 256, with the frame
  index beside each shard."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from data_pipelines import frame_index  # pylint: disable=g-import-not-at-top
  from data_pipelines import records  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  pattern = os.path.join(out_dir, f'{name}-train.tfrecord-*')
  if len(tf.io.gfile.glob(pattern)) == 4:
    for path in tf.io.gfile.glob(pattern):
      if frame_index.valid_index(path, os.path.getsize(path)) is None:
        frame_index.build(path)
    return pattern
  rng = np.random.RandomState(0)
  for shard in range(4):
    path = os.path.join(out_dir, records.shard_name(name, 'train', shard, 4))
    with tf.io.TFRecordWriter(path) as w:
      for v in range(num_videos // 4):
        # smooth texture plus fine noise, drifting over time: JPEG sizes like real video
        base = tf.image.resize(rng.uniform(0, 255, (1, 16, 22, 3)).astype('float32'), [256, 404])
        jpegs = []
        for t in range(num_frames):
          img = base[0, :, t % 64:t % 64 + 340] + rng.normal(0, 6, (256, 340, 3))
          if short_side != 256:
            img = tf.image.resize(img, [short_side, round(340 * short_side / 256)])
          img = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)
          jpegs.append(tf.io.encode_jpeg(img, quality=90).numpy())
        w.write(records.make_sequence_example(jpegs, v % 10, filename=f'v{shard}_{v}')
                .SerializeToString())
    frame_index.build(path)
  return pattern


class _EvalEpochs:
  """A finite (evaluation) pipeline, built anew for each timed epoch."""

  def __init__(self, build):
    self.build = build


def _stage_dataset(stage: str, frames: int, pattern: str):
  """An iterator of the given stage (batch 8) and the clips per element it yields."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from data_pipelines import config as config_lib  # pylint: disable=g-import-not-at-top
  from data_pipelines import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  from data_pipelines import ops  # pylint: disable=g-import-not-at-top
  from data_pipelines import sampling  # pylint: disable=g-import-not-at-top
  cfg = config_lib.default_data_config()
  cfg.train_files = cfg.test_files = pattern
  cfg.num_classes, cfg.num_frames, cfg.frame_interval = 10, frames, 4
  cfg.shuffle_buffer, cfg.prefetch = 64, 4
  stage, cfg.frame_index = _base_stage(stage)
  if stage == 'train_long':
    cfg.train_files = pattern.replace('bench-train', 'benchlong-train')
  if stage in ('train', 'train_long'):
    return ip.make_train_dataset(cfg, batch_size=8, seed=0, process_index=0, process_count=1), 8
  if stage == 'train_ra':
    cfg.sampling, cfg.flip_prob = 'uniform', 0.0
    cfg.randaugment_n, cfg.randaugment_m, cfg.random_erasing_prob = 4, 7, 0.25
    return ip.make_train_dataset(cfg, batch_size=8, seed=0, process_index=0, process_count=1), 8
  if stage in ('eval', 'eval_3crop', 'eval_224', 'eval_3crop_224'):
    # test splits of 144 videos, so that the pipeline's start, left out of the rates, comes
    # once every 18 batches; `_224`: prepared at the test short side (224), not at 256
    cfg.test_files = pattern.replace(
        'bench-train', 'bench224test-train' if stage.endswith('_224') else 'benchtest-train')
    cfg.test_clips, cfg.test_crops = (1, 3) if stage.startswith('eval_3crop') else (3, 1)
    return _EvalEpochs(lambda: ip.make_eval_dataset(
        cfg, split='test', batch_size=8, process_index=0, process_count=1)), 8
  files = ip.list_files(pattern)
  ds = tf.data.Dataset.from_tensor_slices(files).repeat().interleave(
      tf.data.TFRecordDataset, cycle_length=4, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(ip.records.parse_sequence_example, num_parallel_calls=tf.data.AUTOTUNE)

  def sample(ex):
    idx = sampling.dense_train_indices(tf.shape(ex['frames'])[0], frames, 4, tf.constant([0, 1]))
    return tf.gather(ex['frames'], idx)
  ds = ds.map(sample, num_parallel_calls=tf.data.AUTOTUNE)
  if stage == 'decode':
    ds = ds.map(lambda enc: ops.decode_crop_resize(
        enc, short_side=256, size=224, seed=tf.constant([1, 2]), area_range=(0.08, 1.0),
        aspect_ratio_range=(0.75, 4 / 3)), num_parallel_calls=tf.data.AUTOTUNE)
  elif stage == 'jpeg_bound':
    # the same frame T times: a 224x224 q90 JPEG of the same texture, decoded whole
    img = tf.image.resize(tf.random.stateless_uniform([1, 16, 16, 3], [0, 0], 0, 255), [224, 224])
    img = img[0] + tf.random.stateless_normal([224, 224, 3], [0, 1], stddev=6.0)
    enc = tf.io.encode_jpeg(tf.cast(tf.clip_by_value(img, 0, 255), tf.uint8), quality=90)
    ds = tf.data.Dataset.from_tensors(tf.fill([frames], enc)).repeat().map(
        ops.decode_frames, num_parallel_calls=tf.data.AUTOTUNE)
  elif stage != 'parse':
    raise ValueError(f'unknown stage {stage!r}')
  return ds.batch(8).prefetch(4).as_numpy_iterator(), 8


def _eval_epochs(it: _EvalEpochs, seconds: float) -> tuple:
  """Whole evaluation epochs: each pipeline is built and its first batch taken untimed (its
  start), then the rest of the epoch is timed; epochs repeat until `seconds` are timed (at
  least one). -> (videos, wall s, CPU s)."""
  n, dt, cpu = 0, 0.0, 0.0
  while True:
    epoch = iter(it.build())
    next(epoch)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for batch in epoch:
      n += len(batch['label'])
    dt, cpu = dt + time.perf_counter() - t0, cpu + _cpu_seconds() - c0
    if dt >= seconds:
      return n, dt, cpu


def _worker(spec: str) -> dict:
  stage, frames, cores, pattern = spec.split(':', 3)
  frames, cores = int(frames), int(cores)
  os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
  it, per = _stage_dataset(stage, frames, pattern)
  if isinstance(it, _EvalEpochs):
    n, dt, cpu = _eval_epochs(it, FLAGS.seconds)
    return _rates(stage, frames, cores, n, dt, cpu)
  # Warm-up: at least 3 batches and 3 seconds, so that one-time work (tf.data's first
  # fills, RandAugment's XLA compilations, each made when its first op is drawn) is not timed.
  t0 = time.perf_counter()
  for i in itertools.count():
    if i >= 3 and time.perf_counter() - t0 >= 3.0:
      break
    next(it)
  n, t0, c0 = 0, time.perf_counter(), _cpu_seconds()
  while time.perf_counter() - t0 < FLAGS.seconds:
    batch = next(it)
    n += len(batch['label']) if isinstance(batch, dict) else per
  dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
  return _rates(stage, frames, cores, n, dt, cpu)


def _rates(stage, frames, cores, n, dt, cpu) -> dict:
  # clips per CPU-second is the per-core cost even on a shared machine, where wall-clock
  # rates also measure the other processes' load.
  return {'stage': stage, 'frames': frames, 'cores': cores, 'clips_per_s': n / dt,
          'clips_per_s_per_core': n / dt / cores, 'clips_per_cpu_s': n / cpu,
          'cores_per_500_clips_s': 500.0 / (n / cpu), 'cpu_utilisation': cpu / dt / cores}


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def main(argv):
  del argv
  if FLAGS.worker:
    print('RESULT ' + json.dumps(_worker(FLAGS.worker)), flush=True)
    return
  out_dir = FLAGS.records or os.path.join(tempfile.gettempdir(), 'aim_data_bench')
  pattern = write_records(out_dir)
  stages = [_base_stage(s)[0] for s in FLAGS.stages.split(',')]
  if 'train_long' in stages:
    write_records(out_dir, num_videos=8, num_frames=300, name='benchlong')
  if any(s.startswith('eval') and not s.endswith('_224') for s in stages):
    write_records(out_dir, num_videos=144, name='benchtest')
  if any(s.endswith('_224') for s in stages):
    write_records(out_dir, num_videos=144, name='bench224test', short_side=224)
  all_cores = len(os.sched_getaffinity(0))
  cores = sorted({all_cores if c == 'all' else int(c) for c in FLAGS.cores.split(',')})
  results = []
  for frames in [int(f) for f in FLAGS.frames.split(',')]:
    for stage in FLAGS.stages.split(','):
      for c in cores:
        cmd = [sys.executable, '-m', 'benchmarks.pipeline_benchmark', f'--seconds={FLAGS.seconds}',
               f'--worker={stage}:{frames}:{c}:{pattern}']
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        line = [s for s in res.stdout.splitlines() if s.startswith('RESULT ')]
        if not line:
          print(f'{stage} {frames}f {c} cores FAILED:\n{res.stderr[-2000:]}', file=sys.stderr)
          continue
        r = json.loads(line[0][7:])
        results.append(r)
        u = 'videos' if stage.startswith('eval') else 'clips'   # eval: videos of all views
        print(f"{stage:10s} {frames:2d}x224  cores={c:2d}  {r['clips_per_s']:8.1f} {u}/s  "
              f"{r['clips_per_s_per_core']:8.1f} {u}/s/core  {r['clips_per_cpu_s']:8.1f} "
              f"{u}/CPU-s  {r['cores_per_500_clips_s']:5.1f} cores/500 {u}/s  "
              f"(cpu use {r['cpu_utilisation']:.0%})", flush=True)
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump({'cpu_cores': all_cores, 'results': results}, f, indent=1)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
