"""Sharded multi-view evaluation (no TensorFlow, no file I/O).

AIM's reported numbers are multi-view: each video is seen as V = crops x clips
views, the V logits are turned into softmax probabilities and averaged
(official `test_cfg.average_clips='prob'`), and the video's top-1 / top-5 is
read from that average. Here the V views are folded into the batch
(B, V, T, H, W, C) -> (B*V, T, H, W, C) and that axis is sharded over the
mesh's batch axes, so views and videos are spread over every device of every
host.

Every video counts exactly once. Each process pads its last (ragged) batch
with zero videos up to a fixed per-process batch size and remembers how many
rows are real; the padded rows are computed and thrown away on the host. When
hosts run out of data at different steps (process-sharded files), a host with
nothing left feeds an all-padding batch until every host is done, because
each step is a collective over the whole mesh.

Per-video predictions stay on the process that read the video (reports write
one file per process); the metrics are reduced over processes through the
confusion matrix, which holds everything top-1 and mean class accuracy need.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aim_jax.models.aim import average_views

# Mesh axes the (B*V) batch is split over, in this order, when present.
BATCH_AXES = ('data', 'fsdp')
AVERAGE_MODES = ('prob', 'score')


def eval_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D 'data' mesh over all devices (Auto axes: plain GSPMD propagation)."""
  devices = list(devices if devices is not None else jax.devices())
  return jax.make_mesh((len(devices),), ('data',), axis_types=(AxisType.Auto,),
                       devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  if not axes:
    raise ValueError(f'mesh axes {mesh.axis_names} have none of {BATCH_AXES} to split the '
                     'evaluation batch over')
  return axes


def padded_batch_size(batch_size: int, num_views: int, mesh: Mesh) -> int:
  """Smallest per-process batch >= batch_size whose folded views fill this host's shards.

  The (B*V) axis of the global array is split evenly over the batch axes; each
  process supplies the rows of its own devices, so B*V must be a multiple of
  the number of batch shards local to this process.
  """
  axes = batch_axes(mesh)
  shards = math.prod(mesh.shape[a] for a in axes)
  local_shards = max(1, shards // jax.process_count())
  step = local_shards // math.gcd(local_shards, num_views)   # B multiple of this
  return int(math.ceil(batch_size / step) * step)


@dataclasses.dataclass
class EvalResult:
  """Evaluation output.

  Per-video fields cover the videos this process read, in reading order;
  `confusion` and `metrics` cover all processes.

  Attributes:
    keys: video ids.
    labels: (n,) int labels.
    topk_classes: (n, k) class indices, best first.
    topk_scores: (n, k) averaged probabilities ('prob') or logits ('score').
    scores: (n, K) averaged scores, only with keep_scores=True.
    confusion: (K, K) int64 counts, rows = label, columns = top-1 prediction.
    metrics: top1, top5, mean_class_accuracy, num_evaluated, num_skipped,
      num_views, clips_per_second, videos_per_second, seconds, average_clips.
  """
  keys: list[str]
  labels: np.ndarray
  topk_classes: np.ndarray
  topk_scores: np.ndarray
  scores: Optional[np.ndarray]
  confusion: np.ndarray
  metrics: dict


def num_views(data_cfg: Any, split: str) -> int:
  """Views per video the pipeline makes for `split`: crops x clips ('test_*' or 'val_*')."""
  prefix = 'test' if split == 'test' else 'val'
  return int(data_cfg[f'{prefix}_clips']) * int(data_cfg[f'{prefix}_crops'])


def make_eval_step(apply_fn: Callable[[Any, jax.Array], jax.Array], mesh: Mesh,
                   num_views: int, average_clips: str = 'prob',
                   param_sharding: Any = None) -> Callable:
  """jit(params, video (B*V, T, H, W, C)) -> (B, K) video scores, replicated.

  Params are replicated unless `param_sharding` (a sharding or a tree of them,
  e.g. from the logical axis rules) says otherwise; the folded batch is split
  over the batch axes. The
  (B, K) output is small and replicated so that every host can read the rows
  of its own videos.
  """
  if average_clips not in AVERAGE_MODES:
    raise ValueError(f"eval.average_clips must be one of {AVERAGE_MODES}, got {average_clips!r}")
  data = NamedSharding(mesh, P(batch_axes(mesh)))
  replicated = NamedSharding(mesh, P())

  def step(params, video):
    logits = apply_fn(params, video)                      # (B*V, K)
    return average_views(logits, num_views, average_clips)  # (B, K)

  return jax.jit(step, in_shardings=(param_sharding or replicated, data),
                 out_shardings=replicated)


def model_apply_fn(model) -> Callable[[Any, jax.Array], jax.Array]:
  """Deterministic (train=False) forward of a Flax VideoClassifier."""
  return lambda params, video: model.apply({'params': params}, video, train=False)


def _keys_of(batch: Mapping, n: int, offset: int) -> list[str]:
  if 'key' not in batch:
    return [f'p{jax.process_index()}:{offset + i}' for i in range(n)]
  out = []
  for k in np.asarray(batch['key']).reshape(-1)[:n]:
    out.append(k.decode('utf-8', 'replace') if isinstance(k, (bytes, np.bytes_)) else str(k))
  return out


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.process_allgather(np.array([flag]))).any())


