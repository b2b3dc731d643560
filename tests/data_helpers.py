"""Helpers for the data tests: real videos made with PyAV, records with plain tf.train."""


import numpy as np


def frame_value(i: int) -> int:
  """Grey level of frame i in test videos: distinct and robust to H.264 + JPEG rounding."""
  assert 0 <= i <= 51, i
  return 5 * i


def make_video(path: str, num_frames: int, height: int = 64, width: int = 96, fps: int = 25,
               faststart: bool = False):
  """Writes an H.264 mp4 whose frame i is flat grey `frame_value(i)` in R and B, and a
  left-to-right ramp in G (so crops and flips can be seen after decoding). `faststart` puts
  the index (moov) before the frames (mdat), as `ffmpeg -movflags +faststart` does."""
  import av
  ramp = np.linspace(0, 255, width).astype(np.uint8)
  with av.open(path, 'w', options={'movflags': '+faststart'} if faststart else {}) as out:
    stream = out.add_stream('libx264', rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, 'yuv444p'
    stream.options = {'crf': '0', 'preset': 'ultrafast'}
    for i in range(num_frames):
      img = np.empty((height, width, 3), np.uint8)
      img[..., 0] = frame_value(i)
      img[..., 1] = ramp[None, :]
      img[..., 2] = frame_value(i)
      frame = av.VideoFrame.from_ndarray(img, format='rgb24')
      for packet in stream.encode(frame):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  return path


def frame_index(value: float) -> int:
  return int(round(value / 5.0))


def write_dmvr_records(path: str, videos):
  """Plain tf.train code following the DMVR layout (no project code).

  videos: list of (key, label, frames uint8 (N,H,W,3)).
  """
  import tensorflow as tf
  with tf.io.TFRecordWriter(path) as w:
    for key, label, frames in videos:
      seq = tf.train.SequenceExample()
      seq.context.feature['clip/label/index'].int64_list.value[:] = [label]
      seq.context.feature['clip/label/text'].bytes_list.value[:] = [f'class{label}'.encode()]
      seq.context.feature['video/filename'].bytes_list.value[:] = [key.encode()]
      fl = seq.feature_lists.feature_list['image/encoded']
      for f in frames:
        fl.feature.add().bytes_list.value[:] = [tf.io.encode_jpeg(f, quality=100).numpy()]
      w.write(seq.SerializeToString())


def dmvr_generator_record(jpegs, *, video_path: str, start: float, end: float,
                          label_name=None, caption=None, label_map=None, audio=None):
  """A SequenceExample built step by step as DMVR's `examples/generate_from_file.py` builds
  one (`generate_sequence_example`): label index and text, caption, one bytes feature per
  frame, optional waveform, the video path and the clip's start/end in microseconds.
  Plain tf.train only (no project code)."""
  import tensorflow as tf
  seq = tf.train.SequenceExample()
  if label_name:
    seq.context.feature['clip/label/index'].int64_list.value[:] = (label_map[label_name],)
    seq.context.feature['clip/label/text'].bytes_list.value[:] = (label_name.encode(),)
  if caption:
    seq.context.feature['caption/string'].bytes_list.value[:] = (caption.encode(),)
  for jpeg in jpegs:
    seq.feature_lists.feature_list['image/encoded'].feature.add().bytes_list.value[:] = [jpeg]
  if audio is not None:
    seq.feature_lists.feature_list['WAVEFORM/feature/floats'].feature.add(
    ).float_list.value[:] = audio
  seq.context.feature['video/filename'].bytes_list.value[:] = (video_path.encode(),)
  seq.context.feature['clip/start/timestamp'].int64_list.value[:] = (int(1000000 * start),)
  seq.context.feature['clip/end/timestamp'].int64_list.value[:] = (int(1000000 * end),)
  return seq


def truncate_mp4(src: str, dst: str, keep: float = 0.5) -> str:
  """Copies a faststart mp4 cut `keep` of the way through its frame data (mdat): the index
  still opens, the frames after the cut are gone (an interrupted download or copy)."""
  data = open(src, 'rb').read()
  moov, mdat = data.find(b'moov'), data.find(b'mdat')
  assert 0 < moov < mdat, 'not a faststart mp4'
  with open(dst, 'wb') as f:
    f.write(data[:mdat + int((len(data) - mdat) * keep)])
  return dst
