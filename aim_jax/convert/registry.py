"""The registry of checkpoint formats that `python -m aim_jax.convert` understands.

Each module of `aim_jax.convert.formats` registers its `Format`s when imported: a
name, a `detect(keys)` test on the source checkpoint's key names, and a
`convert(state_dict, **options)` that returns `(params, model_config, report)`:
encoder params for image-model formats (CLIP, timm, SigLIP, DINOv2, Swin) or full
AIM params for AIM checkpoints. `all_formats()` imports every module of the package
(the one registration path), so a new format is a new file there.

`Report` records what a conversion did with every key, so nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from typing import Callable, Iterable


@dataclasses.dataclass(frozen=True)
class Format:
  name: str
  kind: str                  # 'image' (a backbone to adapt) or 'aim' (a full AIM model)
  detect: Callable[[Iterable[str]], bool]
  convert: Callable[..., tuple]
  description: str = ''


_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
  if fmt.name in _REGISTRY and _REGISTRY[fmt.name] is not fmt:
    raise ValueError(f'format {fmt.name!r} is registered twice')
  _REGISTRY[fmt.name] = fmt
  return fmt


def all_formats() -> dict[str, Format]:
  """Every registered format by name (imports each module of aim_jax.convert.formats)."""
  from aim_jax.convert import formats as package
  for info in pkgutil.iter_modules(package.__path__):
    importlib.import_module(f'{package.__name__}.{info.name}')
  return dict(_REGISTRY)


def detect(keys: Iterable[str], kind: str | None = None) -> list[Format]:
  keys = list(keys)
  return [f for f in all_formats().values()
          if (kind is None or f.kind == kind) and f.detect(keys)]


@dataclasses.dataclass
class Report:
  """What a conversion did with every key, never silently."""
  mapped: list = dataclasses.field(default_factory=list)        # (source key, target name)
  unused: list = dataclasses.field(default_factory=list)        # source keys not mapped
  missing: list = dataclasses.field(default_factory=list)       # target names left at init
  notices: list = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    lines = [f'mapped {len(self.mapped)} tensors']
    if self.unused:
      lines.append(f'unused source keys ({len(self.unused)}): ' + _abbrev(self.unused))
    if self.missing:
      lines.append(f'target parameters left at initialisation ({len(self.missing)}): '
                   + _abbrev(self.missing))
    lines.extend(self.notices)
    return '\n'.join(lines)


def heads_guessed(heads: int, rule: str = 'width/64') -> str:
  """The report line of a head count that nothing records (see convert/source_config.py)."""
  return f'heads={heads} guessed as {rule}: no config records it; pass --heads'


def _abbrev(names, n=12):
  names = list(names)
  groups = {}
  for k in names:
    g = re.sub(r'\.\d+\.|_\d+/', '.*.', k)
    groups.setdefault(g, 0)
    groups[g] += 1
  items = [f'{g} (x{c})' if c > 1 else g for g, c in groups.items()]
  more = f' ... and {len(items) - n} more' if len(items) > n else ''
  return ', '.join(items[:n]) + more
