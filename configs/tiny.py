"""A 2-layer AIM on the built-in synthetic videos: the CI smoke run (CPU, ~1 min).

  python -m aim_jax.train --config configs/tiny.py --workdir /tmp/aim_tiny

Expect the training loss to fall from ~ln(num_classes) = 1.6 to well below 1
within the run: each synthetic class has its own fixed spatio-temporal pattern.
Every training feature is on (adapters only, sharding rules, checkpoints,
validation), only the sizes are small.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, frames=4, steps=120)
  c = common.get_base_config()
  c.model.variant = ''
  c.model.update(dict(patch_size=8, width=32, layers=2, heads=2, image_size=32,
                      num_classes=5, dropout_rate=0.0, drop_path_rate=0.1))
  common.set_frames(c, a.frames)
  c.data.source = 'synthetic'
  c.data.num_classes = 5
  c.data.image_size = 32
  c.data.num_train_examples = 160
  c.batch_size = 8
  c.total_steps = a.steps
  c.steps_per_epoch = 20
  c.optimizer.lr = 1e-2
  c.optimizer.warmup_epochs = 1.0
  c.checkpoint.every_steps = 40
  c.checkpoint.keep = 2
  c.log_every_steps = 10
  c.eval_every_steps = 60
  c.eval.batch_size = 8
  c.lock()
  return c