def _sum_over_processes(x: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)


def metrics_from_confusion(confusion: np.ndarray, top5_hits: int) -> dict:
  """top1, top5 and mean per-class accuracy (classes that occur among the labels).

  The official `mean_class_accuracy` also averages in a 0 for a class that is
  predicted but never a label; on a full test split every class is a label and
  the two agree.
  """
  n = int(confusion.sum())
  per_class_count = confusion.sum(axis=1)
  present = per_class_count > 0
  per_class_acc = np.diag(confusion)[present] / per_class_count[present]
  return dict(
      top1=float(np.trace(confusion) / n) if n else float('nan'),
      top5=float(top5_hits / n) if n else float('nan'),
      mean_class_accuracy=float(per_class_acc.mean()) if n else float('nan'),
      num_evaluated=n)


def evaluate(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
             batches: Iterable[Mapping[str, Any]], *, num_classes: int, num_views: int,
             batch_size: int, mesh: Optional[Mesh] = None, average_clips: str = 'prob',
             expected_count: Optional[int] = None, top_k: int = 5, keep_scores: bool = False,
             progress: bool = True, total_steps: Optional[int] = None,
             param_sharding: Any = None, step_fn: Optional[Callable] = None) -> EvalResult:
  """Run multi-view evaluation over `batches` on all devices of `mesh`.

  Args:
    apply_fn: (params, video (N, T, H, W, C)) -> logits (N, K).
    params: parameter tree (host or device arrays); replicated over the mesh.
    batches: this process's batches {'video': (b, V, T, H, W, C) float,
      'label': (b,) int, 'key': (b,) ids}, b <= batch_size, any number of them.
    num_classes: K.
    num_views: V, the views per video the data pipeline produces.
    batch_size: videos per process per step (the last batch may hold fewer).
    mesh: device mesh; default: a 1-D 'data' mesh over all devices.
    average_clips: 'prob' (mean of softmax, official) or 'score' (mean logits).
    expected_count: videos the split holds (all processes); the difference to
      the number evaluated is reported as skipped.
    top_k: how many classes per video to keep.
    keep_scores: also keep the (n, K) averaged scores.
    progress: show a tqdm bar on process 0.
    total_steps: length of the bar (optional).
    param_sharding: a sharding or tree of shardings for params (default
      replicated).
    step_fn: a step made by `make_eval_step` for this mesh and view count, to reuse
      its compilation across calls (training evaluates many times); default: a new one.
  """
  mesh = mesh if mesh is not None else eval_mesh()
  param_sharding = param_sharding or NamedSharding(mesh, P())
  step_fn = step_fn or make_eval_step(apply_fn, mesh, num_views, average_clips, param_sharding)
  params = jax.device_put(params, param_sharding)
  book = _Booking(num_classes, num_views, min(top_k, num_classes), keep_scores)
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm
    bar = tqdm(total=total_steps, desc='eval', unit='batch')
  t_start = time.perf_counter()
  pending = None   # the step in flight: its result is fetched after the next one is dispatched
  for global_video, b, label, batch_keys in _global_batches(
      batches, mesh, num_views, num_classes, batch_size, book):
    dispatched = (step_fn(params, global_video), b, label, batch_keys)   # asynchronous
    if pending is not None:
      book.add(*pending)
      if bar is not None:
        bar.update(1)
    pending = dispatched
  if pending is not None:
    book.add(*pending)
    if bar is not None:
      bar.update(1)          # the last step's too: the bar ends full
  if bar is not None:
    bar.close()
  return book.result(time.perf_counter() - t_start, expected_count, average_clips)


