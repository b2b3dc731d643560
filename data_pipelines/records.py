"""DMVR record layout: one `tf.train.SequenceExample` per video.

Keys follow deepmind/dmvr (its `modalities.py` readers and `examples/generate_from_file.py`
writer; docs/formats.md#dmvr-records), so shards made for DMVR readers (Scenic's ViViT among
others) read here and ours read there:

  feature_lists['image/encoded']   one bytes feature per frame (JPEG)
  context['clip/label/index']      int64 list (multi-label capable; training uses the first)
  context['clip/label/text']       bytes list, the class name(s) (DMVR's writer and `add_label`)
  context['clip/label/string']     bytes list, the class name(s) (the other spelling in use)
  context['caption/string']        bytes list, free-text captions (DMVR's `add_text`)
  context['video/filename']        bytes, the video (our evaluation key; DMVR writes the path)
  context['video_id']              bytes, a video id some DMVR-style writers use instead
  context['clip/start/timestamp']  int64 microseconds (optional)
  context['clip/end/timestamp']    int64 microseconds (optional)

Every one of these is optional except the frames; the parser returns them all (docs/data.md).
Shards are named `NAME-SPLIT.tfrecord-00003-of-00064`.
"""

from typing import Optional, Sequence

IMAGE_KEY = 'image/encoded'
LABEL_INDEX_KEY = 'clip/label/index'
LABEL_TEXT_KEY = 'clip/label/text'
LABEL_STRING_KEY = 'clip/label/string'
CAPTION_KEY = 'caption/string'
FILENAME_KEY = 'video/filename'
VIDEO_ID_KEY = 'video_id'
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
  """Parses one serialized record into encoded frames and every DMVR context field.

  No JPEG is decoded. Returns a dict:
    'frames'       string (N,), the encoded frames
    'label'        int32, the first label index (-1 if none)
    'labels'       int32 (L,), every label index
    'label_count'  int32, L
    'label_text'   string (L',), the class names: `clip/label/text`, else `clip/label/string`
    'caption'      string (C,), every `caption/string`
    'filename'     string, `video/filename`, else `video_id`, else ''
    'start_us', 'end_us'  int64 clip timestamps in microseconds (-1 if absent)
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  context, sequence = tf.io.parse_single_sequence_example(
      serialized,
      context_features={
          LABEL_INDEX_KEY: tf.io.VarLenFeature(tf.int64),
          LABEL_TEXT_KEY: tf.io.VarLenFeature(tf.string),
          LABEL_STRING_KEY: tf.io.VarLenFeature(tf.string),
          CAPTION_KEY: tf.io.VarLenFeature(tf.string),
          FILENAME_KEY: tf.io.FixedLenFeature([], tf.string, default_value=''),
          VIDEO_ID_KEY: tf.io.FixedLenFeature([], tf.string, default_value=''),
          START_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
          END_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
      },
      # allow_missing: a record without frames (DMVR's writer then writes no frame list)
      # parses to zero frames, which the reader reports, instead of failing to parse.
      sequence_features={IMAGE_KEY: tf.io.FixedLenSequenceFeature([], tf.string,
                                                                  allow_missing=True)})
  labels = tf.cast(tf.sparse.to_dense(context[LABEL_INDEX_KEY]), tf.int32)
  label = tf.cond(tf.size(labels) > 0, lambda: labels[0], lambda: tf.constant(-1, tf.int32))
  text = tf.sparse.to_dense(context[LABEL_TEXT_KEY])
  string = tf.sparse.to_dense(context[LABEL_STRING_KEY])
  filename = context[FILENAME_KEY]
  return {
      'frames': sequence[IMAGE_KEY],
      'label': label,
      'labels': labels,
      'label_count': tf.size(labels, out_type=tf.int32),
      'label_text': tf.cond(tf.size(text) > 0, lambda: text, lambda: string),
      'caption': tf.sparse.to_dense(context[CAPTION_KEY]),
      'filename': tf.where(tf.equal(filename, ''), context[VIDEO_ID_KEY], filename),
      'start_us': context[START_KEY],
      'end_us': context[END_KEY],
  }
