"""The official PyTorch AIM (ViT_CLIP + I3DHead), run from its own files, with our weights.

Used by `python -m benchmarks.step_benchmark --official DIR` to time the official
model beside ours in the same call, on the same device, batch and precision.
DIR holds the official files at their repository paths (fetched into a
git-ignored folder such as `.official/`, never committed):

  mmaction/models/backbones/vit_clip.py   ViT_CLIP, the AIM backbone
  mmaction/models/heads/base.py           BaseHead
  mmaction/models/heads/i3d_head.py       I3DHead

Those files import mmaction's registries and logger, mmcv's `normal_init` and
mmaction's `top_k_accuracy`; mmcv and mmaction are not installed (and must not
be). `_import_shims` serves minimal stand-ins for exactly those names, for the
duration of the load only: these are import shims for the official files, not
a re-implementation. Every line that computes the model (attention, adapters,
drop path, head) is the official code; einops and timm (`DropPath`,
`trunc_normal_`) are the real packages. `clip` is only used by
`ViT_CLIP.init_weights(pretrained=<name>)`, which downloads CLIP and is never
called here (the weights are ours); where the `clip` package is not installed
a stand-in whose `load` raises is served, and the loader reports it.

torch is imported by this module: import it only when the official code is
wanted (the benchmark does so under `--official`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import logging
import os
import pathlib
import platform
import sys
import time
import types
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from aim_jax.convert import official_names
from aim_jax import params as P

# Official files, relative to DIR, in load order (i3d_head imports base).
FILES = {
    'mmaction.models.backbones.vit_clip': 'mmaction/models/backbones/vit_clip.py',
    'mmaction.models.heads.base': 'mmaction/models/heads/base.py',
    'mmaction.models.heads.i3d_head': 'mmaction/models/heads/i3d_head.py',
}

AMP_DTYPES = {'float32': None, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


@dataclasses.dataclass
class OfficialModules:
  """The official classes, and what their load needed."""
  ViT_CLIP: type
  I3DHead: type
  stand_ins: list        # modules served by `_import_shims` (names)
  files: dict            # relative path -> sha256 of the file that was run
  root: pathlib.Path | None = None            # the folder they were loaded from
  loaded: dict = dataclasses.field(default_factory=dict)   # module name -> official module


# ---------------------------------------------------------------------------
# Loading the official files.

class _Registry:
  """Stand-in for mmcv's Registry: `register_module()` returns the class unchanged."""

  def __init__(self, name: str):
    self.name = name

  def register_module(self, *args, **kwargs):
    return lambda cls: cls


def _build_loss(cfg: Mapping) -> torch.nn.Module:
  """Stand-in for mmaction's build_loss: the only loss AIM's configs use."""
  cfg = dict(cfg)
  kind = cfg.pop('type')
  if kind != 'CrossEntropyLoss' or cfg.get('loss_weight', 1.0) != 1.0:
    raise ValueError(f'official head: loss_cls {kind!r} {cfg} is not served by the import '
                     "shims (only CrossEntropyLoss with loss_weight 1.0, the AIM configs')")
  return torch.nn.CrossEntropyLoss()


def _normal_init(module: torch.nn.Module, mean: float = 0.0, std: float = 1.0,
                 bias: float = 0.0) -> None:
  """Stand-in for mmcv.cnn.normal_init (I3DHead.init_weights); our weights replace it."""
  torch.nn.init.normal_(module.weight, mean, std)
  if getattr(module, 'bias', None) is not None:
    torch.nn.init.constant_(module.bias, bias)


def _unused(name: str):
  def fail(*args, **kwargs):
    raise RuntimeError(f'{name} is an import stand-in (benchmarks.official_torch); the benchmark '
                       'never calls it')
  return fail