class _Booking:
  """This process's per-video results, booked as each step's scores arrive."""

  def __init__(self, num_classes: int, num_views: int, k: int, keep_scores: bool):
    self.num_classes, self.num_views, self.k, self.keep_scores = (
        num_classes, num_views, k, keep_scores)
    self.keys: list[str] = []
    self.labels, self.topk_c, self.topk_s, self.scores = [], [], [], []
    self.confusion = np.zeros((num_classes, num_classes), np.int64)
    self.top5_hits = self.clips_after_first = 0
    self.rows = None        # first video row of this process in the global batch
    self.t_first = None
    self.in_flight = 0      # videos dispatched but not booked yet (for key numbering)

  def add(self, device_scores: Any, b: int, label: np.ndarray, batch_keys: list[str]) -> None:
    """Fetch one step's (replicated) scores and book this process's real rows."""
    scores = np.asarray(device_scores)[self.rows:self.rows + b]      # (b, K)
    self.in_flight -= b
    if self.t_first is None:
      self.t_first = time.perf_counter()
    else:
      self.clips_after_first += b * self.num_views
    if not b:
      return
    self.keys.extend(batch_keys)
    order = np.argsort(-scores, axis=1, kind='stable')[:, :self.k]
    self.labels.append(label)
    self.topk_c.append(order)
    self.topk_s.append(np.take_along_axis(scores, order, axis=1))
    if self.keep_scores:
      self.scores.append(scores)
    np.add.at(self.confusion, (label, order[:, 0]), 1)
    self.top5_hits += int((order[:, :min(5, self.k)] == label[:, None]).any(axis=1).sum())

  def result(self, seconds: float, expected_count: Optional[int],
             average_clips: str) -> EvalResult:
    t_end = time.perf_counter()
    confusion = _sum_over_processes(self.confusion)
    top5_hits = int(_sum_over_processes(np.array([self.top5_hits], np.int64))[0])
    clips_after_first = int(_sum_over_processes(
        np.array([self.clips_after_first], np.int64))[0])
    metrics = metrics_from_confusion(confusion, top5_hits)
    n, v = metrics['num_evaluated'], self.num_views
    # Throughput excludes the first step (compilation) when there is more than one step.
    if clips_after_first and self.t_first is not None and t_end > self.t_first:
      steady, clips = t_end - self.t_first, clips_after_first
    else:
      steady, clips = seconds, n * v
    metrics.update(
        num_skipped=(int(expected_count) - n) if expected_count is not None else 0,
        num_views=int(v), average_clips=average_clips,
        clips_per_second=float(clips / steady) if steady > 0 else float('nan'),
        videos_per_second=float(clips / v / steady) if steady > 0 else float('nan'),
        seconds=float(seconds))
    if expected_count is not None and n > expected_count:
      raise RuntimeError(f'evaluated {n} videos but the split holds {expected_count}: '
                         'some videos were counted more than once')
    if len(set(self.keys)) != len(self.keys):
      logging.warning('%d duplicate video ids among the %d evaluated on this process',
                      len(self.keys) - len(set(self.keys)), len(self.keys))

    def cat(xs, shape):
      return np.concatenate(xs) if xs else np.zeros(shape)

    k = self.k
    return EvalResult(
        keys=self.keys, labels=cat(self.labels, (0,)).astype(np.int64),
        topk_classes=cat(self.topk_c, (0, k)).astype(np.int64),
        topk_scores=cat(self.topk_s, (0, k)).astype(np.float32),
        scores=(cat(self.scores, (0, self.num_classes)).astype(np.float32)
                if self.keep_scores else None),
        confusion=confusion, metrics=metrics)


def _check_batch(batch: Mapping, num_views: int, num_classes: int, batch_size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  video = np.asarray(batch['video'])
  label = np.asarray(batch['label']).reshape(-1).astype(np.int64)
  b = video.shape[0]
  if video.ndim != 6 or video.shape[1] != num_views:
    raise ValueError(f"batch['video'] has shape {video.shape}; expected "
                     f'(B, V={num_views}, T, H, W, C)')
  if b > batch_size or label.shape[0] != b:
    raise ValueError(f'batch of {b} videos and {label.shape[0]} labels; expected equal '
                     f'counts of at most batch_size={batch_size}')
  if np.any((label < 0) | (label >= num_classes)):
    raise ValueError(f'labels {label[(label < 0) | (label >= num_classes)]} are outside '
                     f'[0, num_classes={num_classes})')
  return video, label


def _global_batches(batches: Iterable[Mapping[str, Any]], mesh: Mesh, num_views: int,
                    num_classes: int, batch_size: int, book: _Booking) -> Iterator[tuple]:
  """This process's batches, padded to a fixed size and folded (videos x views), as global
  arrays over the mesh's batch axes -> (global video, real videos, labels, keys). Runs
  until every process is out of data (a process with none left feeds padding)."""
  padded = padded_batch_size(batch_size, num_views, mesh)
  data_sharding = NamedSharding(mesh, P(batch_axes(mesh)))
  iterator: Iterator = iter(batches)
  exhausted, frame_shape = False, None
  while True:
    batch = None
    if not exhausted:
      batch = next(iterator, None)
      exhausted = batch is None
    if not _any_process(batch is not None):
      return
    if batch is not None:
      video, label = _check_batch(batch, num_views, num_classes, batch_size)
      b = video.shape[0]
      frame_shape = frame_shape or tuple(video.shape[2:])
      batch_keys = _keys_of(batch, b, len(book.keys) + book.in_flight)
    else:
      if frame_shape is None:
        raise ValueError('this process received no evaluation batch at all while others did; '
                         'it cannot infer the clip shape (give each process at least one file)')
      video, label, b, batch_keys = None, np.zeros((0,), np.int64), 0, []
    if b == padded:
      local = video.astype(np.float32, copy=False)
    else:   # ragged (or empty) batch: zero videos fill it up to the fixed shape
      local = np.zeros((padded, num_views) + frame_shape, np.float32)
      local[:b] = video if b else 0.0
    local = local.reshape((padded * num_views,) + frame_shape)   # (padded*V, T, H, W, C)
    global_shape = (padded * num_views * jax.process_count(),) + frame_shape
    if book.rows is None:
      index_map = data_sharding.addressable_devices_indices_map(global_shape)
      book.rows = min(idx[0].start or 0 for idx in index_map.values()) // num_views
    book.in_flight += b
    yield (jax.make_array_from_process_local_data(data_sharding, local, global_shape), b,
           label, batch_keys)
