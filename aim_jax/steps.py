"""Pure train and eval steps. Dependencies come in as keyword arguments
(bind them with functools.partial before jax.jit), as in Scenic's trainers.

Train state (a plain dict, so orbax and shardings see an ordinary pytree):
  {'step': int32 scalar, 'params': full parameter tree, 'opt_state': optax state}
Frozen parameters are passed through untouched (not `p + 0`), so they stay
bit-identical; gradients are taken with respect to the trainable leaves only.
"""

from __future__ import annotations

from typing import Any, Callable, Collection

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from aim_jax import params as P

State = dict


def split_params(params: Any, trainable: Collection[str]) -> tuple[dict, dict]:
  """Full tree -> ({name: leaf} trainable, {name: leaf} frozen), '/'-joined names."""
  flat = P.flatten(params)
  train = {k: v for k, v in flat.items() if k in trainable}
  frozen = {k: v for k, v in flat.items() if k not in trainable}
  return train, frozen


def trainable_names(mask: Any) -> frozenset[str]:
  return frozenset(k for k, v in P.flatten(mask).items() if v)


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example loss. Smoothing as mmaction's LabelSmoothing: on = 1-s+s/K, off = s/K."""
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _loss(train: dict, frozen: dict, video: jax.Array, labels: jax.Array, rng: jax.Array, *,
          model: nn.Module, num_classes: int, label_smoothing: float,
          mixup_alpha: float) -> tuple[jax.Array, dict]:
  params = P.unflatten({**frozen, **train})
  drop_rng, mix_rng = jax.random.split(rng)
  if mixup_alpha > 0:
    # Mixup (Zhang et al. 2018) with the batch reversed; not in the official recipe.
    lam = jax.random.beta(mix_rng, mixup_alpha, mixup_alpha)
    video = lam * video + (1 - lam) * video[::-1]
  logits = model.apply({'params': params}, video, train=True, rngs={'dropout': drop_rng})
  loss = cross_entropy(logits, labels, num_classes, label_smoothing)
  if mixup_alpha > 0:
    loss = lam * loss + (1 - lam) * cross_entropy(logits, labels[::-1], num_classes,
                                                  label_smoothing)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return loss.mean(), {'accuracy': correct.mean()}


def train_step(state: State, batch: dict, *, model: nn.Module,
               tx: optax.GradientTransformation, trainable: Collection[str], seed: int,
               num_classes: int, accum_steps: int = 1, label_smoothing: float = 0.0,
               mixup_alpha: float = 0.0,
               schedule: Callable[[Any], Any] | None = None) -> tuple[State, dict]:
  """One optimiser step on a global batch {'video': (B,T,H,W,C), 'label': (B,)}.

  With accum_steps > 1 the batch is cut into accum_steps micro-batches
  (example i goes to micro-batch i % accum_steps, so each stays spread over
  every data-parallel device) and their mean gradient is applied once.
  Randomness: fold_in(key(seed), step) [, micro-batch]: independent of the mesh.
  """
  step = state['step']
  rng = jax.random.fold_in(jax.random.key(seed), step)
  train, frozen = split_params(state['params'], trainable)
  loss_fn = jax.value_and_grad(
      lambda t, v, y, r: _loss(t, frozen, v, y, r, model=model, num_classes=num_classes,
                               label_smoothing=label_smoothing, mixup_alpha=mixup_alpha),
      has_aux=True)
  video, labels = batch['video'], batch['label']
  if accum_steps == 1:
    (loss, aux), grads = loss_fn(train, video, labels, rng)
  else:
    b = video.shape[0]
    # (B, ...) -> (B/A, A, ...) -> (A, B/A, ...): micro-batch i = examples i, i+A, ...
    micro_v = jnp.swapaxes(video.reshape(b // accum_steps, accum_steps, *video.shape[1:]), 0, 1)
    micro_y = labels.reshape(b // accum_steps, accum_steps).T

    def body(carry, xs):
      g_sum, l_sum, a_sum = carry
      i, v, y = xs
      (loss_i, aux_i), g = loss_fn(train, v, y, jax.random.fold_in(rng, i))
      g_sum = jax.tree.map(jnp.add, g_sum, g)
      return (g_sum, l_sum + loss_i, a_sum + aux_i['accuracy']), None

    zeros = jax.tree.map(jnp.zeros_like, train)
    (g_sum, l_sum, a_sum), _ = jax.lax.scan(
        body, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
        (jnp.arange(accum_steps), micro_v, micro_y))
    grads = jax.tree.map(lambda g: g / accum_steps, g_sum)
    loss, aux = l_sum / accum_steps, {'accuracy': a_sum / accum_steps}

  # The optimiser sees the full tree: frozen leaves carry zero gradients, which
  # multi_transform routes to set_to_zero (XLA removes them; no state, no update).
  full_grads = P.unflatten({**{k: jnp.zeros_like(v) for k, v in frozen.items()}, **grads})
  updates, opt_state = tx.update(full_grads, state['opt_state'], state['params'])
  flat_updates = P.flatten(updates)
  new_train = {k: (v + flat_updates[k]).astype(v.dtype) for k, v in train.items()}
  new_state = {'step': step + 1, 'params': P.unflatten({**frozen, **new_train}),
               'opt_state': opt_state}
  # The norms let the loop refuse to checkpoint a state that is not finite.
  opt_floats = [x for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
  metrics = {'loss': loss, 'accuracy': aux['accuracy'],
             'grad_norm': optax.global_norm(grads), 'param_norm': optax.global_norm(new_train),
             'opt_state_norm': optax.global_norm(opt_floats)}
  if schedule is not None:
    metrics['lr'] = schedule(step)
  return new_state, metrics


def eval_logits(params: Any, model: nn.Module, video: jax.Array) -> jax.Array:
  """Deterministic logits. (B,T,H,W,C) -> (B,K); (B,V,T,H,W,C) -> (B,V,K)."""
  if video.ndim == 6:
    b, v = video.shape[:2]
    logits = model.apply({'params': params}, video.reshape(b * v, *video.shape[2:]),
                         train=False)                  # (B*V, T, H, W, C) -> (B*V, K)
    return logits.reshape(b, v, -1)
  return model.apply({'params': params}, video, train=False)