def _module(name: str, path: Sequence[pathlib.Path] | None = None, **attrs) -> types.ModuleType:
  """A module; a package when `path` is given (its official folder, or [] for mmcv)."""
  m = types.ModuleType(name)
  if path is not None:
    m.__path__ = [str(p) for p in path]
  m.__dict__.update(attrs)
  return m


@contextlib.contextmanager
def _import_shims(root: pathlib.Path, stand_ins: list) -> Iterator[None]:
  """Serve mmaction/mmcv (and, if missing, clip) while the official files load; restore after."""
  mods = {
      'mmaction': _module('mmaction', [root / 'mmaction']),
      'mmaction.models': _module('mmaction.models', [root / 'mmaction/models']),
      'mmaction.models.backbones': _module('mmaction.models.backbones',
                                           [root / 'mmaction/models/backbones']),
      'mmaction.models.heads': _module('mmaction.models.heads', [root / 'mmaction/models/heads']),
      'mmaction.models.builder': _module('mmaction.models.builder',
                                         BACKBONES=_Registry('backbone'),
                                         HEADS=_Registry('head'), build_loss=_build_loss),
      'mmaction.utils': _module('mmaction.utils',
                                get_root_logger=lambda *a, **k: logging.getLogger('mmaction')),
      'mmaction.core': _module('mmaction.core',
                               top_k_accuracy=_unused('mmaction.core.top_k_accuracy')),
      'mmcv': _module('mmcv', []),
      'mmcv.cnn': _module('mmcv.cnn', normal_init=_normal_init),
  }
  try:
    importlib.import_module('clip')
  except ImportError:  # not installed, or its torchvision is missing: never used here
    mods['clip'] = _module('clip', load=_unused('clip.load'))
  for package in ('einops', 'timm.models.layers'):
    try:
      importlib.import_module(package)
    except ImportError as e:
      raise ImportError(f'the official vit_clip.py needs the {package!r} package '
                        f'(timm also needs torchvision): {e}') from e
  names = list(mods) + list(FILES)
  saved = {n: sys.modules[n] for n in names if n in sys.modules}
  stand_ins.extend(mods)
  sys.modules.update(mods)
  try:
    yield
  finally:
    for n in names:
      sys.modules.pop(n, None)
    sys.modules.update(saved)


def exec_files(root: pathlib.Path, files: Mapping[str, str]) -> dict[str, types.ModuleType]:
  """Execute official source files {module name: path under root} as those modules, in order.

  Call inside `_import_shims` (their mmcv/mmaction imports resolve to stand-ins); each module
  is registered in sys.modules first, so relative imports (`.base`) resolve through it.
  """
  loaded = {}
  for name, rel in files.items():
    spec = importlib.util.spec_from_file_location(name, root / rel)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    loaded[name] = module
  return loaded


def load_official(official_dir: str | os.PathLike) -> OfficialModules:
  """Import ViT_CLIP and I3DHead from the official files under `official_dir`."""
  root = pathlib.Path(official_dir).resolve()
  for rel in FILES.values():
    if not (root / rel).is_file():
      raise FileNotFoundError(f'{root / rel}: official file missing (--official names the folder '
                              'holding mmaction/models/{backbones,heads}/ of '
                              'taoyang1122/adapt-image-models)')
  stand_ins: list = []
  with _import_shims(root, stand_ins):
    loaded = exec_files(root, FILES)
  files = {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in FILES.values()}
  return OfficialModules(
      ViT_CLIP=loaded['mmaction.models.backbones.vit_clip'].ViT_CLIP,
      I3DHead=loaded['mmaction.models.heads.i3d_head'].I3DHead,
      stand_ins=sorted(stand_ins), files=files, root=root, loaded=loaded)


@contextlib.contextmanager
def importable(modules: OfficialModules) -> Iterator[None]:
  """The official modules and their import shims in `sys.modules` again, until exit.

  torch.compile (Dynamo) looks the official classes' modules up by name while it
  traces (`mmaction.models.backbones.vit_clip`, and what those import): compiling
  and running a compiled official model happens inside this.
  """
  with _import_shims(modules.root, []):
    sys.modules.update(modules.loaded)
    yield


