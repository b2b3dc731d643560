"""Image pre-training of the demo's small CLIP-architecture ViT on static digit frames.

A new user has no CLIP weights; the demo makes its own image model the way
CLIP's is used: trained on single images only, then saved in exactly the
parameter-checkpoint format that CLIP conversion writes (encoder params in
loop layout + an image-encoder model config with backbone='clip'), so
`init_from` loads it as it would load converted CLIP weights.

  python -m projects.moving_digits.pretrain --out demo_workdir/pretrained
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax

from aim_jax import checkpoints, sharding
from aim_jax.models import factory


class ImageClassifier(nn.Module):
  """Image encoder + linear probe; only the encoder is kept after pre-training."""
  encoder: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    features = self.encoder(images, train=train)                 # (N, D)
    return nn.Dense(self.num_classes, name='head')(features)


def image_model_config(backbone: Mapping) -> dict:
  """The image-encoder model config a CLIP conversion would write for this backbone."""
  return factory.resolve_model_config(dict(backbone, drop_path_rate=0.0))


def normalise(frames: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 (..., 3) -> float32 normalised exactly as the video pipeline does (0..255 mean/std)."""
  return ((frames.astype(np.float32) - np.asarray(mean, np.float32))
          / np.asarray(std, np.float32))


def pretrain(out_dir: str, backbone: Mapping, *, steps: int = 1000, batch: int = 128,
             lr: float = 1e-3, seed: int = 0, pool: int = 16384, mean=None, std=None,
             log_every: int = 100) -> dict:
  """Train encoder + probe on digit frames; save the encoder; -> metrics dict."""
  from data_pipelines import config as data_config
  from projects.moving_digits import data as md
  d = data_config.default_data_config()
  mean = d.mean if mean is None else mean
  std = d.std if std is None else std
  cfg = image_model_config(backbone)
  model = ImageClassifier(factory.build_encoder(cfg), num_classes=10)

  t0 = time.time()
  # A fixed pool of rendered frames (fresh pose, colour and texture each), sampled per step.
  x_pool, y_pool = md.static_frames('train', pool, seed)
  x_test, y_test = md.static_frames('test', 1000, seed)
  x_pool, x_test = normalise(x_pool, mean, std), normalise(x_test, mean, std)
  print(f'pre-training frames: {len(x_pool)} train, {len(x_test)} held-out digits '
        f'({time.time() - t0:.0f} s)', flush=True)

  size = cfg['image_size']
  params = nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3))))['params']
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps)
  tx = optax.adamw(schedule, weight_decay=0.05)
  opt_state = tx.init(params)

  # Data parallel over this process's devices when the batch splits evenly (the CI demo runs
  # on 2 CPU devices: 100 steps in 3.9-4.6 s instead of 7.0-7.7, with 40% less CPU time);
  # on one device, as `make demo` runs, this is the plain single-device step.
  devices = jax.local_devices()
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1)),
                            devices if batch % len(devices) == 0 else devices[:1])
  replicated, split = sharding.replicated(mesh), sharding.batch_sharding(mesh, 1)
  params, opt_state = jax.device_put((params, opt_state), replicated)

  @functools.partial(jax.jit, in_shardings=(replicated, replicated, split, split),
                     out_shardings=(replicated, replicated, replicated))
  def train_step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({'params': p}, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def predict(params, x):
    return jnp.argmax(model.apply({'params': params}, x), -1)

  rng = np.random.default_rng([seed, 7])
  t1, losses = time.time(), []
  bar = _bar(steps)
  for step in range(1, steps + 1):
    idx = rng.integers(len(x_pool), size=batch)
    params, opt_state, loss = train_step(params, opt_state, x_pool[idx], y_pool[idx])
    # One step in flight at a time. With many queued, XLA's CPU runtime can deadlock in the
    # gradients' all-reduce between devices under load (aborting after 40 s: seen in CI,
    # reproduced twice in 1,500 steps beside three busy processes; none when each step
    # is waited for). Waiting costs nothing here: 100 steps 3.7-3.9 s either way.
    loss.block_until_ready()
    if step % log_every == 0 or step == steps:
      losses.append((step, float(loss)))
      bar.set_postfix(loss=f'{float(loss):.3f}')
    bar.update(1)
  bar.close()
  train_s = time.time() - t1
  params = jax.device_get(params)
  preds = np.concatenate([np.asarray(predict(params, x_test[i:i + 250]))
                          for i in range(0, len(x_test), 250)])
  acc = float((preds == y_test).mean())
  metrics = {'heldout_top1': acc, 'steps': steps, 'batch': batch, 'lr': lr,
             'train_seconds': round(train_s, 1), 'losses': losses}
  print(f'pre-training: held-out digit top-1 {acc:.1%} after {steps} steps ({train_s:.0f} s)',
        flush=True)
  checkpoints.save_params(out_dir, params['encoder'], cfg, metadata={
      'source': 'moving digits image pre-training (projects.moving_digits.pretrain)',
      'format': 'clip', 'kind': 'image', **{k: v for k, v in metrics.items() if k != 'losses'}})
  return metrics


def _bar(total: int):
  from tqdm import tqdm
  return tqdm(total=total, desc='image pre-training', unit='step', mininterval=1.0)


def main(argv: Sequence[str] | None = None) -> None:
  from projects.moving_digits import config as demo_config
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', required=True)
  p.add_argument('--steps', type=int, default=1000)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--lr', type=float, default=1e-3)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  pretrain(args.out, demo_config.BACKBONE, steps=args.steps, batch=args.batch, lr=args.lr,
           seed=args.seed)


if __name__ == '__main__':
  main()
