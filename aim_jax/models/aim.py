"""AIM: an image backbone with adapters injected, plus the I3D-style head.

`inject(encoder, spec, num_frames)` is the one injection mechanism: it takes
an image-model definition (any backbone module with `adapters`, `num_frames`
fields) and returns the same definition with AIM's adapters set (Linen
`clone`). The module code is shared; only its fields change.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from aim_jax.models.adapters import AdapterSpec

LP = nn.with_logical_partitioning
init = nn.initializers


def inject(encoder: nn.Module, spec: Optional[AdapterSpec], num_frames: int,
           **overrides: Any) -> nn.Module:
  """Return `encoder` (an unbound module definition) with AIM adapters set.

  `spec=None` keeps the image model (frame-wise features) but still adds the
  temporal embedding when `num_frames` > 0.
  """
  return encoder.clone(adapters=spec, num_frames=num_frames, **overrides)


class I3DHead(nn.Module):
  """mmaction2 I3DHead: average over every axis but batch and channel, dropout, fc_cls."""
  num_classes: int
  dropout_rate: float = 0.5
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, *, train: bool = False) -> jax.Array:
    # features: (B, ..., D), e.g. (B, T, D) for ViTs or (B, T', H, W, C) for Swin.
    x = features.astype(jnp.float32)
    x = x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
                    kernel_init=LP(init.normal(0.01), ('embed', 'classes')),
                    bias_init=LP(init.zeros, ('classes',)), name='fc_cls')(x)


class VideoClassifier(nn.Module):
  """`backbone` (video -> features) followed by `cls_head`.

  Parameter tree: {'backbone': ..., 'cls_head': {'fc_cls': {kernel, bias}}},
  the official recognizer's `backbone.*` / `cls_head.fc_cls.*`.
  Input: (B, T, H, W, C) float, normalised (CLIP mean/std), channels last.
  """
  backbone: nn.Module
  num_classes: int
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, video: jax.Array, *, train: bool = False) -> jax.Array:
    features = self.backbone(video, train=train)
    self.sow('intermediates', 'features', features)
    return I3DHead(self.num_classes, self.dropout_rate, name='cls_head')(features, train=train)


def average_views(logits: jax.Array, num_views: int, mode: str = 'prob') -> jax.Array:
  """(B*V, K) view logits -> (B, K) video scores.

  'prob': mean of softmax (official test_cfg average_clips='prob');
  'score': mean of logits.
  """
  k = logits.shape[-1]
  logits = logits.reshape(-1, num_views, k).astype(jnp.float32)
  if mode == 'prob':
    return jax.nn.softmax(logits, axis=-1).mean(axis=1)
  if mode == 'score':
    return logits.mean(axis=1)
  raise ValueError(f"average_clips must be 'prob' or 'score', got {mode!r}")