# ---------------------------------------------------------------------------
# Building the official model for one of our model configs.

class OfficialRecognizer(torch.nn.Module):
  """`backbone` then `cls_head`, the state-dict layout of mmaction's Recognizer3D.

  Recognizer3D only folds views into the batch and computes the loss; with one
  view per clip (training, the benchmark) that is this container.
  Input (B, C, T, H, W), as the official pipeline's NCTHW.
  """

  def __init__(self, backbone: torch.nn.Module, cls_head: torch.nn.Module):
    super().__init__()
    self.backbone = backbone
    self.cls_head = cls_head

  def forward(self, video: torch.Tensor) -> torch.Tensor:
    return self.cls_head(self.backbone(video))


def check_supported(model_cfg: Mapping) -> None:
  """The official ViT_CLIP expresses only the full AIM recipe on a CLIP ViT; say which field not."""
  a = model_cfg['adapters']
  wanted = [('backbone', model_cfg['backbone'], 'clip'), ('output_dim', model_cfg['output_dim'], 0),
            ('mlp_ratio', float(model_cfg['mlp_ratio']), 4.0),
            ('adapters.enabled', a['enabled'], True), ('adapters.spatial', a['spatial'], True),
            ('adapters.temporal', a['temporal'], True), ('adapters.joint', a['joint'], True),
            ('adapters.position', a['position'], 'all'), ('adapters.ratio', a['ratio'], 0.25)]
  for field, have, want in wanted:
    if have != want:
      raise ValueError(f'model.{field} = {have!r}: the official ViT_CLIP (vit_clip.py) only '
                       f'builds {want!r}')
  if a['num_tadapter'] not in (1, 2):
    raise ValueError(f'model.adapters.num_tadapter = {a["num_tadapter"]!r}: vit_clip.py builds 1 '
                     'or 2')
  if model_cfg['drop_path_mode'] not in ('', 'token'):
    raise ValueError(f'model.drop_path_mode = {model_cfg["drop_path_mode"]!r}: vit_clip.py drops '
                     "per token position ('token')")


def build_official(model_cfg: Mapping, params: Mapping, modules: OfficialModules
                   ) -> OfficialRecognizer:
  """The official recognizer for `model_cfg` (resolved), holding exactly `params` (strict load)."""
  check_supported(model_cfg)
  a = model_cfg['adapters']
  backbone = modules.ViT_CLIP(
      input_resolution=model_cfg['image_size'], num_frames=model_cfg['num_frames'],
      patch_size=model_cfg['patch_size'], width=model_cfg['width'], layers=model_cfg['layers'],
      heads=model_cfg['heads'], drop_path_rate=model_cfg['drop_path_rate'],
      num_tadapter=a['num_tadapter'], adapter_scale=a['scale'])
  head = modules.I3DHead(num_classes=model_cfg['num_classes'], in_channels=model_cfg['width'],
                         spatial_type='avg', dropout_ratio=model_cfg['dropout_rate'])
  model = OfficialRecognizer(backbone, head)
  sd = official_names.aim_params_to_state_dict(params, model_cfg['heads'])
  model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32).copy())
                         for k, v in sd.items()}, strict=True)
  return model


def trainable_keys(params: Mapping, model_cfg: Mapping, patterns: Sequence[str],
                   full_finetune: bool = False) -> set[str]:
  """Official state-dict keys of the leaves our freeze rule trains.

  The mask is carried through the same name mapping as the weights (a tensor
  of its flag per leaf), so the official model trains exactly our set.
  """
  mask = P.trainable_mask(params, patterns, full_finetune)
  flat_p, flat_m = P.flatten(params), P.flatten(mask)
  flags = P.unflatten({k: np.full(np.shape(v), bool(flat_m[k])) for k, v in flat_p.items()})
  sd = official_names.aim_params_to_state_dict(flags, model_cfg['heads'])
  return {k for k, v in sd.items() if np.asarray(v).all()}


