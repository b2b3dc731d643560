"""The sharded training state of a run, and the compiled steps that advance it.

`create_train_state(config, mesh)` is the one place a training setup is built:
train.py, the step benchmark and the tests all call it. It resolves the model
config, builds the model and the optimiser (only the trainable parameters get
updates, through optax masking: `aim_jax.optim`), derives every sharding from the
logical axis rules, and returns an abstract `TrainSetup`; `init_state` (fresh
parameters, optionally merged with `init_from`) or the checkpoint restore then
fill it. The state is a dict {'step', 'params', 'opt_state'} so that orbax and
`jax.jit` see a plain tree.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from aim_jax import optim, sharding, steps
from aim_jax import params as P
from aim_jax.models import attention_choice
from aim_jax.models.factory import build_model
from aim_jax.run_config import compiler_options, resolve_model


@dataclasses.dataclass
class TrainSetup:
  """Everything about a training state except its values."""
  config: Any
  model_cfg: dict
  model: nn.Module
  mesh: Mesh
  rules: tuple
  tx: optax.GradientTransformation
  labels: Any                        # optimiser group of every leaf (optim.param_labels)
  schedule: optim.Schedule
  trainable: frozenset               # '/'-joined names of the trainable leaves
  boxed: Any                         # abstract params with their logical-axis boxes
  abstract_params: Any
  abstract_opt: Any
  param_shardings: Any
  opt_shardings: Any
  state_shardings: dict
  batch_shardings: dict

  @property
  def replicated(self):
    return sharding.replicated(self.mesh)

  def split(self, tree: Any) -> tuple[dict, dict]:
    """A parameter tree -> (trainable, frozen) nested trees."""
    train, frozen = steps.split_params(tree, self.trainable)
    return P.unflatten(train), P.unflatten(frozen)

  def traced(self):
    """Context in which the model is traced: the global mesh plus the logical rules, so
    the model's activation constraints join the explicit in/out shardings."""
    return sharding.mesh_context(self.mesh, self.rules)

  def describe(self) -> list[str]:
    flat = P.flatten(self.abstract_params)
    n_train = sum(int(np.prod(v.shape)) for k, v in flat.items() if k in self.trainable)
    n_total = sum(int(np.prod(v.shape)) for v in flat.values())
    return [f'parameters: {n_train} trainable of {n_total} ({100 * n_train / n_total:.2f}%)']


def run_once(jitted: Any, *args: Any) -> Any:
  """Call a jitted function that runs once per process (the parameter initialisation).

  On CPU it is compiled without LLVM's optimisation passes: they take seconds on the
  unrolled random-number code of every parameter's initialiser and buy nothing for one
  call. The random bits are integer arithmetic and identical; float rounding in the
  transforms (truncated normal) may differ from an optimised build by ~1e-8.
  """
  lowered = jitted.lower(*args)
  if jax.default_backend() == 'cpu':
    return lowered.compile({'xla_backend_optimization_level': 0})(*args)
  return lowered.compile()(*args)


def _init_fn(model: nn.Module, model_cfg: dict, batch: int) -> Callable:
  t, s = model_cfg['num_frames'], model_cfg['image_size']
  dummy = jnp.zeros((batch, t, s, s, 3), jnp.float32)
  return lambda rng: model.init({'params': rng}, dummy, train=False)['params']


def create_train_state(config: Any, mesh: Mesh, *, steps_per_epoch: int = 1000,
                       total_steps: int = 10000, model_cfg: Optional[dict] = None
                       ) -> TrainSetup:
  """The abstract training setup of `config` on `mesh` (nothing is allocated)."""
  model_cfg = dict(model_cfg) if model_cfg is not None else resolve_model(config.model)
  rules = sharding.axis_rules(config.logical_axis_rules)
  # 'auto' attention fields are chosen for the mesh's devices (which may be compile-only).
  model = build_model(model_cfg, *attention_choice.platform_of(mesh.devices.flat))
  init = _init_fn(model, model_cfg, sharding.data_parallel_size(mesh))
  rng = jax.random.key(config.seed)   # made before the mesh: it may hold compile-only devices
  with sharding.mesh_context(mesh, rules):
    boxed = jax.eval_shape(init, rng)
  param_shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract_params = nn.unbox(boxed)
  mask = P.trainable_mask(abstract_params, list(config.trainable), config.full_finetune)
  schedule = optim.make_schedule(config.optimizer, steps_per_epoch, total_steps)
  tx, labels = optim.make_optimizer(abstract_params, config.optimizer, schedule,
                               list(config.trainable), config.full_finetune)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = sharding.like_params(param_shardings, abstract_opt, mesh)
  rep = sharding.replicated(mesh)
  return TrainSetup(
      config=config, model_cfg=model_cfg, model=model, mesh=mesh, rules=rules, tx=tx,
      labels=labels, schedule=schedule, trainable=steps.trainable_names(mask), boxed=boxed,
      abstract_params=abstract_params, abstract_opt=abstract_opt,
      param_shardings=param_shardings, opt_shardings=opt_shardings,
      state_shardings={'step': rep, 'params': param_shardings, 'opt_state': opt_shardings},
      batch_shardings={'video': sharding.batch_sharding(mesh, 5),
                       'label': sharding.batch_sharding(mesh, 1)})


