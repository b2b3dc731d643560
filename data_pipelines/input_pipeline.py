"""tf.data input pipelines on DMVR-layout TFRecords (and TFDS / synthetic sources).

Order (as DMVR's `make_dataset`, on plain tf.data): files -> per-process file shard ->
per-epoch file shuffle -> interleave(TFRecordDataset) -> record shuffle -> parse (no
decoding) -> cheap validity checks (skip, count, log) -> sample frame indices -> decode only
the sampled JPEGs -> augment -> normalise -> batch -> prefetch. Where every shard has a frame
index (data_pipelines/frame_index.py, `data.frame_index`), the index entries take the records'
place up to the shuffle, and only the sampled JPEGs are read from the shard: the same records
in the same order, the same clips.

Determinism: every random draw is stateless, keyed on (seed, process, epoch, position in
the epoch), and the shuffles are seeded per epoch, so one seed gives the same clips in the
same order on a re-run. `start_step=N` starts at epoch `N*B // n` and skips the first
`N*B % n` raw records of it (no parsing or decoding), where n is the records per epoch of
this process; the order then continues where it stopped. Exact unless clips were skipped as
bad before the resume point (each shifts the order by one clip).

Bad input: records with no frames, labels outside [0, num_classes), or frames that are not
JPEG are skipped before decoding and logged with file and key; a JPEG that fails to decode
is dropped by `ignore_errors` and counted from the gap it leaves. A shard that cannot be read
to its end (truncated or corrupt: DataLossError; the bytes read fall short of its size) adds
one named entry for the shard with where reading stopped. The iterator raises once the skip
rate exceeds `max_skip_rate` (after `skip_rate_min_examples` clips), also when no clip at all
gets through. docs/data.md lists what is reported.
"""

import concurrent.futures
import dataclasses
import json
import os
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from aim_jax import errors
from data_pipelines import config as config_lib
from data_pipelines import frame_index
from data_pipelines import ops
from data_pipelines import records
from data_pipelines import sampling
from data_pipelines import synthetic

_SPLIT_FIELDS = {'train': 'train_files', 'val': 'val_files', 'test': 'test_files'}
_HASH_BUCKETS = 1_000_000
_CYCLE_LENGTH = 16


# ------------------------------------------------------------------ files and counts


def is_shard_name(path: str) -> bool:
  """Whether a file a pattern matched can be a shard: not hidden (prepare's `.SHARD.json` and
  frame indexes `.SHARD.frames` lie beside the shards, and `tf.io.gfile.glob`, unlike a shell,
  matches hidden names: `data/*train*` finds them), not a JSON report, not a temporary file."""
  name = os.path.basename(path.rstrip('/'))
  return not (name.startswith('.') or name.endswith(('.json', '.tmp', '.frames')))


def _is_local_dir(path: str) -> bool:
  """A folder a wildcard matched (`data/*` beside a subfolder); checked on local paths only,
  where it costs no request (on gs:// a folder holds no object of its own name to match)."""
  return '://' not in path and os.path.isdir(path)


def list_files(patterns: str, field: str = 'files') -> List[str]:
  """Sorted shards matching comma-separated glob patterns; a pattern matching no shard fails."""
  out = []
  parts = [p.strip() for p in str(patterns).split(',') if p.strip()]
  if not parts:
    raise errors.ConfigError(f'data.{field} is empty: give a glob pattern of TFRecord shards')
  for pattern in parts:
    if not any(c in pattern for c in '*?[') and tf.io.gfile.isdir(pattern):
      raise errors.ConfigError(
          f'data.{field}: {pattern!r} is a folder; give a glob of its shards, such as '
          f"'{os.path.join(pattern, '*-of-*')}'")
    matched = sorted(tf.io.gfile.glob(pattern))
    shards = [m for m in matched if is_shard_name(m) and not _is_local_dir(m)]
    if not shards:
      raise errors.DataError(
          f'data.{field}: pattern {pattern!r} matches no file' if not matched else
          f'data.{field}: pattern {pattern!r} matches no shard, only {len(matched)} folder(s) '
          f'or hidden, JSON or temporary file(s) such as {matched[0]}')
    out.extend(shards)
  return sorted(set(out))


_RECORD_OVERHEAD = 16  # TFRecord framing per record: length (8 B), its CRC (4 B), data CRC (4 B)


def _reported(path: str, reports: Dict[str, dict]) -> Optional[Tuple[int, Optional[int]]]:
  """(records, record bytes or None) of a shard from the prepare JSON beside it, if any:
  its own `.SHARD.json`, else its entry in a `*.report.json` of the directory (`reports`:
  `_report_entries` of the shard's directory, read once per directory by the caller).
  Through tf.io.gfile, so shards copied to gs:// with their JSON files keep their counts."""
  meta = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.json')  # prepare's
  try:
    with tf.io.gfile.GFile(meta) as f:
      stats = json.load(f)
    if stats['complete']:
      return int(stats['videos']), (int(stats['bytes']) if 'bytes' in stats else None)
  except (tf.errors.NotFoundError, OSError, ValueError, KeyError, TypeError):
    pass
  entry = reports.get(os.path.basename(path))
  if entry is not None and entry.get('complete'):
    return int(entry['videos']), (int(entry['bytes']) if 'bytes' in entry else None)
  return None


