"""Video input pipelines: `input_pipeline` (tf.data on DMVR-layout TFRecords and TFDS),
`synthetic` (NumPy, for smoke runs), both with `count_examples`, `make_train_dataset` and
`make_eval_dataset`."""

import types


def for_source(source: str) -> types.ModuleType:
  """The pipeline module of a `data.source`; only the tf.data one imports TensorFlow."""
  if source == 'synthetic':
    from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic
  from data_pipelines import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline  # it names the source when it is none of its own