def param_groups(model: torch.nn.Module, keys: set[str], optimizer_cfg: Any) -> list[dict]:
  """AdamW groups as mmcv's DefaultOptimizerConstructor makes them (aim_jax.optim rules)."""
  from aim_jax import optim
  if optimizer_cfg.name != 'adamw':
    raise ValueError(f'optimizer.name {optimizer_cfg.name!r}: only adamw is compared')
  custom = optim.custom_keys(optimizer_cfg)
  groups: dict[tuple[float, float], list] = {}
  for name, p in model.named_parameters():
    p.requires_grad_(name in keys)          # tools/train.py freezes the rest
    if name in keys:
      lr_mult, decay_mult = optim.group_of(name, custom)
      groups.setdefault((lr_mult, decay_mult), []).append(p)
  return [dict(params=ps, lr=float(optimizer_cfg.lr) * lr_mult,
               weight_decay=float(optimizer_cfg.weight_decay) * decay_mult)
          for (lr_mult, decay_mult), ps in groups.items()]


# ---------------------------------------------------------------------------
# Timing.

def torch_device(jax_platform: str) -> torch.device:
  """The torch device that is the JAX run's: CUDA for 'gpu', else the CPU."""
  if jax_platform == 'gpu':
    if not torch.cuda.is_available():
      raise RuntimeError('JAX runs on the GPU but this torch has no CUDA: the side-by-side run '
                         'needs a CUDA build of torch')
    return torch.device('cuda')
  if jax_platform != 'cpu':
    raise ValueError(f'--official: JAX runs on {jax_platform!r}; the official torch model runs '
                     'on CPU or CUDA only')
  return torch.device('cpu')


def _sync(device: torch.device) -> None:
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


OFFICIAL_MODES = ('eager', 'compiled')


def time_official(model: OfficialRecognizer, *, mode: str, batch: int, model_cfg: Mapping,
                  groups: list[dict] | None, optimizer_cfg: Any, steps_n: int, warmup: int,
                  device: torch.device, seed: int = 0, compiled: bool = False,
                  compile_backend: str = 'inductor') -> dict:
  """Time the official train step (fwd + bwd + AdamW) or eval step (no_grad) like ours.

  `compiled`: the official model as a PyTorch user with today's tools runs it:
  `torch.compile(model, backend=compile_backend)` and fused AdamW, same autocast,
  same weights and trainable set. Step 0 compiles (reported as `compile_s`).
  Call it inside `importable(modules)` (Dynamo resolves the official modules).

  Precision follows our `model.dtype`: torch.autocast in bf16 / fp16 (the
  official training used apex AMP O1, which casts per op likewise), with dynamic
  loss scaling for fp16 (GradScaler, as apex); parameters and AdamW state stay
  fp32. The loss is the official CrossEntropyLoss on the logits;
  BaseHead.loss's top-k accuracy (a numpy round trip per step) is left out, as
  our step computes accuracy on the device.
  """
  amp = AMP_DTYPES[model_cfg['dtype']]
  t, s = model_cfg['num_frames'], model_cfg['image_size']
  g = torch.Generator(device='cpu').manual_seed(seed)
  video = torch.randn((batch, 3, t, s, s), generator=g).to(device)          # (B, C, T, H, W)
  labels = (torch.arange(batch) % model_cfg['num_classes']).to(device)
  model.to(device)
  autocast = lambda: torch.autocast(device.type, dtype=amp, enabled=amp is not None)
  net = torch.compile(model, backend=compile_backend) if compiled else model
  if mode == 'train':
    model.train()
    opt = torch.optim.AdamW(groups, lr=float(optimizer_cfg.lr),
                            betas=(float(optimizer_cfg.b1), float(optimizer_cfg.b2)),
                            eps=float(optimizer_cfg.eps), fused=compiled or None)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)

    def step():
      opt.zero_grad(set_to_none=True)
      with autocast():
        loss = F.cross_entropy(net(video).float(), labels)
      scaler.scale(loss).backward()
      scaler.step(opt)
      scaler.update()
      return loss
  else:
    model.eval()

    def step():
      with torch.no_grad(), autocast():
        return net(video)

  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
  times = []
  for i in range(1 + warmup + steps_n):  # step 0: compiles, or eager first-call costs (cuBLAS...)
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    times.append(time.perf_counter() - t0)
  timed = np.asarray(times[1 + warmup:])
  med = float(np.median(timed))
  kind = (torch.cuda.get_device_name(device) if device.type == 'cuda'
          else platform.processor() or platform.machine())
  return dict(
      impl='official_torch_compile' if compiled else 'official_torch',
      official_mode='compiled' if compiled else 'eager', mode=mode, batch=batch,
      dtype=model_cfg['dtype'], frames=t, devices=1, device_kind=kind,
      clips_per_s=batch / med, step_s_median=med, step_s_p10=float(np.percentile(timed, 10)),
      step_s_p90=float(np.percentile(timed, 90)), first_step_s=times[0],
      compile_s=times[0] if compiled else None,
      compile_backend=compile_backend if compiled else None,
      fused_adamw=bool(compiled) if mode == 'train' else None,
      peak_memory_bytes=(int(torch.cuda.max_memory_allocated(device))
                         if device.type == 'cuda' else None),
      autocast=str(amp).replace('torch.', '') if amp is not None else 'none',
      grad_scaler=mode == 'train' and amp is torch.float16,
      trainable_params=(sum(p.numel() for grp in groups for p in grp['params'])
                        if mode == 'train' else None),
      steps=steps_n, torch=torch.__version__)