def _report_entries(directory: str) -> Dict[str, dict]:
  """Shard name -> entry, from every `*.report.json` (prepare's) in `directory`."""
  entries: Dict[str, dict] = {}
  for report in sorted(tf.io.gfile.glob(os.path.join(directory, '*.report.json'))):
    try:
      with tf.io.gfile.GFile(report) as f:
        shards = json.load(f)['shards']
    except (tf.errors.NotFoundError, OSError, ValueError, KeyError, TypeError):
      continue
    if isinstance(shards, dict):
      for name, entry in shards.items():
        entries.setdefault(name, entry)
  return entries


@dataclasses.dataclass
class _Shard:
  """A TFRecord file as the reader sees it.

  size: bytes on disk; expected: records the prepare JSON promises (-1: no JSON);
  records: records that can be read (the JSON's count when the file size agrees with it,
  else counted by reading); truncated: reading stops early with an error (DataLossError);
  index: its frame index (data_pipelines/frame_index.py) when the pipeline reads through it.
  """
  path: str
  size: int
  expected: int = -1
  records: int = -1
  truncated: bool = False
  index: str = ''

  @property
  def positions(self) -> int:
    """Elements this shard puts in the stream: its readable records plus one marker if cut."""
    return self.records + int(self.truncated)


# Concurrent file-system requests when a pipeline starts: on gs:// each shard costs a few
# sequential round trips (stat, prepare JSON, frame-index header), so 1,000 shards one after
# another would take minutes; tf.io.gfile releases the GIL while it waits.
_META_THREADS = 32


def _map_files(fn, items: Sequence):
  """[fn(x) for x in items], in order, over up to _META_THREADS threads."""
  if len(items) < 4:
    return [fn(x) for x in items]
  with concurrent.futures.ThreadPoolExecutor(min(_META_THREADS, len(items))) as pool:
    return list(pool.map(fn, items))


def _shard_meta(files: Sequence[str]) -> List[_Shard]:
  """Size and promised record count of every file (a stat and the JSON; no record reading),
  the files' requests made concurrently; each directory's prepare reports are read once."""
  files = list(files)
  dirs = sorted({os.path.dirname(f) for f in files})
  reports = dict(zip(dirs, _map_files(_report_entries, dirs)))
  return _map_files(lambda f: _one_shard_meta(f, reports[os.path.dirname(f)]), files)


def _one_shard_meta(path: str, reports: Dict[str, dict]) -> _Shard:
  """One file of `_shard_meta`."""
  size = int(tf.io.gfile.stat(path).length)
  rep = _reported(path, reports)
  shard = _Shard(path, size)
  if rep is not None:
    shard.expected = rep[0]
    if rep[1] is None or rep[1] + _RECORD_OVERHEAD * rep[0] == size:
      shard.records = rep[0]  # the file is exactly what prepare wrote
    else:
      logging.warning('Shard %s is %d bytes but its prepare JSON describes %d records of '
                      '%d bytes (%d with framing): truncated or changed; reading it to count',
                      path, size, rep[0], rep[1], rep[1] + _RECORD_OVERHEAD * rep[0])
  return shard


def _use_index(shards: Sequence[_Shard], mode: str) -> bool:
  """Reads through the shards' frame indexes when `mode` ('auto', 'off', 'require') says so
  and every shard has one made for its current size; sets `index` (and `records`, known from
  the index) on each. Returns whether the indexes are used."""
  if mode not in ('auto', 'off', 'require'):
    raise errors.ConfigError(f"data.frame_index must be 'auto', 'off' or 'require', got "
                             f'{mode!r}')
  if mode == 'off' or not shards:
    return False
  found = _map_files(lambda s: frame_index.valid_index(s.path, s.size), list(shards))
  missing = [s.path for s, f in zip(shards, found) if f is None]
  if missing:
    if mode == 'require':
      raise errors.DataError(f'data.frame_index=require: {missing[0]} has no usable frame index '
                       f'{frame_index.index_path(missing[0])} ({len(missing)} of {len(shards)} '
                       'shards lack one; python -m data_pipelines.frame_index builds them)')
    if len(missing) < len(shards):
      logging.warning('%d of %d shards have no usable frame index (first: %s): reading whole '
                      'records for all (python -m data_pipelines.frame_index builds them)',
                      len(missing), len(shards), missing[0])
    return False
  for shard, (path, count) in zip(shards, found):
    shard.index = path
    if shard.records < 0:
      shard.records = count  # the index was made from this very file: no cut, no counting
  return True


def _shards(files: Sequence[str], index_mode: str = 'off') -> List[_Shard]:
  """`_shard_meta` plus readable record counts, reading the files the JSON (or the frame
  index, with `index_mode`) cannot vouch for."""
  out = _shard_meta(files)
  _use_index(out, index_mode)
  return _count_records(out)


def _count_records(shards: List[_Shard]) -> List[_Shard]:
  """Sets `records` and `truncated` of the shards whose count is unknown, by reading them."""
  for shard in shards:
    if shard.records < 0:
      ds = _read_file(tf.constant(shard.path), tf.constant(shard.size, tf.int64),
                      tf.constant(shard.expected, tf.int64))
      count, cut = ds.reduce((np.int64(0), False), lambda c, el: (
          c[0] + tf.cast(tf.equal(el['problem'], ''), tf.int64),
          tf.logical_or(c[1], tf.not_equal(el['problem'], ''))))
      shard.records, shard.truncated = int(count), bool(cut)
      if shard.truncated:
        logging.warning('Shard %s is truncated or corrupt: reading stops with a DataLossError '
                        'after %d records (%s)', shard.path, shard.records,
                        f'of {shard.expected} written' if shard.expected >= 0 else
                        'the rest is lost')
  return shards


