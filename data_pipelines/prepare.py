r"""Raw videos -> DMVR-layout TFRecord shards (JPEG frames), in parallel, resumable.

  python -m data_pipelines.prepare --videos DIR --annotations FILE --out DIR --split train \
      [--format auto|kinetics|ssv2|diving48|list] [--labels FILE] [--name NAME] \
      [--short_side 256] [--fps 0] [--min_frames 1] [--warn_frames 8] [--num_shards 0] \
      [--jpeg_quality 90] [--num_workers N]

Each video is decoded with PyAV, resized to the short side, optionally resampled to `--fps` (0
keeps every frame), JPEG-encoded and written as one SequenceExample (records.py). Videos are
spread over `NAME-SPLIT.tfrecord-XXXXX-of-YYYYY` shards by a seeded shuffle; each shard is
written by one worker to a temporary file, renamed when complete, and described by a hidden
JSON file beside it (`.SHARD.json`; the reader skips hidden and JSON files that a shard glob
matches, and the frame index `.SHARD.frames`). A re-run skips shards whose
JSON says they are complete for the same videos, so an interrupted preparation resumes.
`NAME-SPLIT.report.json` lists videos written, frames, bytes, every failure with its reason
(videos not written, among them those with fewer than `--min_frames` frames) and every warning
(videos written that decoded to fewer frames than their container states, i.e. truncated or
damaged files, or to fewer than `--warn_frames`); readers take record counts from it.

A run into an --out that already holds shards of the same NAME-SPLIT with another shard count
(another --num_shards, or another number of videos under the default) stops before writing
anything: a glob would read those shards beside the new ones, every video twice. Nothing of
the user's is deleted; out-of-range flags and an --out that is a file stop likewise (one line,
exit status 2).
"""

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging

from aim_jax import errors
from data_pipelines import annotations as annotations_lib
from data_pipelines import frame_index
from data_pipelines import records
from data_pipelines import video_io


@dataclasses.dataclass
class Options:
  short_side: int = 256
  fps: float = 0.0
  jpeg_quality: int = 90
  min_frames: int = 1   # videos with fewer frames are not written (a failure in the report)
  warn_frames: int = 8  # videos written with fewer frames are listed among the warnings


# Options that change only the report, not the shards: left out of the resume fingerprint.
_REPORT_ONLY = ('warn_frames',)


def encode_jpeg(frame, quality: int) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(frame).save(buf, format='JPEG', quality=quality)
  return buf.getvalue()


def video_frames(entry: annotations_lib.Entry, opts: Options,
                 report: Optional[video_io.DecodeReport] = None) -> List[bytes]:
  """JPEG frames of one entry; raises ValueError/OSError/av errors with the reason.

  `report` (filled) compares the frames decoded with those the container states.
  """
  if entry.error:
    raise ValueError(entry.error)
  if not entry.path:
    raise FileNotFoundError(f'video file {entry.wanted} does not exist' if entry.wanted else
                            f'no video file named {entry.key}.* under the videos folder')
  report = video_io.DecodeReport() if report is None else report
  frames = [encode_jpeg(f, opts.jpeg_quality)
            for f in video_io.decode_video(entry.path, short_side=opts.short_side, fps=opts.fps,
                                           start_s=entry.start_s, end_s=entry.end_s,
                                           report=report)]
  if len(frames) < opts.min_frames:
    short = report.shortfall()
    raise ValueError(f'{len(frames)} frames decoded, fewer than --min_frames={opts.min_frames}'
                     + (f' ({short})' if short else ''))
  return frames


def _warning(frames: int, report: video_io.DecodeReport, opts: Options) -> str:
  """Why a written video deserves a look ('' when it does not)."""
  notes = [report.shortfall()] if report.shortfall() else []
  if frames < opts.warn_frames:
    notes.append(f'only {frames} frame(s) written, fewer than --warn_frames={opts.warn_frames} '
                 '(its clips repeat frames)')
  return '; '.join(notes)


def _fingerprint(entries: Sequence[annotations_lib.Entry], opts: Options) -> str:
  shards_opts = {k: v for k, v in dataclasses.asdict(opts).items() if k not in _REPORT_ONLY}
  h = hashlib.sha256(json.dumps(shards_opts, sort_keys=True).encode())
  for e in entries:
    h.update(f'{e.key}\t{e.path}\t{e.label}\t{e.start_s}\t{e.end_s}\n'.encode())
  return h.hexdigest()[:16]


def shard_meta_path(shard_path: str) -> str:
  """`DIR/.NAME-SPLIT.tfrecord-00003-of-00064.json`: hidden; the reader skips hidden names
  (`input_pipeline.is_shard_name`), which tf.io.gfile.glob matches."""
  d, base = os.path.split(shard_path)
  return os.path.join(d, f'.{base}.json')


