"""Frame index of a DMVR shard: where each frame's JPEG lies in the file.

A training clip uses 8-32 frames of a video that has 250-300 (10 s of Kinetics at 25-30 fps),
yet a TFRecord reader reads, CRC-checks and parses the whole record (7.8 MB at 300 frames of
256-px JPEGs) to find them, and the shuffle buffer holds whole records. With an index beside
the shard, the pipeline reads the small index entries instead, samples the frame indices
from the frame count, and reads only the sampled JPEGs (a seek and a read each): the same
frames, the same clip, a fraction of the bytes (BENCHMARKS.md, "Frame index").

The shards stay DMVR records, read by DMVR and Scenic as before; the index is a sidecar:

  DIR/.NAME-SPLIT.tfrecord-00003-of-00064.frames   (hidden; the reader skips hidden names,
                                                    which tf.io.gfile.glob matches)

It is itself a TFRecord file of `tf.train.Example`s: first a header

  'magic'        b'aim-jax frame index v1'
  'shard_bytes'  the shard's size in bytes when indexed (a shard of another size is not
                 the one indexed: the reader then ignores the index and says so)
  'records'      records in the shard

then one entry per record, in file order:

  'offset'       int64 (N,): byte offset in the shard of each frame's JPEG
  'length'       int64 (N,): its length in bytes
  'label'        int64: the first `clip/label/index` (-1 if none)
  'filename'     bytes: `video/filename`, else `video_id`, else b''
  'jpeg'         int64: 1 if every frame starts with the JPEG SOI marker

`python -m data_pipelines.prepare` writes it with every shard; for shards written by other
tools (DMVR's `generate_from_file.py`, Scenic users' scripts) build it with

  python -m data_pipelines.frame_index 'data/tfrecords/k400-train.tfrecord-*' --num_workers 8

It indexes every file it can; one that is not a TFRecord of SequenceExamples, or is truncated,
gets one line naming it (and no index), and the exit status is then 2, as it is for a glob that
matches nothing.
"""

from __future__ import annotations

import glob as glob_lib
import os
import re
import struct
import sys
from typing import List, Optional, Sequence, Tuple

from absl import logging

MAGIC = b'aim-jax frame index v1'
_HEADER = 12  # TFRecord framing before a record's data: length (8 B) and its CRC (4 B)
_FOOTER = 4   # the data's CRC


def index_path(shard_path: str) -> str:
  """`DIR/.NAME.tfrecord-00003-of-00064.frames` for `DIR/NAME.tfrecord-00003-of-00064`."""
  d, base = os.path.split(shard_path)
  return os.path.join(d, f'.{base}.frames')


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def frame_spans(data: bytes, frames: Sequence[bytes]) -> List[Tuple[int, int]]:
  """(position in `data`, length) of each frame's bytes inside one serialized record.

  Each frame is a `BytesList.value` (field 1, wire type 2: tag 0x0a, then the length as a
  varint, then the bytes), stored in order; every span found is checked to be preceded by
  exactly that tag and length, so a JPEG that also occurs elsewhere cannot be mistaken.
  """
  spans = []
  pos = 0
  for k, jpeg in enumerate(frames):
    prefix = b'\x0a' + _varint(len(jpeg))
    i = data.find(prefix + jpeg, pos)
    if i < 0:
      raise ValueError(f'frame {k} ({len(jpeg)} bytes) not found in the serialized record')
    start = i + len(prefix)
    spans.append((start, len(jpeg)))
    pos = start + len(jpeg)
  return spans


def _parsed(data: bytes):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from data_pipelines import records  # pylint: disable=g-import-not-at-top
  seq = tf.train.SequenceExample.FromString(data)
  frames = list(seq.feature_lists.feature_list[records.IMAGE_KEY].feature)
  jpegs = []
  for f in frames:
    jpegs.extend(f.bytes_list.value)
  ctx = seq.context.feature
  labels = list(ctx[records.LABEL_INDEX_KEY].int64_list.value) if records.LABEL_INDEX_KEY in ctx \
      else []
  filename = b''
  for key in (records.FILENAME_KEY, records.VIDEO_ID_KEY):
    if key in ctx and ctx[key].bytes_list.value and ctx[key].bytes_list.value[0]:
      filename = ctx[key].bytes_list.value[0]
      break
  return jpegs, (labels[0] if labels else -1), filename