def file_record_counts(files: Sequence[str]) -> List[int]:
  """Readable records per file: from the prepare report when present, else by reading (no
  parsing). A truncated file counts the records before the cut (and is logged)."""
  return [s.records for s in _shards(files)]


def _keep_mask(basename, index, fraction: float):
  """Deterministic record subset for `train_fraction`, by hash of (shard, position)."""
  if fraction >= 1.0:
    return tf.ones_like(index, tf.bool)
  ident = tf.strings.join([basename, ':', tf.strings.as_string(index)])
  bucket = tf.strings.to_hash_bucket_fast(ident, _HASH_BUCKETS)
  return bucket < int(round(fraction * _HASH_BUCKETS))


def _kept_count(files: Sequence[str], counts: Sequence[int], fraction: float) -> int:
  if fraction >= 1.0:
    return int(sum(counts))
  total = 0
  for path, n in zip(files, counts):
    keep = _keep_mask(tf.constant(os.path.basename(path)), tf.range(n, dtype=tf.int64), fraction)
    total += int(tf.reduce_sum(tf.cast(keep, tf.int64)))
  return total


def _kept_positions(shards: Sequence[_Shard], fraction: float) -> int:
  """Stream elements of these shards after `train_fraction` (a truncation marker is kept)."""
  return (_kept_count([s.path for s in shards], [s.records for s in shards], fraction)
          + sum(int(s.truncated) for s in shards))


def count_examples(data_cfg: ml_collections.ConfigDict, split: str) -> int:
  """Number of videos of a split (over all processes)."""
  if data_cfg.source == 'synthetic':
    return synthetic.count_examples(data_cfg, split)
  if split == 'train' and data_cfg.num_train_examples:
    return int(data_cfg.num_train_examples)
  if data_cfg.source == 'tfds':
    from data_pipelines import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.count_examples(data_cfg, split)
  if data_cfg.source != 'tfrecord':
    raise errors.ConfigError("data.source must be 'tfrecord', 'tfds' or 'synthetic', got "
                             f'{data_cfg.source!r}')
  files = split_files(data_cfg, split)
  fraction = data_cfg.train_fraction if split == 'train' else 1.0
  # Videos the split holds: a truncated shard counts what prepare wrote into it when its JSON
  # says (the records lost are then skipped videos), else what can still be read.
  shards = _shards(files, data_cfg.frame_index)
  return _kept_count(files, [s.expected if s.expected >= 0 else s.records for s in shards],
                     fraction)


def split_files(data_cfg: ml_collections.ConfigDict, split: str) -> List[str]:
  """The shards of `split` (tfrecord source; [] for the others), checked as a run's first
  step: an empty or unmatched field, or with `data.frame_index='require'` a shard without a
  usable frame index, fails before anything compiles, naming the field or the shard."""
  if data_cfg.source != 'tfrecord':
    return []
  field = _split_field(split)
  files = list_files(getattr(data_cfg, field), field)
  if data_cfg.frame_index == 'require':   # a shard without its index: before anything is written
    _use_index(_shard_meta(files), 'require')
  return files


def _split_field(split: str) -> str:
  if split not in _SPLIT_FIELDS:
    raise errors.ConfigError(f'split must be one of {sorted(_SPLIT_FIELDS)}, got {split!r}')
  return _SPLIT_FIELDS[split]


# ------------------------------------------------------------------ skip accounting


@dataclasses.dataclass
class SkipStats:
  """Clips skipped so far: those named before decoding (file, key, reason) and decode errors.

  A truncated or corrupt shard is one entry of `named` (key: the shard's name, reason: where
  reading stopped); the records it lost are counted in `lost_records` (what its prepare JSON
  promised minus what could be read; 1 when there is no JSON to say).
  """
  named: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)
  named_positions: set = dataclasses.field(default_factory=set)
  decode_errors: int = 0
  lost_records: int = 0
  shard_entries: int = 0
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

  @property
  def total(self) -> int:
    return len(self.named) - self.shard_entries + self.lost_records + self.decode_errors

  def record(self, epoch, index, file, key, reason, lost=0) -> bool:
    item = (file.numpy().decode('utf-8', 'replace'), key.numpy().decode('utf-8', 'replace'),
            reason.numpy().decode('utf-8', 'replace'))
    lost = int(lost)
    with self.lock:
      self.named.append(item)
      self.named_positions.add((int(epoch), int(index)))
      if lost > 0:
        self.shard_entries += 1
        self.lost_records += lost
    if lost > 0:
      logging.warning('Shard %s: %s', item[0], item[2])
    else:
      logging.warning('Skipping clip %s in %s: %s', item[1], item[0], item[2])
    return False


def _validity(ex, num_classes: int):
  """(valid, reason) of a parsed record from cheap checks (no decoding); reason '' if valid."""
  label_ok = tf.logical_and(ex['label'] >= 0, ex['label'] < num_classes)
  if 'offsets' in ex:  # read through a frame index: it says whether every frame is a JPEG
    has_frames = tf.size(ex['offsets']) > 0
    jpeg_ok = ex['jpeg_ok']
  else:
    frames = ex['frames']
    has_frames = tf.size(frames) > 0
    soi = tf.strings.substr(frames, 0, 2)
    jpeg_ok = tf.reduce_all(tf.equal(soi, b'\xff\xd8'))
  problem = ex.get('problem', tf.constant(''))  # set on a truncated shard's marker
  reason = tf.case([(tf.not_equal(problem, ''), lambda: problem),
                    (tf.logical_not(has_frames), lambda: tf.constant('record has no frames')),
                    (tf.logical_not(label_ok),
                     lambda: tf.strings.format('label {} outside [0, %d)' % num_classes,
                                               ex['label'])),
                    (tf.logical_not(jpeg_ok), lambda: tf.constant('frame is not a JPEG'))],
                   default=lambda: tf.constant(''))
  valid = tf.logical_and(tf.logical_and(tf.equal(problem, ''), has_frames),
                         tf.logical_and(label_ok, jpeg_ok))
  return valid, reason


