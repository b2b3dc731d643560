"""Training scalars as TensorBoard event files (`WORKDIR/tensorboard/events.out.tfevents.*`).

`tf.summary` writes them when TensorFlow is installed: the tf.data input pipeline has
already imported it, so this costs nothing. Without TensorFlow (an accelerator host that
only runs the model and the benchmark) tensorboardX writes the same scalars; it is not the
first choice because importing it also imports torch when torch is installed, which adds
seconds to every training process.
"""

from __future__ import annotations

import importlib.util


class ScalarWriter:
  """`scalar(tag, value, step)`, `flush()`, `close()` over one TensorBoard log directory."""

  def __init__(self, logdir: str, backend: str = 'auto'):
    if backend == 'auto':
      backend = 'tf' if importlib.util.find_spec('tensorflow') is not None else 'tensorboardx'
    if backend == 'tf':
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._writer = tf.summary.create_file_writer(logdir)
      # `tf.summary.scalar` lives in the tensorboard package, which tensorflow-cpu does not
      # install; the core `tf.summary.write` with the scalars plugin's metadata writes the
      # same event.
      self._metadata = tf.compat.v1.SummaryMetadata()
      self._metadata.plugin_data.plugin_name = 'scalars'
    elif backend == 'tensorboardx':
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tf = None
      self._writer = SummaryWriter(logdir)
    else:
      raise ValueError(f"ScalarWriter backend must be 'auto', 'tf' or 'tensorboardx', got "
                       f'{backend!r}')
    self.backend = backend

  def scalar(self, tag: str, value: float, step: int) -> None:
    if self._tf is not None:
      with self._writer.as_default():
        self._tf.summary.write(tag, self._tf.constant(float(value), self._tf.float32),
                               step=int(step), metadata=self._metadata)
    else:
      self._writer.add_scalar(tag, float(value), int(step))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()