def entry(record_offset: int, data: bytes, jpegs: Sequence[bytes], label: int,
          filename: bytes) -> bytes:
  """The serialized index entry of the record whose data starts at `record_offset` + 12 in
  the shard. `jpegs`, `label`, `filename` are what the record `data` holds."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  spans = frame_spans(data, jpegs)
  base = record_offset + _HEADER
  ex = tf.train.Example()
  f = ex.features.feature
  f['offset'].int64_list.value.extend([base + s for s, _ in spans])
  f['length'].int64_list.value.extend([n for _, n in spans])
  f['label'].int64_list.value.append(int(label))
  f['filename'].bytes_list.value.append(filename)
  f['jpeg'].int64_list.value.append(int(all(j[:2] == b'\xff\xd8' for j in jpegs)))
  return ex.SerializeToString()


def header(shard_bytes: int, records: int) -> bytes:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ex = tf.train.Example()
  f = ex.features.feature
  f['magic'].bytes_list.value.append(MAGIC)
  f['shard_bytes'].int64_list.value.append(int(shard_bytes))
  f['records'].int64_list.value.append(int(records))
  return ex.SerializeToString()


def record_size(data: bytes) -> int:
  """Bytes a record of this data takes in an uncompressed TFRecord file."""
  return _HEADER + len(data) + _FOOTER


def write(shard_path: str, entries: Sequence[bytes], shard_bytes: int) -> str:
  """Writes the index of `shard_path` (atomically: a reader never sees half of one)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = index_path(shard_path)
  tmp = path + '.tmp'
  with tf.io.TFRecordWriter(tmp) as w:
    w.write(header(shard_bytes, len(entries)))
    for e in entries:
      w.write(e)
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return path


def tf_error_line(message: str) -> str:
  """The first line of a TensorFlow op error without its internals: `{{function_node
  __wrapped__IteratorGetNext...}} corrupted record at 0 [Op:IteratorGetNext] name: ` ->
  `corrupted record at 0`."""
  lines = (message or '').strip().splitlines()
  line = re.sub(r'\{\{[^}]*\}\}', '', lines[0] if lines else '')
  line = re.sub(r'\s*\[Op:[^\]]*\](\s*name:.*)?$', '', line)
  return ' '.join(line.split())


def build(shard_path: str) -> dict:
  """Reads a shard record by record and writes its index; returns {records, frames, bytes}.
  ValueError naming the shard (nothing written) for a file that is not a TFRecord of
  SequenceExamples, or is truncated."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from google.protobuf import message  # pylint: disable=g-import-not-at-top
  size = int(tf.io.gfile.stat(shard_path).length)
  entries, offset, frames = [], 0, 0
  try:
    for raw in tf.data.TFRecordDataset(shard_path).as_numpy_iterator():
      try:
        jpegs, label, filename = _parsed(raw)
      except message.DecodeError as err:
        raise ValueError(f'{shard_path}: record {len(entries)} is not a tf.train.SequenceExample '
                         f'({str(err).splitlines()[0]}); not indexed') from None
      entries.append(entry(offset, raw, jpegs, label, filename))
      frames += len(jpegs)
      offset += record_size(raw)
  except tf.errors.DataLossError as err:
    raise ValueError(f'{shard_path}: truncated or corrupt after {len(entries)} records '
                     f'({tf_error_line(err.message)}); not indexed') from None
  except tf.errors.OpError as err:   # no permission, say
    raise ValueError(f'{shard_path}: cannot be read ({tf_error_line(err.message)}); '
                     'not indexed') from None
  if offset != size:
    raise ValueError(f'{shard_path}: records cover {offset} of {size} bytes (a compressed or '
                     'damaged file?); not indexed')
  write(shard_path, entries, size)
  return {'records': len(entries), 'frames': frames, 'bytes': size}


def read_header(path: str) -> Tuple[int, int]:
  """(shard_bytes, records) from an index's header; ValueError naming the file if it is not
  a frame index."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.io.gfile.GFile(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f'{path}: not a frame index (empty or cut)')
    (n,) = struct.unpack('<Q', head)
    f.read(4)
    data = f.read(n) if n < (1 << 20) else b''
  try:
    ex = tf.train.Example.FromString(data)
  except Exception:  # pylint: disable=broad-except
    raise ValueError(f'{path}: not a frame index (header does not parse)') from None
  feat = ex.features.feature
  if 'magic' not in feat or list(feat['magic'].bytes_list.value) != [MAGIC]:
    raise ValueError(f'{path}: not a frame index (no {MAGIC.decode()!r} header)')
  return int(feat['shard_bytes'].int64_list.value[0]), int(feat['records'].int64_list.value[0])