def _check_valid(ex, num_classes: int, stats: SkipStats):
  """Filter predicate: cheap checks on the parsed record, logging what it drops."""
  if '_valid' in ex:  # already checked by `_stop_above_skip_rate`
    valid, reason = ex['_valid'], ex['_reason']
  else:
    valid, reason = _validity(ex, num_classes)
  lost = ex.get('lost', tf.constant(0, tf.int64))

  def log_skip():
    out = tf.py_function(
        lambda e, i, f, k, r, n: stats.record(e.numpy(), i.numpy(), f, k, r, n.numpy()),
        [ex['_epoch'], ex['_index'], ex['file'], ex['key'], reason, lost], tf.bool)
    return tf.reshape(out, [])

  return tf.cond(valid, lambda: tf.constant(True), log_skip)


def _stop_above_skip_rate(ds: tf.data.Dataset, num_classes: int, max_skip_rate: float,
                          min_examples: int) -> tf.data.Dataset:
  """Checks each record and ends the (infinite) training stream once the share of records
  failing the checks exceeds `max_skip_rate` (after `min_examples`), so that a source where
  every record is bad stops with the skip-rate error instead of filtering forever without
  producing a batch. `_BatchIterator` turns the end into that error.
  """
  def step(state, ex):
    seen, bad = state
    # Decided on the records before this one: the record that crosses the limit still
    # reaches the filter, which names it, and the stream ends at the next.
    stop = tf.logical_and(seen >= min_examples, tf.cast(bad, tf.float64)
                          > max_skip_rate * tf.cast(seen, tf.float64))
    valid, reason = _validity(ex, num_classes)
    seen, bad = seen + 1, bad + tf.cast(tf.logical_not(valid), tf.int64)
    ex = dict(ex)
    ex['_valid'], ex['_reason'], ex['_stop'] = valid, reason, stop
    return (seen, bad), ex

  ds = ds.scan((tf.constant(0, tf.int64), tf.constant(0, tf.int64)), _graph(step))
  ds = ds.take_while(_graph(lambda ex: tf.logical_not(ex['_stop'])))
  return ds.map(_graph(lambda ex: {k: v for k, v in ex.items() if k != '_stop'}))


class _BatchIterator:
  """Numpy batches from a tf.data pipeline, counting clips dropped by decode errors.

  Each element carries its (epoch, index) stream position. A position missing between two
  consecutive outputs of one epoch was dropped: by the validity filter (named, logged) or,
  if not named, by `ignore_errors` after a JPEG decode error.
  """

  def __init__(self, ds: tf.data.Dataset, stats: SkipStats, max_skip_rate: float,
               min_examples: int, outputs: Sequence[str], epoch_size: Optional[int] = None,
               start: Tuple[int, int] = (0, 0), infinite: bool = False):
    self._it = ds.as_numpy_iterator()
    self._infinite = infinite  # an end of the stream means `_stop_above_skip_rate` ended it
    self.stats = stats
    self._max_skip_rate = max_skip_rate
    self._min_examples = min_examples
    self._outputs = tuple(outputs)
    self._epoch_size = epoch_size
    self._last = (start[0], start[1] - 1)  # last stream position accounted for
    self.examples = 0

  def __iter__(self):
    return self

  def _unnamed(self, epoch: int, lo: int, hi: int) -> int:
    return sum((epoch, j) not in self.stats.named_positions for j in range(lo, hi))

  def _account(self, e: int, i: int) -> int:
    """Dropped, unnamed positions between the last accounted position and (e, i)."""
    le, li = self._last
    if e == le:
      dropped = self._unnamed(e, li + 1, i)
    elif self._epoch_size is not None:
      dropped = self._unnamed(le, li + 1, self._epoch_size)
      dropped += sum(self._unnamed(x, 0, self._epoch_size) for x in range(le + 1, e))
      dropped += self._unnamed(e, 0, i)
    else:
      dropped = 0
    self._last = (e, i)
    return dropped

  def __next__(self) -> Dict[str, np.ndarray]:
    try:
      batch = next(self._it)
    except StopIteration:
      if self._infinite:
        raise errors.DataError(self._skip_message()) from None
      if self._epoch_size is not None:  # finite (eval) stream: clips dropped at its end
        with self.stats.lock:
          self.stats.decode_errors += self._unnamed(self._last[0], self._last[1] + 1,
                                                    self._epoch_size)
          self._last = (self._last[0], self._epoch_size - 1)
      raise
    epochs, indices = batch.pop('_epoch'), batch.pop('_index')
    with self.stats.lock:
      dropped = sum(self._account(e, i) for e, i in zip(epochs.tolist(), indices.tolist()))
      self.stats.decode_errors += dropped
    if dropped:
      logging.warning('%d clip(s) dropped by JPEG decode errors (total skipped %d)', dropped,
                      self.stats.total)
    self.examples += len(indices)
    self._check_skip_rate()
    return {k: batch[k] for k in self._outputs}

  def _skip_message(self) -> str:
    skipped = self.stats.total
    seen = max(self.examples + skipped, 1)
    named = '; '.join(f'{k} in {f}: {r}' for f, k, r in self.stats.named[:10])
    return (f'Skipped {skipped} of {seen} clips ({skipped / seen:.2%}), above data.max_skip_rate='
            f'{self._max_skip_rate}: {self.stats.decode_errors} decode errors; first named: '
            f'{named}')

  def _check_skip_rate(self):
    skipped = self.stats.total
    seen = self.examples + skipped
    if seen >= self._min_examples and skipped > self._max_skip_rate * seen:
      raise errors.DataError(self._skip_message())


