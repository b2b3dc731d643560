"""Checkpoint formats that `python -m aim_jax.convert` understands.

Each format module registers a `Format`: a name, a `detect(keys)` test on the
source checkpoint's key names, and a `convert(state_dict, **options)` that
returns `(params, model_config, report)`: encoder params for image-model
formats (CLIP, timm, SigLIP, DINOv2, Swin) or full AIM params for AIM
checkpoints. Formats register themselves on import of this package.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable


@dataclasses.dataclass(frozen=True)
class Format:
  name: str
  kind: str                  # 'image' (a backbone to adapt) or 'aim' (a full AIM model)
  detect: Callable[[Iterable[str]], bool]
  convert: Callable[..., tuple]
  description: str = ''


REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
  REGISTRY[fmt.name] = fmt
  return fmt


def detect(keys: Iterable[str], kind: str | None = None) -> list[Format]:
  keys = list(keys)
  return [f for f in REGISTRY.values() if (kind is None or f.kind == kind) and f.detect(keys)]


# Image-backbone formats beyond CLIP register themselves on import (REGISTRY exists by now).
from aim_jax.formats import dinov2, google_npz, siglip, timm_vit  # noqa: E402,F401