def write_shard(task) -> Dict:
  """Writes one shard (worker entry point); returns its stats (also saved beside it)."""
  shard_path, entries, opts = task
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  stats = {'videos': 0, 'frames': 0, 'bytes': 0, 'failures': [], 'warnings': [],
           'complete': False, 'fingerprint': _fingerprint(entries, opts)}
  tmp = shard_path + '.tmp'
  index_entries, offset = [], 0
  with tf.io.TFRecordWriter(tmp) as writer:
    for e in entries:
      report = video_io.DecodeReport()
      try:
        frames = video_frames(e, opts, report)
      except Exception as err:  # pylint: disable=broad-except
        # One bad video must not stop a preparation of 300k: report it and go on.
        stats['failures'].append({'key': e.key, 'path': e.path or e.wanted,
                                  'reason': f'{type(err).__name__}: {err}'.strip()})
        continue
      warning = _warning(len(frames), report, opts)
      if warning:
        stats['warnings'].append({'key': e.key, 'path': e.path, 'reason': warning,
                                  'frames_written': len(frames),
                                  'frames_decoded': report.decoded,
                                  'frames_stated': report.expected})
      start_us = int(e.start_s * 1e6) if e.start_s is not None else None
      end_us = int(e.end_s * 1e6) if e.end_s is not None else None
      data = records.make_sequence_example(frames, e.label, e.label_text, e.key, start_us,
                                           end_us).SerializeToString()
      writer.write(data)
      index_entries.append(frame_index.entry(offset, data, frames, e.label, e.key.encode()))
      offset += frame_index.record_size(data)
      stats['videos'] += 1
      stats['frames'] += len(frames)
      stats['bytes'] += len(data)
  os.replace(tmp, shard_path)
  frame_index.write(shard_path, index_entries, offset)
  stats['complete'] = True
  with open(shard_meta_path(shard_path), 'w') as f:
    json.dump(stats, f)
  return stats


def _shard_done(shard_path: str, fingerprint: str):
  meta = shard_meta_path(shard_path)
  if not (os.path.exists(shard_path) and os.path.exists(meta)):
    return None
  try:
    with open(meta) as f:
      stats = json.load(f)
  except (OSError, ValueError):
    return None
  if stats.get('complete') and stats.get('fingerprint') == fingerprint:
    return stats
  return None


def other_shard_counts(out_dir: str, name: str, split: str,
                       num_shards: int) -> List[Tuple[str, int]]:
  """(file name, shard count) of each `NAME-SPLIT.tfrecord-XXXXX-of-YYYYY` shard in `out_dir`
  whose count is not `num_shards`, sorted: shards of an earlier run with another count."""
  try:
    names = os.listdir(out_dir)
  except (FileNotFoundError, NotADirectoryError):
    return []
  pattern = re.compile(re.escape(f'{name}-{split}.tfrecord-') + r'\d+-of-(\d+)')
  found = []
  for base in sorted(names):
    m = pattern.fullmatch(base)
    if m and int(m.group(1)) != num_shards:
      found.append((base, int(m.group(1))))
  return found