# ------------------------------------------------------------------ record streams


def _graph(fn):
  """`fn` traced by tf.data as written, without AutoGraph's source conversion.

  Every branch on a tensor in this pipeline is already `tf.cond`/`tf.case`/`tf.where`, so
  AutoGraph has nothing to convert, yet transpiling the functions (and everything they
  call) costs seconds in every process that builds a pipeline.
  """
  return tf.autograph.experimental.do_not_convert(fn)



def _read_file(path, size, expected):
  """(file, index-in-file, raw record) for every record of one shard, then, if reading stops
  with an error before the end of the file (truncated or corrupt: DataLossError), one marker
  element naming the shard and the cut in 'problem' ('' on records), with the records lost
  in 'lost'. Bytes read are checked against the file `size`; `expected` is the record count
  the prepare JSON promises (-1: unknown).
  """
  base = tf.strings.split(path, '/')[-1]
  # An error ends this file's records (what follows it is unreadable); then the end marker
  # (index -1) comes, and the scan compares the bytes read with the file size.
  recs = tf.data.TFRecordDataset(path).enumerate().ignore_errors()
  end = tf.data.Dataset.from_tensors((tf.constant(-1, tf.int64), tf.constant(b'')))

  def account(state, i, raw):
    nbytes, count = state
    eof = tf.less(i, 0)
    nbytes = tf.where(eof, nbytes,
                      nbytes + tf.cast(tf.strings.length(raw), tf.int64) + _RECORD_OVERHEAD)
    count = tf.where(eof, count, count + 1)
    cut = tf.logical_and(eof, tf.not_equal(nbytes, size))

    def describe():  # only on a cut shard's marker: no string work per record
      of = tf.where(expected >= 0, tf.strings.join([' of ', tf.strings.as_string(expected)]), '')
      return tf.strings.join([
          'shard truncated or corrupt: reading stopped with an error (DataLossError) after ',
          tf.strings.as_string(count), of, ' records, ', tf.strings.as_string(nbytes), ' of ',
          tf.strings.as_string(size), ' bytes'])

    problem = tf.cond(cut, describe, lambda: tf.constant(''))
    lost = tf.where(cut, tf.where(expected >= 0, tf.maximum(expected - count, 1), 1), 0)
    # file_index: the record's index; on a cut shard's marker, the records read; -1: clean end
    index = tf.where(eof, tf.where(cut, count, -1), i)
    return (nbytes, count), {'file': path, 'base': base, 'file_index': index, 'raw': raw,
                             'problem': problem, 'lost': tf.cast(lost, tf.int64)}

  ds = recs.concatenate(end).scan((tf.constant(0, tf.int64), tf.constant(0, tf.int64)),
                                  _graph(lambda state, el: account(state, *el)))
  return ds.filter(_graph(lambda el: el['file_index'] >= 0))


def _read_index_file(path, index):
  """The frame index entries of one shard as records: (file, index-in-file, frame offsets
  and lengths, label, filename, jpeg_ok) for each, in file order (the index was made for
  this file's size, so nothing is cut)."""
  base = tf.strings.split(path, '/')[-1]

  def entry(i, raw):
    e = frame_index.parse_entry(raw)
    e.update(file=path, base=base, file_index=i, problem=tf.constant(''),
             lost=tf.constant(0, tf.int64))
    return e

  return tf.data.TFRecordDataset(index).skip(1).enumerate().map(_graph(entry))


def _key(filename, el):
  """A record's key: its filename, else SHARD:INDEX."""
  return tf.where(tf.equal(filename, ''),
                  tf.strings.join([el['base'], ':', tf.strings.as_string(el['file_index'])]),
                  filename)


def _parse(el):
  if 'offsets' in el:  # a frame index entry: nothing to parse, the frames are read later
    return {'offsets': el['offsets'], 'lengths': el['lengths'], 'jpeg_ok': el['jpeg_ok'],
            'label': el['label'], 'key': _key(el['filename'], el), 'file': el['file'],
            'problem': el['problem'], 'lost': el['lost']}
  ex = records.parse_sequence_example(el['raw'])
  key = _key(ex['filename'], el)
  key = tf.where(tf.equal(el['problem'], ''), key, el['base'])  # a cut shard: named by itself
  return {'frames': ex['frames'], 'label': ex['label'], 'key': key, 'file': el['file'],
          'problem': el['problem'], 'lost': el['lost']}


def _warn_uneven_shards(num_files: int, pc: int, pi: int) -> None:
  """Each process trains on its own shards (files[pi::pc]) at the same batch per step: with a
  shard count that is no multiple of the process count, the videos of a process holding one
  shard fewer are seen more often. Said (once, by process 0) when it is over 10%."""
  low, extra = divmod(num_files, pc)
  if pi == 0 and extra and (low + 1) / low > 1.1:
    logging.warning(
        'data.train_files: %d shards over %d processes: %d read %d shards each, the other '
        '%d read %d, so a video of the latter is trained on about %.2fx as often (prepare '
        '--num_shards with a multiple of %d evens it)', num_files, pc, extra, low + 1,
        pc - extra, low, (low + 1) / low, pc)


