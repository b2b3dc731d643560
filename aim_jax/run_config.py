"""Run configs: checked once, before anything is compiled or written.

A run config (configs/*.py, `configs.common.get_base_config`) holds the model
config (`aim_jax.models.factory` owns its fields and resolves it), the data
config (`data_pipelines.config`; its clip length, classes and input size are
references to the model's), and the training fields checked here. Every error
is a `ConfigError` naming the field.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Optional

from aim_jax.errors import ConfigError, first_line, is_int, is_number
from aim_jax.models.factory import resolve_model_config


def resolve_model(model: Mapping | Any) -> dict:
  """The model config resolved (defaults filled, variant decoded), or a ConfigError."""
  try:
    return resolve_model_config(model)
  except (KeyError, ValueError) as e:
    raise ConfigError(str(e).strip('"')) from None


def positive_int(config: Any, name: str, value: Any, allow: tuple = ()) -> None:
  if value in allow:
    return
  if not is_int(value) or value <= 0:
    extra = f' (or {", ".join(map(str, allow))})' if allow else ''
    raise ConfigError(f'{name}={value!r} must be a positive integer{extra}')


# Option name prefixes that belong to one XLA backend: elsewhere they are left out, so
# that a GPU option in a shared config never reaches a TPU compiler that may not know it.
_PLATFORM_PREFIXES = {'xla_gpu_': 'gpu', 'xla_tpu_': 'tpu', 'xla_cpu_': 'cpu'}


def compiler_options(spec: str, platform: Optional[str] = None) -> dict[str, Any]:
  """config.compiler_options, 'NAME=VALUE,...', as `jax.jit(compiler_options=)`.

  'true'/'false' become booleans and numbers numbers; anything else stays a string
  for XLA to parse. An entry that is not NAME=VALUE is a ConfigError naming it. With
  `platform` ('gpu', 'tpu', 'cpu'), the options of another backend (xla_gpu_*,
  xla_tpu_*, xla_cpu_*) are left out.
  """
  out: dict[str, Any] = {}
  for entry in (e.strip() for e in str(spec).split(',')):
    if not entry:
      continue
    name, sep, value = (p.strip() for p in entry.partition('='))
    if not sep or not name or not value:
      raise ConfigError(f'compiler_options: {entry!r} is not NAME=VALUE '
                        "(e.g. 'xla_gpu_enable_dus_accumulator_zero_init_elimination=true')")
    owner = next((p for prefix, p in _PLATFORM_PREFIXES.items() if name.startswith(prefix)),
                 None)
    if platform is not None and owner is not None and owner != platform:
      continue
    if value.lower() in ('true', 'false'):
      out[name] = value.lower() == 'true'
      continue
    for kind in (int, float):
      try:
        out[name] = kind(value)
        break
      except ValueError:
        pass
    else:
      out[name] = value
  return out


def check_compiler_options(spec: str) -> None:
  """Compile a trivial program with the options this backend gets: a name or value that
  XLA does not take is a ConfigError here, not a failure after the data pipeline started."""
  import jax
  options = compiler_options(spec, jax.default_backend())
  if not options:
    return
  try:
    jax.jit(lambda: 0, compiler_options=options).lower().compile()
  except Exception as e:  # XLA's INVALID_ARGUMENT, as a runtime error
    raise ConfigError(f'compiler_options={spec!r}: XLA refuses them: {first_line(e)}') from None


def check_optimizer(o: Any) -> None:
  """optimizer.*: the name, schedule and every rate in its range."""
  number = is_number
  if o.name != 'adamw':
    raise ConfigError(f"optimizer.name={o.name!r} is not supported (only 'adamw')")
  if o.schedule not in ('cosine_epoch', 'cosine', 'constant'):
    raise ConfigError(f"optimizer.schedule={o.schedule!r} must be 'cosine_epoch', 'cosine' or "
                      "'constant'")
  for field, ok, want in (
      # a non-finite lr is left to the run's divergence check (exit 3, naming the step)
      ('lr', lambda v: not v < 0, '>= 0'),
      *((f, lambda v: number(v) and v >= 0, '>= 0')
        for f in ('min_lr', 'weight_decay', 'warmup_epochs', 'grad_clip_norm')),
      *((f, lambda v: number(v) and 0 <= v < 1, 'in [0, 1)') for f in ('b1', 'b2')),
      ('warmup_ratio', lambda v: number(v) and 0 <= v <= 1, 'in [0, 1]')):
    v = o[field]
    if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and ok(v)):
      raise ConfigError(f'optimizer.{field}={v!r} must be {want}')
  if not number(o.eps) or o.eps <= 0:
    raise ConfigError(f'optimizer.eps={o.eps!r} must be > 0')


def check_training_config(config: Any, process_count: int, dp_size: int, *,
                          compile_options: bool = True) -> None:
  """Every training field that can be wrong fails here, before compiling.

  `compile_options=False`: config.compiler_options are parsed, not compiled (a launcher,
  which must not start this machine's accelerator)."""
  from data_pipelines import config as data_config
  d = config.data
  data_config.check(d)
  data_config.views(d, config.eval.split)          # eval.split, its clips and crops
  check_optimizer(config.optimizer)
  for name in ('num_frames', 'num_classes', 'image_size'):
    if d[name] != config.model[name]:   # only when a config broke the references
      raise ConfigError(f'data.{name}={d[name]} differs from model.{name}='
                        f'{config.model[name]}: set model.{name} only')
  if not isinstance(config.total_steps, int) or config.total_steps < 0:
    raise ConfigError(f'total_steps={config.total_steps!r} must be >= 0 (0 = from total_epochs)')
  if config.total_epochs < 0 or not math.isfinite(config.total_epochs):
    raise ConfigError(f'total_epochs={config.total_epochs!r} must be >= 0')
  if config.total_steps == 0 and config.total_epochs == 0:
    raise ConfigError('set total_steps or total_epochs (both are 0)')
  if not isinstance(config.steps_per_epoch, int) or config.steps_per_epoch < 0:
    raise ConfigError(f'steps_per_epoch={config.steps_per_epoch!r} must be >= 0 (0 = counted)')
  positive_int(config, 'batch_size', config.batch_size)
  positive_int(config, 'grad_accum_steps', config.grad_accum_steps)
  positive_int(config, 'log_every_steps', config.log_every_steps)
  positive_int(config, 'checkpoint.every_steps', config.checkpoint.every_steps)
  positive_int(config, 'checkpoint.keep', config.checkpoint.keep)
  positive_int(config, 'eval.batch_size', config.eval.batch_size)
  if not isinstance(config.eval_every_steps, int) or config.eval_every_steps < -1:
    raise ConfigError(f'eval_every_steps={config.eval_every_steps!r} must be a positive '
                      'integer, 0 (every 5 epochs) or -1 (never)')
  accum = config.grad_accum_steps
  if config.batch_size % accum:
    raise ConfigError(f'batch_size={config.batch_size} is not divisible by '
                      f'grad_accum_steps={accum}')
  micro = config.batch_size // accum
  if micro % dp_size:
    raise ConfigError(
        f'batch_size={config.batch_size} (per micro-batch {micro} with grad_accum_steps='
        f'{accum}) is not divisible by the data-parallel size {dp_size} '
        '(mesh.data x mesh.fsdp)')
  if config.batch_size % process_count:
    raise ConfigError(f'batch_size={config.batch_size} is not divisible by the number of '
                      f'processes {process_count}')
  # Each process evaluates eval.batch_size / processes videos a step; the multi-view engine
  # pads that to fill its devices (multiview.padded_batch_size), so the data-parallel size
  # need not divide it.
  if config.eval.batch_size % process_count:
    raise ConfigError(f'eval.batch_size={config.eval.batch_size} is not divisible by the '
                      f'number of processes {process_count}')
  if config.device_prefetch < 0:
    raise ConfigError(f'device_prefetch={config.device_prefetch} must be >= 0 (0 = no prefetch)')
  if config.eval.average_clips not in ('prob', 'score'):
    raise ConfigError(f"eval.average_clips must be 'prob' or 'score', got "
                      f'{config.eval.average_clips!r}')
  spec = config.get('compiler_options', '')
  if compile_options:
    check_compiler_options(spec)
  else:
    compiler_options(spec)
  if not 0 <= config.label_smoothing < 1:
    raise ConfigError(f'label_smoothing={config.label_smoothing} is not in [0, 1)')
  if config.mixup_alpha < 0:
    raise ConfigError(f'mixup_alpha={config.mixup_alpha} must be >= 0')


# Fields that only change how the model runs (or trains), never what it computes at
# test time: taken from the config file, not the checkpoint.
EXECUTION_FIELDS = ('scan_layers', 'remat_policy', 'dtype', 'param_dtype', 'attention_impl',
                    'attention_pad_multiple', 'attention_pad_mode', 'qkv_projection',
                    'temporal_attention', 'dropout_rate', 'drop_path_rate', 'drop_path_mode',
                    'variant', 'joint_mlp', 'norm_impl', 'mlp_impl')


def _differs(a: Any, b: Any) -> bool:
  if isinstance(a, float) or isinstance(b, float):
    try:
      return not math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    except (TypeError, ValueError):
      return True
  if isinstance(a, Mapping) and isinstance(b, Mapping):   # nested fields (model.swin)
    return a.keys() != b.keys() or any(_differs(a[k], b[k]) for k in a)
  if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
    return list(a) != list(b)
  return a != b


def merge_model_config(config_model: Optional[Mapping], checkpoint_model: Mapping) -> dict:
  """The checkpoint's architecture with the config's execution options.

  Raises ValueError naming every architecture field on which they disagree.
  `config_model=None` takes the checkpoint's config as it is.
  """
  ckpt = resolve_model(checkpoint_model)
  if config_model is None:
    return ckpt
  cfg = resolve_model(config_model)
  bad = []
  for key in ckpt:
    if key in EXECUTION_FIELDS:
      continue
    if key == 'adapters':
      if not ckpt['adapters']['enabled'] and not cfg['adapters']['enabled']:
        continue
      for k in ckpt['adapters']:
        if _differs(cfg['adapters'][k], ckpt['adapters'][k]):
          bad.append(f'model.adapters.{k}: config {cfg["adapters"][k]!r}, '
                     f'checkpoint {ckpt["adapters"][k]!r}')
    elif _differs(cfg[key], ckpt[key]):
      bad.append(f'model.{key}: config {cfg[key]!r}, checkpoint {ckpt[key]!r}')
  if bad:
    raise ConfigError('the config does not describe the checkpoint\'s model: '
                     + '; '.join(bad))
  out = dict(ckpt)
  for key in EXECUTION_FIELDS:
    if key != 'variant':
      out[key] = cfg[key]
  return out


# ---------------------------------------------------------------------------------------
# The command line: `--config FILE[:ARG]` and `--config.FIELD=VALUE` overrides.
# ---------------------------------------------------------------------------------------
def _flag_value(argv: list[str], name: str) -> Optional[str]:
  for i, arg in enumerate(argv):
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
  return None


def _loaded_config(flags: Any, config_arg: str) -> Any:
  """The config file's config, without the overrides (None if it does not load)."""
  try:
    return flags.FLAGS['config'].parser.parse(config_arg)
  except Exception:  # reported by the caller
    return None


def command_line_error(argv: list[str], error: BaseException) -> str:
  """What went wrong while parsing `argv`, in one line naming the flag, file or field."""
  import os

  from absl import flags
  text = str(error)
  if 'Traceback (most recent call last)' in text:   # a config file's get_config() raised
    lines = [line.strip() for line in text.strip().split('\n') if line.strip()]
    text = f'{lines[0].split(": Error whilst")[0]}: {lines[-1]}'
  text = ' '.join(text.split())
  config_arg = _flag_value(argv, 'config')
  if config_arg is not None:
    path = config_arg.split(':', 1)[0]
    if not os.path.exists(path):
      return f'--config {config_arg}: config file {path} does not exist'
    config = _loaded_config(flags, config_arg)
    if hasattr(config, 'to_dict'):
      from ml_collections.config_flags import config_path
      for arg in argv[1:]:
        if arg.startswith('--config.'):
          field = arg[len('--config.'):].split('=', 1)[0]
          try:
            config_path.get_value(field, config)
          except (AttributeError, KeyError, IndexError, ValueError):
            return f'{arg}: the config ({path}) has no field {field}'
  if isinstance(error, flags.Error):            # absl's own: names the flag already
    return text
  if config_arg is not None:
    return f'--config {config_arg}: {type(error).__name__}: {text}'
  return f'{type(error).__name__}: {text}'


def check_config_type(config: Any, spec: Optional[str]) -> None:
  """A config file's get_config() must return an ml_collections ConfigDict: every part of
  the project reads fields as attributes (`config.model.name`)."""
  import ml_collections
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(
        f'get_config() of {spec.split(":", 1)[0] if spec else "the config file"} returned '
        f'a {type(config).__name__}, not an ml_collections.ConfigDict: return '
        f'ml_collections.ConfigDict(...) of it')


def flags_parser(prog: str):
  """An absl `app.run(flags_parser=...)`: a bad flag, config file, config argument or
  override, or a stray positional argument, ends the command with one line and
  `EXIT_USER_ERROR`, not a traceback (`AIM_JAX_TRACEBACK=1` shows it)."""
  def parse(argv: list[str]) -> list[str]:
    import sys

    from absl import flags

    from aim_jax import errors
    try:
      rest = flags.FLAGS(argv)
      if 'config' in flags.FLAGS and flags.FLAGS.config is not None:
        flags.FLAGS.config.keys()   # config_flags defers a file that failed to load to here
        check_config_type(flags.FLAGS.config, _flag_value(argv, 'config'))
    except Exception as e:  # everything here comes from the command line or the config file
      if errors.show_traceback():
        raise
      print(f'{prog}: {command_line_error(argv, e)}', file=sys.stderr, flush=True)
      raise SystemExit(errors.EXIT_USER_ERROR) from None
    if len(rest) > 1:
      raise SystemExit(errors.report(ConfigError(
          f'unexpected arguments {rest[1:]}: every option is a --flag (--help lists them)'),
          prog))
    return rest
  return parse