def official_logits(model: OfficialRecognizer, video_nthwc: np.ndarray, dtype: str,
                    device: torch.device) -> np.ndarray:
  """Eval logits of the official model for our (B, T, H, W, C) input layout."""
  amp = AMP_DTYPES[dtype]
  x = torch.from_numpy(np.ascontiguousarray(
      np.asarray(video_nthwc, np.float32).transpose(0, 4, 1, 2, 3))).to(device)  # -> (B,C,T,H,W)
  model.to(device).eval()
  with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
    return model(x).float().cpu().numpy()


# ---------------------------------------------------------------------------
# The benchmark's side-by-side run.

def _init_params(model_cfg: Mapping, seed: int = 0) -> tuple[Any, dict]:
  """(our model, its initial parameters as numpy): the benchmark's init, key(seed)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from aim_jax.models.factory import build_model

  model = build_model(model_cfg)
  t, s = model_cfg['num_frames'], model_cfg['image_size']
  init = jax.jit(lambda r: nn.unbox(model.init({'params': r}, jnp.zeros((1, t, s, s, 3)),
                                               train=False)['params']))
  return model, jax.tree.map(np.asarray, jax.device_get(init(jax.random.key(seed))))


def run_official(config: Any, batch: int, modes: Sequence[str], official_dir: str,
                 steps_n: int, warmup: int, official_modes: Sequence[str] = ('eager',),
                 compile_backend: str = 'inductor', on_row=None) -> dict:
  """Official rows for `modes` x `official_modes` at our per-device batch, plus a same-weights
  logits check.

  `official_modes`: 'eager' (as released) and/or 'compiled' (`torch.compile`
  and fused AdamW, see `time_official`). Runs before our steps are timed:
  torch's cached memory is handed back (`empty_cache`) before JAX allocates,
  whereas JAX's pool is kept until the process ends. The official model gets our
  initial parameters (strict load), our dtype, our trainable set and our
  optimiser groups. A compiled run that fails (out of memory, or a compiler
  error) gives a row with its `error` and the other rows still run. `on_row`
  is called with each row as soon as it is measured.
  """
  import jax

  from aim_jax.models.factory import resolve_model_config

  unknown = [m for m in official_modes if m not in OFFICIAL_MODES]
  if unknown or not official_modes:
    raise ValueError(f'--official_modes {",".join(official_modes)!r}: choose from '
                     f'{",".join(OFFICIAL_MODES)}')
  model_cfg = resolve_model_config(config.model)
  modules = load_official(official_dir)
  devices = jax.devices()
  device = torch_device(devices[0].platform)
  if batch % len(devices):
    raise ValueError(f'--batch {batch} is not divisible by the {len(devices)} devices')
  jax_model, params = _init_params(model_cfg)
  keys = trainable_keys(params, model_cfg, list(config.trainable), config.full_finetune)

  # Same weights, same function: eval logits of both on two clips, at the run's dtype.
  t, s = model_cfg['num_frames'], model_cfg['image_size']
  clips = np.random.default_rng(0).normal(size=(2, t, s, s, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(lambda p, v: jax_model.apply({'params': p}, v, train=False))(
      params, clips), np.float32)
  theirs = official_logits(build_official(model_cfg, params, modules), clips,
                           model_cfg['dtype'], device)

  rows = []
  for official_mode in official_modes:
    compiled = official_mode == 'compiled'
    for mode in modes:
      model = build_official(model_cfg, params, modules).to(device)   # before AdamW holds them
      groups = param_groups(model, keys, config.optimizer) if mode == 'train' else None
      failed = dict(impl='official_torch_compile' if compiled else 'official_torch',
                    official_mode=official_mode, mode=mode, batch=batch // len(devices),
                    dtype=model_cfg['dtype'])
      try:
        with importable(modules) if compiled else contextlib.nullcontext():
          rows.append(time_official(model, mode=mode, batch=batch // len(devices),
                                    model_cfg=model_cfg, groups=groups,
                                    optimizer_cfg=config.optimizer, steps_n=steps_n,
                                    warmup=warmup, device=device, compiled=compiled,
                                    compile_backend=compile_backend))
      except torch.OutOfMemoryError as e:   # the official model may not fit where ours does
        rows.append(dict(failed, error=f'out of memory: {str(e)[:300]}'))
      except Exception as e:  # noqa: BLE001  a torch.compile failure must not lose the others
        if not compiled:
          raise
        rows.append(dict(failed, error=f'{type(e).__name__}: {str(e)[:300]}'))
      if on_row is not None:
        on_row(rows[-1])
      del model, groups
      if compiled:
        torch._dynamo.reset()        # drop the compiled graphs (and what they hold)
      if device.type == 'cuda':
        torch.cuda.empty_cache()
  return dict(rows=rows, info=dict(
      dir=str(pathlib.Path(official_dir).resolve()), files=modules.files,
      stand_ins=modules.stand_ins, torch=torch.__version__, device=str(device),
      trainable_tensors=len(keys), logits_max_abs_diff=float(np.abs(ours - theirs).max()),
      logits_max_abs=float(np.abs(ours).max()), official_modes=list(official_modes),
      compile_backend=compile_backend if 'compiled' in official_modes else None))


def compare(jax_results: Sequence[dict], official_run: Mapping) -> dict:
  """JSON fields: the official rows (MACs, MFU filled in from ours), and the ratios.

  `ratio[official_mode][mode]` = our clips/s per device / that official row's
  clips/s (None where the official row failed), e.g. ratio['eager']['train'],
  ratio['compiled']['train']. Both are per device: our clips/s over our
  devices against one torch device. `ratio` is for our default row of each mode;
  `variant_ratio[variant][official_mode][mode]` holds the same for every row
  (`--variant`; None where our variant failed).
  """
  rows, variant_ratio = [], {}
  defaults = [r for r in jax_results if r.get('variant', 'default') == 'default']
  ours_by_mode = {r['mode']: r for r in defaults}
  for official in official_run['rows']:
    ours = ours_by_mode.get(official['mode'])
    if ours is None:
      continue
    theirs = dict(official)
    theirs.setdefault('official_mode', 'eager')
    rows.append(theirs)
    if 'error' in theirs or 'error' in ours:
      continue
    ours_per_device = ours['clips_per_s'] / ours['devices']
    theirs['gmacs_per_clip'] = ours['gmacs_per_clip']
    theirs['mfu'] = (ours['mfu'] * theirs['clips_per_s'] / ours_per_device
                     if ours['mfu'] is not None else None)
  for r in jax_results:
    for theirs in rows:
      if theirs['mode'] != r['mode']:
        continue
      x = None
      if 'error' not in theirs and 'error' not in r:
        x = r['clips_per_s'] / r['devices'] / theirs['clips_per_s']
      variant_ratio.setdefault(r.get('variant', 'default'), {}).setdefault(
          theirs['official_mode'], {})[r['mode']] = x
  return dict(official=rows, ratio=variant_ratio.get('default', {}),
              variant_ratio=variant_ratio, official_info=dict(official_run['info']))


def format_side_by_side(jax_results: Sequence[dict], compared: Mapping) -> str:
  """Markdown rows: ours, then each official mode, per device (the last column: ours / that
  row); then each of our variants (the last column: it / each official row)."""
  lines = [('| impl | mode | batch/device | dtype | clips/s/device | step ms median (p10-p90) | '
            'peak GiB | MFU | ours / this |'), '|---|---|---|---|---|---|---|---|---|']

  def row(impl, r, per_device_batch, clips, ratio):
    mem = f'{r["peak_memory_bytes"] / 2**30:.1f}' if r['peak_memory_bytes'] else 'n/a'
    mfu = f'{100 * r["mfu"]:.1f}%' if r.get('mfu') is not None else 'n/a'
    return (f'| {impl} | {r["mode"]} | {per_device_batch} | {r["dtype"]} | {clips:.2f} | '
            f'{1e3 * r["step_s_median"]:.1f} ({1e3 * r["step_s_p10"]:.1f}-'
            f'{1e3 * r["step_s_p90"]:.1f}) | {mem} | {mfu} | {ratio} |')

  for ours in jax_results:
    variant = ours.get('variant', 'default')
    impl = 'aim_jax' if variant == 'default' else f'aim_jax [{variant}]'
    if 'error' in ours:
      lines.append(f'| {impl} | {ours["mode"]} | | | {ours["error"].splitlines()[0][:60]} '
                   '| | | | n/a |')
    else:
      ratios = ''              # a variant: its ratio to every official row of its mode
      if variant != 'default':
        vs = compared.get('variant_ratio', {}).get(variant, {})
        ratios = ', '.join(f'{m} {vs[m][ours["mode"]]:.2f}x' for m in vs
                           if vs[m].get(ours['mode']) is not None)
      lines.append(row(impl, ours, ours['batch'] // ours['devices'],
                       ours['clips_per_s'] / ours['devices'], ratios))
    if variant != 'default':
      continue
    for theirs in compared['official']:
      if theirs['mode'] != ours['mode']:
        continue
      impl = f'official torch {theirs["official_mode"]}'
      if 'error' in theirs:
        lines.append(f'| {impl} | {theirs["mode"]} | {theirs["batch"]} | {theirs["dtype"]} '
                     f'| {theirs["error"].splitlines()[0][:60]} | | | | n/a |')
        continue
      ratio = compared['ratio'][theirs['official_mode']][ours['mode']]
      lines.append(row(impl, theirs, theirs['batch'], theirs['clips_per_s'],
                       'n/a' if ratio is None else f'{ratio:.2f}x'))
  return '\n'.join(lines)