def _records(shards: Sequence[_Shard], *, epoch, seed_base, shuffle_files: bool,
             record_shard: Optional[Tuple[int, int]], fraction: float, num_parallel_calls: int):
  order = tf.range(len(shards))
  if shuffle_files:
    order = tf.random.experimental.stateless_shuffle(
        order, seed=tf.random.experimental.stateless_fold_in(seed_base, epoch))
  paths = tf.gather(tf.constant([s.path for s in shards]), order)
  if shards and all(s.index for s in shards):  # the same records in the same order
    meta, read = (paths, tf.gather(tf.constant([s.index for s in shards]), order)), \
        _read_index_file
  else:
    meta, read = (paths, tf.gather(tf.constant([s.size for s in shards], tf.int64), order),
                  tf.gather(tf.constant([s.expected for s in shards], tf.int64), order)), \
        _read_file
  ds = tf.data.Dataset.from_tensor_slices(meta).interleave(
      _graph(read), cycle_length=min(len(shards), _CYCLE_LENGTH), block_length=1,
      num_parallel_calls=num_parallel_calls, deterministic=True)
  if fraction < 1.0:  # a truncation marker is always kept
    ds = ds.filter(_graph(lambda el: tf.logical_or(
        tf.not_equal(el['problem'], ''), _keep_mask(el['base'], el['file_index'], fraction))))
  if record_shard is not None:
    ds = ds.shard(*record_shard)
  return ds


# ------------------------------------------------------------------ per-clip processing


def _train_clip(ex, cfg):
  seeds = tf.random.experimental.stateless_split(ex['_seed'], 6)
  n, fetch = _frame_source(ex)
  idx = sampling.train_indices(n, sampling=cfg.sampling, clip_len=cfg.num_frames,
                               interval=cfg.frame_interval, seed=seeds[0])
  encoded = fetch(idx)  # sample before decoding (and reading): only T JPEGs decoded
  # flips leave the channels reversed (bgr: ops.flip_bgr); normalize puts them back
  if cfg.randaugment_n > 0:
    video, bgr = _randaugment_clip(encoded, cfg, seeds)
  else:
    video = ops.decode_crop_resize(encoded, short_side=cfg.train_short_side, size=cfg.image_size,
                                   seed=seeds[1], area_range=tuple(cfg.area_range),
                                   aspect_ratio_range=tuple(cfg.aspect_ratio_range))
    video, bgr = ops.random_flip_bgr(video, cfg.flip_prob, seeds[2])
  video = ops.pca_lighting(video, cfg.color_jitter, seeds[4], bgr=bgr)
  video = ops.normalize(video, cfg.mean, cfg.std, bgr=bgr)
  video = ops.random_erasing(video, cfg.random_erasing_prob, seeds[5])
  video = tf.ensure_shape(video, [cfg.num_frames, cfg.image_size, cfg.image_size, 3])
  return {'video': video, 'label': ex['label'], '_epoch': ex['_epoch'], '_index': ex['_index']}


def _frame_source(ex):
  """(frame count, fetch) of a record: fetch(indices) -> the encoded frames at them, read
  from the shard through the frame index, or taken from the parsed record."""
  if 'offsets' in ex:
    def fetch(idx):
      return frame_index.read_frames(ex['file'], tf.gather(ex['offsets'], idx),
                                     tf.gather(ex['lengths'], idx))
    return tf.size(ex['offsets']), fetch
  return tf.shape(ex['frames'])[0], lambda idx: tf.gather(ex['frames'], idx)


def _randaugment_clip(encoded, cfg, seeds):
  """Crop, flip and imgaug RandAugment(n, m) with one resize: RandAugment's initial crop is
  folded into the random-resized-crop window, its flip merged with the recipe's flip.
  -> (clip, bgr), see `ops.flip_bgr`."""
  from data_pipelines import randaugment  # pylint: disable=g-import-not-at-top
  ra_flip, crop, order, signs, cutout_u = randaugment.draw(seeds[3], cfg.randaugment_n,
                                                           cfg.randaugment_m)
  recipe_flip = tf.logical_and(cfg.flip_prob > 0,
                               tf.random.stateless_uniform([], seeds[2]) < cfg.flip_prob)
  # crop sides are drawn after both flips (top, right, bottom, left): unflip them
  crop = tf.where(tf.not_equal(recipe_flip, ra_flip), tf.gather(crop, [0, 3, 2, 1]), crop)
  video = ops.decode_crop_resize(
      encoded, short_side=cfg.train_short_side, size=cfg.image_size, seed=seeds[1],
      area_range=tuple(cfg.area_range), aspect_ratio_range=tuple(cfg.aspect_ratio_range),
      window_fn=lambda top, left, h, w: randaugment.crop_window(top, left, h, w, crop,
                                                                cfg.image_size))
  video = tf.ensure_shape(tf.round(video), [cfg.num_frames, cfg.image_size, cfg.image_size, 3])
  return randaugment.randaugment_ops(video, tf.not_equal(recipe_flip, ra_flip), order, signs,
                                     cutout_u, cfg.randaugment_m)


