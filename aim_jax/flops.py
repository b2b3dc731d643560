"""Analytic compute of the AIM ViT, counted the way the paper counts it.

The paper's "GFLOPs" (202 per 8x224 view for B/16, fvcore-style) are
multiply-accumulates of the matrix products: patch embedding, q/k/v and output
projections, the two attention products, the MLP, and the adapters. Norms,
softmax, activations and additions are left out (<1%). `forward_macs` returns
that number; hardware FLOPs are 2 x MACs.

Training executes the forward pass, the backward pass through the activations
(about one more forward's worth of MACs), and weight gradients only for the
trainable parameters (AIM never computes them for the frozen backbone):
`train_macs = 2 * forward + trainable weight-gradient MACs`.
"""

from __future__ import annotations

from typing import Mapping

from aim_jax.models.factory import adapter_spec, resolve_model_config


def _vit_macs(cfg: Mapping, frames: int) -> dict[str, float]:
  d, layers, p, r = cfg['width'], cfg['layers'], cfg['patch_size'], cfg['image_size']
  grid = r // p
  tokens = grid * grid + 1
  hidden = int(d * cfg['mlp_ratio'])
  spec = adapter_spec(cfg)
  ah = int(d * spec.ratio) if spec else 0
  out = dict(patch_embed=frames * grid * grid * 3 * p * p * d, attention=0.0, mlp=0.0,
             temporal_attention=0.0, adapters=0.0, adapter_weight_grads=0.0)
  for i in range(layers):
    per_frame_attn = 4 * tokens * d * d + 2 * tokens * tokens * d   # qkv+out, QK^T and AV
    out['attention'] += frames * per_frame_attn
    out['mlp'] += frames * 2 * tokens * d * hidden
    if spec is None or not spec.applies_to(i):
      continue
    n_adapters = spec.spatial + spec.joint + spec.temporal * spec.num_tadapter
    adapter = 2 * tokens * d * ah                                  # D_fc1 + D_fc2 per frame
    out['adapters'] += frames * n_adapters * adapter
    out['adapter_weight_grads'] += frames * n_adapters * adapter
    if spec.temporal:
      # frozen attention re-run along time: projections per token, T x T products per token
      out['temporal_attention'] += frames * (4 * tokens * d * d) + 2 * tokens * frames * frames * d
  return out


def forward_macs(model_config: Mapping) -> float:
  """Multiply-accumulates of one forward pass of one clip (one view)."""
  cfg = resolve_model_config(model_config)
  if cfg['backbone'] not in ('clip', 'clip_gelu', 'vit_in21k'):
    raise ValueError(f'analytic FLOPs are implemented for ViT backbones, not {cfg["backbone"]!r}')
  parts = _vit_macs(cfg, cfg['num_frames'])
  head = cfg['width'] * cfg['num_classes']
  return float(sum(v for k, v in parts.items() if k != 'adapter_weight_grads') + head)


def train_macs(model_config: Mapping, full_finetune: bool = False) -> float:
  """MACs of one training step per clip (forward + backward), see module docstring."""
  cfg = resolve_model_config(model_config)
  fwd = forward_macs(cfg)
  if full_finetune:
    return 3.0 * fwd
  parts = _vit_macs(cfg, cfg['num_frames'])
  head = cfg['width'] * cfg['num_classes']
  return 2.0 * fwd + parts['adapter_weight_grads'] + head