def valid_index(shard_path: str, shard_bytes: int) -> Optional[Tuple[str, int]]:
  """(index path, records) when the shard has an index made for a file of its size, else
  None (a missing index silently; a stale or unreadable one with a warning naming it)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = index_path(shard_path)
  if not tf.io.gfile.exists(path):
    return None
  try:
    indexed_bytes, records = read_header(path)
  except (ValueError, OSError) as err:
    logging.warning('Ignoring frame index %s: %s', path, err)
    return None
  if indexed_bytes != shard_bytes:
    logging.warning('Ignoring frame index %s: it describes a shard of %d bytes, %s is %d bytes '
                    '(rebuild it: python -m data_pipelines.frame_index %s)', path, indexed_bytes,
                    shard_path, shard_bytes, shard_path)
    return None
  return path, records


def parse_entry(raw):
  """In-graph: one serialized index entry -> offsets, lengths, label, filename, jpeg_ok."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  f = tf.io.parse_single_example(raw, {
      'offset': tf.io.VarLenFeature(tf.int64),
      'length': tf.io.VarLenFeature(tf.int64),
      'label': tf.io.FixedLenFeature([], tf.int64, default_value=-1),
      'filename': tf.io.FixedLenFeature([], tf.string, default_value=''),
      'jpeg': tf.io.FixedLenFeature([], tf.int64, default_value=0),
  })
  return {'offsets': tf.sparse.to_dense(f['offset']), 'lengths': tf.sparse.to_dense(f['length']),
          'label': tf.cast(f['label'], tf.int32), 'filename': f['filename'],
          'jpeg_ok': tf.equal(f['jpeg'], 1)}


def _read_spans(path, offsets, lengths, covering=None):
  """numpy_function body: the bytes at each (offset, length) of one file.

  A local file gets a seek and a read per frame. A remote one (`gs://`, any URL that
  tf.io.gfile reads) gets one read of the byte range covering all the frames, sliced in
  memory: each read there is a request with its own latency, so one covering read of at
  most the record beats T small ones. `covering` forces either way (tests).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  path = path.decode() if isinstance(path, bytes) else str(path)
  remote = '://' in path
  if remote:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    opener = lambda: tf.io.gfile.GFile(path, 'rb')
  else:
    opener = lambda: open(path, 'rb')  # pylint: disable=consider-using-with
  offsets, lengths = offsets.tolist(), lengths.tolist()
  out = []
  with opener() as f:
    if (remote if covering is None else covering) and offsets:
      lo = min(offsets)
      hi = max(o + n for o, n in zip(offsets, lengths))
      f.seek(lo)
      blob = f.read(hi - lo)
      if len(blob) != hi - lo:
        raise ValueError(f'{path}: bytes {lo}-{hi} are past the end of the file')
      out = [blob[o - lo:o - lo + n] for o, n in zip(offsets, lengths)]
    else:
      for o, n in zip(offsets, lengths):
        f.seek(o)
        b = f.read(n)
        if len(b) != n:
          raise ValueError(f'{path}: frame at byte {o} ({n} bytes) is past the end of the file')
        out.append(b)
  return np.array(out, dtype=object)


def read_frames(path, offsets, lengths):
  """In-graph: the encoded frames at `offsets`/`lengths` (int64 (T,)) of shard `path`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = tf.numpy_function(_read_spans, [path, offsets, lengths], tf.string, stateful=False)
  return tf.reshape(out, tf.shape(offsets))


# ------------------------------------------------------------------ command line


def _build_one(path: str):
  try:
    return path, build(path), None
  except (ValueError, OSError) as err:
    return path, None, str(err)


def main(argv: Optional[Sequence[str]] = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(
      prog='python -m data_pipelines.frame_index',
      description='Writes the frame index beside each DMVR shard (see the module docstring).')
  p.add_argument('shards', nargs='+', help='shard paths or glob patterns')
  p.add_argument('--num_workers', type=int, default=0, help='processes (0: this one)')
  args = p.parse_args(argv)
  paths: List[str] = []
  for pattern in args.shards:
    found = sorted(glob_lib.glob(pattern)) if any(c in pattern for c in '*?[') else [pattern]
    if not found:
      print(f'frame_index: no file matches {pattern}', file=sys.stderr)
      return 2
    paths.extend(found)
  for path in paths:
    if not os.path.isfile(path):
      print(f'frame_index: {path}: no such file', file=sys.stderr)
      return 2
  if args.num_workers > 0:
    import multiprocessing  # pylint: disable=g-import-not-at-top
    with multiprocessing.get_context('spawn').Pool(args.num_workers) as pool:
      results = pool.map(_build_one, paths)
  else:
    results = [_build_one(p) for p in paths]
  failed = 0
  for path, stats, err in results:
    if err:
      failed += 1
      print(f'frame_index: {err}', file=sys.stderr)
    else:
      print(f'{index_path(path)}: {stats["records"]} records, {stats["frames"]} frames')
  return 2 if failed else 0   # a file that cannot be indexed is the user's to fix


if __name__ == '__main__':
  sys.exit(main())
