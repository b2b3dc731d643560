"""A stand-in `torchvision` for the tests that build reference models (tests only).

`clip`, `open_clip` and `timm` import torchvision when they are imported, for
image transforms and ops these tests never call; torchvision has no CPU build
here. `install()` serves every `torchvision[.*]` import from a meta-path
finder: any attribute of a stub module is a stub class, any attribute of a stub
class another one (`InterpolationMode.BICUBIC`), and calling one raises, so a
test that did use torchvision fails naming it. Where the real torchvision is
importable nothing is stubbed. Library code never imports this module.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator


class _Anything(type):
  """Attribute access on a stub class gives a stub class, the same one each time."""
  def __getattr__(cls, name):
    if name.startswith('__'):
      raise AttributeError(name)
    sub = _Anything(name, (Stub,), {})
    type.__setattr__(cls, name, sub)
    return sub


class Stub(metaclass=_Anything):
  def __init__(self, *args, **kwargs):
    raise RuntimeError('torchvision is not installed (test stub)')


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Finds `torchvision` and its submodules; each is an empty package of stubs."""

  def find_spec(self, name, path, target=None):
    if name == 'torchvision' or name.startswith('torchvision.'):
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    module = types.ModuleType(spec.name)
    module.__path__ = []

    def getattr_(name):
      if name.startswith('__'):
        raise AttributeError(name)
      return getattr(Stub, name)
    module.__getattr__ = getattr_
    return module

  def exec_module(self, module):
    pass


_finder: _Finder | None = None


def install() -> bool:
  """Serve torchvision from stubs from now on, unless it is really there; idempotent.

  Returns whether the stubs serve it.
  """
  global _finder
  if _finder is not None:
    return True
  if importlib.util.find_spec('torchvision') is not None:
    return False
  try:
    # transformers caches whether torchvision exists: let it see the truth first.
    from transformers.utils import import_utils
    import_utils.is_torchvision_available()
  except ImportError:
    pass
  _finder = _Finder()
  sys.meta_path.insert(0, _finder)
  return True


def uninstall() -> None:
  """Stop serving stubs and forget the stub modules (modules that imported them keep theirs)."""
  global _finder
  if _finder is None:
    return
  sys.meta_path.remove(_finder)
  _finder = None
  for name in [n for n in sys.modules if n.split('.')[0] == 'torchvision']:
    del sys.modules[name]


@contextlib.contextmanager
def installed() -> Iterator[None]:
  """`install()` for a block (a module fixture); removed after it if it installed the stubs."""
  fresh = _finder is None
  install()
  try:
    yield
  finally:
    if fresh:
      uninstall()