def eval_views(frames: tf.Tensor, cfg: ml_collections.ConfigDict, *, split: str) -> tf.Tensor:
  """All test views of one video from its encoded frames -> (V, T, S, S, 3) normalised.

  V = crops * clips, crop-major then clip (the official layout). Validation resizes the short
  side to `train_short_side` (256), test to `test_short_side` (224), as the official recipe.
  """
  return _eval_views(tf.shape(frames)[0], lambda idx: tf.gather(frames, idx), cfg, split)


def _eval_views(n, fetch, cfg: ml_collections.ConfigDict, split: str) -> tf.Tensor:
  """`eval_views` of a video of n frames whose encoded frames `fetch(indices)` returns."""
  clips, crops = config_lib.views(cfg, split)
  idx = sampling.eval_indices(n, sampling=cfg.sampling, clip_len=cfg.num_frames,
                              interval=cfg.frame_interval, num_clips=clips)  # (clips, T)
  flat = tf.reshape(idx, [-1])  # (clips*T,)
  # Frames repeat when the video is shorter than the clips (offsets 0, indices wrapped):
  # read and decode each distinct frame once.
  uniq, pos = tf.unique(flat)
  decoded = tf.cond(tf.size(uniq) < tf.size(flat),
                    lambda: tf.gather(ops.decode_frames(fetch(uniq)), pos),
                    lambda: ops.decode_frames(fetch(flat)))
  return eval_views_from_frames(decoded, cfg, split=split)


def eval_views_from_frames(frames: tf.Tensor, cfg: ml_collections.ConfigDict, *,
                           split: str) -> tf.Tensor:
  """(clips*T, H, W, 3) sampled frames -> (V, T, S, S, 3) normalised views."""
  clips, crops = config_lib.views(cfg, split)
  t, size = cfg.num_frames, cfg.image_size
  short = cfg.test_short_side if split == 'test' else cfg.train_short_side
  frames = ops.resize_short_side(frames, short)
  if crops == 1:
    views = ops.normalize(ops.center_crop(frames, size), cfg.mean, cfg.std)[None]
  elif crops == 3:
    # normalise the frames once (1.33x a view at 224x298), then slice three views: less work
    # than normalising the three views, and the same values (normalising is per pixel)
    views = ops.three_crop(ops.normalize(frames, cfg.mean, cfg.std), size)
  elif crops == 10:
    views = ten_crop(ops.normalize(frames, cfg.mean, cfg.std), size)  # (10, clips*T, S, S, 3)
  else:
    raise errors.ConfigError(f'data.{split}_crops must be 1, 3 or 10, got {crops}')
  return tf.reshape(views, [crops * clips, t, size, size, 3])  # crop-major, then clip


def ten_crop(frames: tf.Tensor, size: int) -> tf.Tensor:
  """mmaction2 TenCrop -> (10, T, size, size, 3): upper left, upper right, lower left, lower
  right, centre at offsets 0, 4*step, 2*step (step = (side - size)//4 on each axis), each
  followed by its horizontal flip."""
  shape = tf.shape(frames)
  hs, ws = (shape[1] - size) // 4, (shape[2] - size) // 4
  views = []
  for x, y in ((0, 0), (4, 0), (0, 4), (4, 4), (2, 2)):
    crop = frames[:, y * hs:y * hs + size, x * ws:x * ws + size, :]
    views += [crop, tf.reverse(crop, axis=[2])]
  return tf.stack(views, axis=0)


def _options(cfg: ml_collections.ConfigDict, deterministic: bool = True) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic
  options.experimental_optimization.map_parallelization = True
  options.autotune.enabled = bool(cfg.autotune)
  return options


# ------------------------------------------------------------------ public builders