def init_params(setup: TrainSetup, host_params: Optional[dict] = None) -> Any:
  """Fresh parameters in their shardings; `host_params` (numpy) replaces them if given."""
  if host_params is not None:
    return jax.tree.map(lambda x, sh: jax.make_array_from_callback(
        x.shape, sh, lambda idx, x=x: x[idx]), host_params, setup.param_shardings)
  init = _init_fn(setup.model, setup.model_cfg, sharding.data_parallel_size(setup.mesh))
  with setup.traced():
    return run_once(jax.jit(lambda r: nn.unbox(init(r)), out_shardings=setup.param_shardings),
                    jax.random.key(setup.config.seed))


def state_from_params(setup: TrainSetup, params: Any, step: int = 0,
                      opt_state: Any = None) -> dict:
  if opt_state is None:
    opt_state = jax.jit(setup.tx.init, out_shardings=setup.opt_shardings)(params)
  return {'step': jax.device_put(jnp.asarray(step, jnp.int32), setup.replicated),
          'params': params, 'opt_state': opt_state}


def host_params(params: Any) -> dict:
  return jax.tree.map(np.asarray, jax.device_get(params))


def attention_fields(setup: TrainSetup) -> dict:
  """The attention program the model was built with ('auto' made concrete): a ViT's
  attention_impl, qkv_projection and temporal_attention; {} for a Swin."""
  backbone = setup.model.backbone
  return {k: getattr(backbone, k) for k in attention_choice.FIELDS if hasattr(backbone, k)}


def abstract_train_args(setup: TrainSetup, batch: int) -> tuple[dict, dict]:
  """(state, batch) of the train step as shaped, sharded placeholders: enough to
  lower and compile it (`train_step_fn(setup).lower(*args)`) without values."""
  like = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  mc = setup.model_cfg
  state = {'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=setup.replicated),
           'params': jax.tree.map(like, setup.abstract_params, setup.param_shardings),
           'opt_state': jax.tree.map(like, setup.abstract_opt, setup.opt_shardings)}
  video = jax.ShapeDtypeStruct((batch, mc['num_frames'], mc['image_size'], mc['image_size'], 3),
                               jnp.float32, sharding=setup.batch_shardings['video'])
  label = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=setup.batch_shardings['label'])
  return state, {'video': video, 'label': label}


def train_step_fn(setup: TrainSetup) -> Callable:
  """jit(state, batch) -> (state, metrics); the state is donated. Compiled with the XLA
  options of `config.compiler_options` for the mesh's platform."""
  c = setup.config
  fn = functools.partial(
      steps.train_step, model=setup.model, tx=setup.tx, trainable=setup.trainable,
      seed=c.seed, num_classes=setup.model_cfg['num_classes'], accum_steps=c.grad_accum_steps,
      label_smoothing=c.label_smoothing, mixup_alpha=c.mixup_alpha, schedule=setup.schedule)
  return jax.jit(fn, in_shardings=(setup.state_shardings, setup.batch_shardings),
                 out_shardings=(setup.state_shardings, setup.replicated), donate_argnums=(0,),
                 compiler_options=compiler_options(c.get('compiler_options', ''),
                                                   setup.mesh.devices.flat[0].platform) or None)


def eval_logits_fn(setup: TrainSetup) -> Callable:
  """jit(params, video (B, T, H, W, C)) -> logits (B, K)."""
  fn = functools.partial(steps.eval_logits, model=setup.model)
  return jax.jit(lambda p, v: fn(p, video=v),
                 in_shardings=(setup.param_shardings, sharding.batch_sharding(setup.mesh, 5)),
                 out_shardings=sharding.batch_sharding(setup.mesh, 2))