def _check_out_dir(out_dir: str, name: str, split: str, num_shards: int) -> None:
  """DataError (nothing written) when `out_dir` is a file, or holds shards of this NAME-SPLIT
  with another shard count: a glob would read those beside the new ones, every video twice.
  They are the user's files: named, never removed."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise errors.DataError(f'{out_dir}: not a folder (a file of that name exists); '
                           'give another --out')
  others = other_shard_counts(out_dir, name, split, num_shards)
  if others:
    base, count = others[0]
    raise errors.DataError(
        f'{out_dir} holds {len(others)} shard(s) of {name}-{split} with another shard count '
        f'({base}, {count} shards; this run writes {num_shards}): remove them or give another '
        '--out or --name')


def prepare(entries: Sequence[annotations_lib.Entry], *, out_dir: str, name: str, split: str,
            opts: Options, num_shards: int = 0, num_workers: int = 0, seed: int = 0,
            progress: bool = True) -> Dict:
  """Writes the shards of `entries`; returns (and saves) the report.

  num_workers=0 writes in this process (tests, debugging); otherwise spawned processes
  (spawn, not fork: the parent may already hold TensorFlow threads). Raises DataError, before
  writing anything, when `out_dir` is a file or holds shards of NAME-SPLIT with another count.
  """
  entries = list(entries)
  random.Random(seed).shuffle(entries)  # spread classes over shards
  if num_shards <= 0:
    num_shards = max(1, math.ceil(len(entries) / 200))
  num_shards = max(1, min(num_shards, len(entries)))
  _check_out_dir(out_dir, name, split, num_shards)
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:   # a file on the way, no permission
    raise errors.DataError(f'{out_dir}: cannot create the output folder '
                           f'({e.strerror or e})') from None
  tasks, report_shards, done = [], {}, []
  for i in range(num_shards):
    path = os.path.join(out_dir, records.shard_name(name, split, i, num_shards))
    part = entries[i::num_shards]
    stats = _shard_done(path, _fingerprint(part, opts))
    if stats is not None:
      if frame_index.valid_index(path, os.path.getsize(path)) is None:
        frame_index.build(path)  # finished by a version that wrote no frame index
      report_shards[os.path.basename(path)] = stats
      done.append(path)
    else:
      tasks.append((path, part, opts))
  if done:
    logging.info('Resuming: %d of %d shards already complete', len(done), num_shards)
  t0 = time.time()
  bar = _progress(len(tasks), progress)
  if num_workers <= 0:
    for task in tasks:
      report_shards[os.path.basename(task[0])] = write_shard(task)
      bar.update(1)
  else:
    ctx = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
      futures = {pool.submit(write_shard, t): t[0] for t in tasks}
      for fut in concurrent.futures.as_completed(futures):
        report_shards[os.path.basename(futures[fut])] = fut.result()
        bar.update(1)
  bar.close()
  report = {
      'name': name, 'split': split, 'num_shards': num_shards,
      'videos_requested': len(entries),
      'videos_written': sum(s['videos'] for s in report_shards.values()),
      'frames': sum(s['frames'] for s in report_shards.values()),
      'bytes': sum(s['bytes'] for s in report_shards.values()),
      'failures': [f for s in report_shards.values() for f in s['failures']],
      'warnings': [w for s in report_shards.values() for w in s.get('warnings', [])],
      'seconds': round(time.time() - t0, 2),
      'options': dataclasses.asdict(opts),
      'shards': dict(sorted(report_shards.items())),
  }
  path = os.path.join(out_dir, f'{name}-{split}.report.json')
  with open(path, 'w') as f:
    json.dump(report, f, indent=1)
  logging.info('Wrote %d/%d videos (%d frames, %.1f MB) in %d shards; %d failures, %d written '
               'with warnings; report %s', report['videos_written'], len(entries),
               report['frames'], report['bytes'] / 1e6, num_shards, len(report['failures']),
               len(report['warnings']), path)
  return report


class _NoBar:
  def update(self, n):
    del n

  def close(self):
    pass


def _progress(total: int, enabled: bool):
  if not enabled:
    return _NoBar()
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc='shards', unit='shard', file=sys.stderr)


FLAGS = flags.FLAGS

# (flag, lowest, highest or None, what the lowest value means or ''): checked before anything
# is read or written.
_FLAG_RANGES = (
    ('short_side', 0, None, '0 keeps the original size'),
    ('fps', 0, None, '0 keeps every frame'),
    ('jpeg_quality', 1, 100, ''),
    ('min_frames', 1, None, ''),
    ('num_shards', 0, None, '0: one per 200 videos'),
    ('num_workers', 0, None, '0 writes in this process'),
    ('num_classes', 0, None, '0: from --labels'),
    ('warn_frames', 0, None, '0 warns of no short video'),
)


def _define_flags():
  flags.DEFINE_string('videos', None, 'Directory of video files (searched recursively).')
  flags.DEFINE_string('annotations', None, 'Annotation file (CSV, JSON or "path label" list).')
  flags.DEFINE_string('out', None, 'Output directory for shards and the report.')
  flags.DEFINE_string('split', 'train', 'Split name used in shard names.')
  flags.DEFINE_string('name', '', 'Data set name in shard names (default: annotations stem).')
  flags.DEFINE_enum('format', 'auto', ['auto', 'kinetics', 'ssv2', 'diving48', 'list'],
                    'Annotation format.')
  flags.DEFINE_string('labels', '',
                      'Class list: text (one per line), JSON list, or SSv2 labels.json.')
  flags.DEFINE_integer('num_classes', 0,
                       'Labels outside [0, num_classes) are reported (0: from labels).')
  flags.DEFINE_integer('short_side', 256, 'Resize frames to this short side (0 keeps the size).')
  flags.DEFINE_float('fps', 0.0, 'Keep frames at this rate (0 keeps every frame).')
  flags.DEFINE_integer('jpeg_quality', 90, 'JPEG quality, 1 to 100.')
  flags.DEFINE_integer('min_frames', 1, 'Videos decoding to fewer frames are not written; the '
                       'report lists them among the failures.')
  flags.DEFINE_integer('warn_frames', 8, 'Videos written with fewer frames are listed among the '
                       'warnings (as are videos that decode short of their stated length).')
  flags.DEFINE_integer('num_shards', 0, 'Number of shards (0: one per 200 videos).')
  flags.DEFINE_integer('num_workers', max(1, (os.cpu_count() or 2) - 1),
                       'Writer processes (0 writes in this process).')
  flags.DEFINE_integer('seed', 0, 'Seed of the video-to-shard assignment.')


def flag_range_error(name: str, value) -> str:
  """'' when `value` is in the range of flag `name` (_FLAG_RANGES), else one line naming the
  flag, the value and the range."""
  for flag, lo, hi, note in _FLAG_RANGES:
    if flag != name:
      continue
    finite = not isinstance(value, float) or math.isfinite(value)
    if finite and lo <= value and (hi is None or value <= hi):
      return ''
    want = f'from {lo} to {hi}' if hi is not None else f'>= {lo}'
    return f'--{name}={value}: must be {want}' + (f' ({note})' if note else '')
  return ''


def _fail(error: errors.UserError):
  """One line on stderr and exit status 2 (the traceback with AIM_JAX_TRACEBACK=1)."""
  if errors.show_traceback():
    raise error
  sys.exit(errors.report(error, 'prepare'))


def main(argv):
  del argv
  for f in ('videos', 'annotations', 'out'):
    if not getattr(FLAGS, f):
      raise app.UsageError(f'--{f} is required')
  for flag, *_ in _FLAG_RANGES:
    problem = flag_range_error(flag, getattr(FLAGS, flag))
    if problem:
      _fail(errors.ConfigError(problem))
  if not os.path.isdir(FLAGS.videos):
    _fail(errors.DataError(f'--videos {FLAGS.videos}: no such folder'))
  if os.path.exists(FLAGS.out) and not os.path.isdir(FLAGS.out):
    _fail(errors.DataError(f'--out {FLAGS.out}: not a folder (a file of that name exists)'))
  try:
    entries = annotations_lib.read(FLAGS.format, FLAGS.annotations, FLAGS.videos,
                                   labels=FLAGS.labels, num_classes=FLAGS.num_classes)
  except (ValueError, OSError, KeyError) as e:   # the message names the file (and line)
    if errors.show_traceback():
      raise
    sys.exit(errors.report(errors.DataError(_annotation_error(e)), 'prepare'))
  name = FLAGS.name or os.path.splitext(os.path.basename(FLAGS.annotations))[0]
  opts = Options(short_side=FLAGS.short_side, fps=FLAGS.fps, jpeg_quality=FLAGS.jpeg_quality,
                 min_frames=FLAGS.min_frames, warn_frames=FLAGS.warn_frames)
  try:
    report = prepare(entries, out_dir=FLAGS.out, name=name, split=FLAGS.split, opts=opts,
                     num_shards=FLAGS.num_shards, num_workers=FLAGS.num_workers,
                     seed=FLAGS.seed)
  except errors.UserError as e:   # --out holds shards of another count, cannot be created
    _fail(e)
  print(json.dumps({k: report[k] for k in ('videos_requested', 'videos_written', 'frames', 'bytes',
                                           'seconds')}))
  for fail in report['failures'][:20]:
    where = f" ({fail['path']})" if fail['path'] else ''
    print(f"FAILED {fail['key']}{where}: {fail['reason']}")
  for warn in report['warnings'][:20]:
    print(f"WARNING {warn['key']} ({warn['path']}): {warn['reason']}")
  report_path = os.path.join(FLAGS.out, f'{name}-{FLAGS.split}.report.json')
  for what in ('failures', 'warnings'):
    if len(report[what]) > 20:
      print(f'... {len(report[what]) - 20} more {what} in {report_path}')
  if report['videos_requested'] and not report['videos_written']:
    first = report['failures'][0] if report['failures'] else {}
    sys.exit(errors.report(errors.DataError(
        f'none of the {report["videos_requested"]} videos of {FLAGS.annotations} was written '
        f'(first failure: {first.get("key")}: {first.get("reason")}; all in {report_path})'),
        'prepare'))


def _annotation_error(e: BaseException) -> str:
  """One line for an annotation file that cannot be read: OSError's own text names the
  file; the readers' ValueErrors start with it."""
  if isinstance(e, OSError) and e.filename:
    return f'{e.filename}: {e.strerror or e}'
  if isinstance(e, KeyError):
    return f'{FLAGS.annotations}: missing key {e}'
  text = str(e)
  return text if FLAGS.annotations in text else f'{FLAGS.annotations}: {text}'


if __name__ == '__main__':
  _define_flags()
  app.run(main)