def make_train_dataset(data_cfg: ml_collections.ConfigDict, *, batch_size: int, seed: int,
                       process_index: Optional[int] = None, process_count: Optional[int] = None,
                       start_step: int = 0) -> Iterator[Dict[str, np.ndarray]]:
  """Infinite iterator of {'video': f32 (B,T,H,W,3), 'label': i32 (B,)}; B per process."""
  cfg = data_cfg
  if cfg.source == 'synthetic':   # it makes the same checks
    return synthetic.make_train_dataset(cfg, batch_size=batch_size, seed=seed,
                                        process_index=process_index,
                                        process_count=process_count, start_step=start_step)
  config_lib.check_views(cfg)  # evaluation uses them: fail now, not hours later
  pi, pc = config_lib.process_slot(process_index, process_count)
  par = tf.data.AUTOTUNE if cfg.num_parallel_calls < 0 else cfg.num_parallel_calls
  seed_base = tf.constant([seed, pi], tf.int64)
  stats = SkipStats()
  if cfg.source == 'tfds':
    from data_pipelines import tfds_source  # pylint: disable=g-import-not-at-top
    epoch_records, per_epoch = tfds_source.train_epochs(cfg, pi, pc, seed_base)
  elif cfg.source == 'tfrecord':
    files = list_files(cfg.train_files, 'train_files')
    if len(files) >= pc:
      _warn_uneven_shards(len(files), pc, pi)
      files, record_shard = files[pi::pc], None
      files_seed = seed_base
    else:  # fewer shards than processes: every process reads all, keeps every pc-th record
      record_shard = (pc, pi)
      # of one and the same stream: the shard order is drawn alike by every process (with
      # its own seed each process read the shards in another order, and the pc-th records
      # of different streams overlapped: some videos twice an epoch, others never)
      files_seed = tf.constant([seed, -1], tf.int64)
    per_epoch = None
    shards = _shard_meta(files)
    _use_index(shards, cfg.frame_index)

    def epoch_records(epoch):
      return _records(shards, epoch=epoch, seed_base=files_seed, shuffle_files=True,
                      record_shard=record_shard, fraction=cfg.train_fraction,
                      num_parallel_calls=par).map(_graph(_parse))
  else:
    raise errors.ConfigError(f"data.source must be 'tfrecord', 'tfds' or 'synthetic', got "
                             f'{cfg.source!r}')

  if per_epoch is None and cfg.source == 'tfrecord':
    # Records per epoch of this process: from the prepare JSON files when every shard has
    # one (no reading); otherwise counted by reading, but only when resuming needs it. Without
    # it, decode errors at an epoch's end are not counted (named skips still are).
    if start_step or all(s.records >= 0 for s in shards):
      per_epoch = _kept_positions(_count_records(shards), cfg.train_fraction)
      if record_shard is not None:
        per_epoch = len(range(pi, per_epoch, pc))
  start_epoch, offset = 0, 0
  if start_step:
    if not per_epoch:
      raise errors.DataError(f'no training records for process {pi} of {pc} in '
                             'data.train_files')
    start_epoch, offset = divmod(start_step * batch_size, per_epoch)

  def one_epoch(epoch):
    ds = epoch_records(epoch)
    ds = ds.shuffle(cfg.shuffle_buffer, seed=epoch * 1_000_003 + seed * 7919 + pi,
                    reshuffle_each_iteration=False)
    ds = ds.enumerate()
    epoch_seed = tf.random.experimental.stateless_fold_in(seed_base, epoch)

    def tag(i, ex):
      ex = dict(ex)
      ex['_epoch'], ex['_index'] = epoch, i
      ex['_seed'] = tf.random.experimental.stateless_fold_in(epoch_seed, i)
      return ex
    return ds.map(_graph(tag))

  first = one_epoch(tf.constant(start_epoch, tf.int64)).skip(offset)
  rest = tf.data.Dataset.range(start_epoch + 1, 2**62).flat_map(_graph(one_epoch))
  ds = first.concatenate(rest)
  ds = _stop_above_skip_rate(ds, cfg.num_classes, cfg.max_skip_rate, cfg.skip_rate_min_examples)
  ds = ds.filter(_graph(lambda ex: _check_valid(ex, cfg.num_classes, stats)))
  ds = ds.map(_graph(lambda ex: _train_clip(ex, cfg)), num_parallel_calls=par,
              deterministic=True)
  ds = ds.ignore_errors(log_warning=True)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(cfg.prefetch)
  ds = ds.with_options(_options(cfg))
  return _BatchIterator(ds, stats, cfg.max_skip_rate, cfg.skip_rate_min_examples,
                        ('video', 'label'), epoch_size=per_epoch, start=(start_epoch, offset),
                        infinite=True)


def make_eval_dataset(data_cfg: ml_collections.ConfigDict, *, split: str, batch_size: int,
                      process_index: Optional[int] = None,
                      process_count: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
  """Finite iterator of {'video': f32 (B,V,T,H,W,3), 'label': i32 (B,), 'key': bytes (B,)}.

  Records are split across processes by position (every pc-th record), so each process
  holds the same number of videos to within one and every video is seen exactly once.
  """
  cfg = data_cfg
  if cfg.source == 'synthetic':   # it makes the same checks
    return synthetic.make_eval_dataset(cfg, split=split, batch_size=batch_size,
                                       process_index=process_index, process_count=process_count)
  config_lib.views(cfg, split)
  pi, pc = config_lib.process_slot(process_index, process_count)
  par = tf.data.AUTOTUNE if cfg.num_parallel_calls < 0 else cfg.num_parallel_calls
  stats = SkipStats()
  if cfg.source == 'tfds':
    from data_pipelines import tfds_source  # pylint: disable=g-import-not-at-top
    ds = tfds_source.eval_records(cfg, split, pi, pc)
    size = None
  elif cfg.source == 'tfrecord':
    shards = _shards(split_files(cfg, split), cfg.frame_index)
    ds = _records(shards, epoch=0, seed_base=None, shuffle_files=False, record_shard=(pc, pi),
                  fraction=1.0, num_parallel_calls=par).map(_graph(_parse))
    size = len(range(pi, sum(s.positions for s in shards), pc))
  else:
    raise errors.ConfigError(f"data.source must be 'tfrecord', 'tfds' or 'synthetic', got "
                             f'{cfg.source!r}')

  def tag(i, ex):
    ex = dict(ex)
    ex['_epoch'], ex['_index'] = tf.constant(0, tf.int64), i
    return ex

  ds = ds.enumerate().map(_graph(tag))
  ds = ds.filter(_graph(lambda ex: _check_valid(ex, cfg.num_classes, stats)))

  def clip(ex):
    return {'video': _eval_views(*_frame_source(ex), cfg, split), 'label': ex['label'],
            'key': ex['key'], '_epoch': ex['_epoch'], '_index': ex['_index']}

  ds = ds.map(_graph(clip), num_parallel_calls=par, deterministic=True).ignore_errors(
      log_warning=True)
  ds = ds.batch(batch_size, drop_remainder=False).prefetch(cfg.prefetch)
  ds = ds.with_options(_options(cfg))
  # Evaluation never stops for bad clips: they are counted and listed in `.stats`.
  return _BatchIterator(ds, stats, 1.0, 1 << 62, ('video', 'label', 'key'), epoch_size=size)
