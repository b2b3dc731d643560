"""DMVR record layout: one `tf.train.SequenceExample` per video.

Keys follow deepmind/dmvr (docs/formats.md#dmvr-records) so shards made for DMVR readers (Scenic's
ViViT among others) read here and ours read there:

  feature_lists['image/encoded']   one bytes feature per frame (JPEG)
  context['clip/label/index']      int64 list (multi-label capable; we use the first)
  context['clip/label/text']       bytes, the class name ("text", not "string")
  context['video/filename']        bytes, the video id (our evaluation key)
  context['clip/start/timestamp']  int64 microseconds (optional)
  context['clip/end/timestamp']    int64 microseconds (optional)

Shards are named `NAME-SPLIT.tfrecord-00003-of-00064`.
"""

from typing import Optional, Sequence

IMAGE_KEY = 'image/encoded'
LABEL_INDEX_KEY = 'clip/label/index'
LABEL_TEXT_KEY = 'clip/label/text'
FILENAME_KEY = 'video/filename'
START_KEY = 'clip/start/timestamp'
END_KEY = 'clip/end/timestamp'


def shard_name(name: str, split: str, index: int, num_shards: int) -> str:
  """`NAME-SPLIT.tfrecord-00003-of-00064`, the DMVR/Scenic naming."""
  return f'{name}-{split}.tfrecord-{index:05d}-of-{num_shards:05d}'


def make_sequence_example(frames_jpeg: Sequence[bytes], label: int, label_text: str = '',
                          filename: str = '', start_us: Optional[int] = None,
                          end_us: Optional[int] = None):
  """Builds the DMVR SequenceExample of one video (JPEG frames already encoded)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  seq = tf.train.SequenceExample()
  ctx = seq.context.feature
  ctx[LABEL_INDEX_KEY].int64_list.value.append(int(label))
  ctx[LABEL_TEXT_KEY].bytes_list.value.append(label_text.encode('utf-8'))
  ctx[FILENAME_KEY].bytes_list.value.append(filename.encode('utf-8'))
  if start_us is not None:
    ctx[START_KEY].int64_list.value.append(int(start_us))
  if end_us is not None:
    ctx[END_KEY].int64_list.value.append(int(end_us))
  frames = seq.feature_lists.feature_list[IMAGE_KEY]
  for jpeg in frames_jpeg:
    frames.feature.add().bytes_list.value.append(jpeg)
  return seq


def parse_sequence_example(serialized):
  """Parses one serialized record into encoded frames, label and key (no JPEG decoding).

  Returns a dict: 'frames' string (N,), 'label' int32 (first label index, -1 if absent),
  'label_count' int32, 'filename' string ('' if absent).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  context, sequence = tf.io.parse_single_sequence_example(
      serialized,
      context_features={
          LABEL_INDEX_KEY: tf.io.VarLenFeature(tf.int64),
          FILENAME_KEY: tf.io.FixedLenFeature([], tf.string, default_value=''),
      },
      sequence_features={IMAGE_KEY: tf.io.FixedLenSequenceFeature([], tf.string)})
  labels = tf.sparse.to_dense(context[LABEL_INDEX_KEY])
  label = tf.cond(tf.size(labels) > 0, lambda: tf.cast(labels[0], tf.int32),
                  lambda: tf.constant(-1, tf.int32))
  return {
      'frames': sequence[IMAGE_KEY],
      'label': label,
      'label_count': tf.size(labels, out_type=tf.int32),
      'filename': context[FILENAME_KEY],
  }
