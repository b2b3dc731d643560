"""Analytic compute matches the paper's per-view GFLOPs (multiply-accumulates)."""

import pytest

from aim_jax.flops import forward_macs, train_macs


@pytest.mark.parametrize('cfg,paper_gflops', [
    (dict(variant='B/16', num_frames=8), 202),    # README: 606 / 3 views
    (dict(variant='B/16', num_frames=16), 405),   # 1214 / 3
    (dict(variant='B/16', num_frames=32), 809),   # 2428 / 3
    (dict(variant='L/14', num_frames=32), 3736),  # 11208 / 3
])
def test_forward_macs_match_the_model_zoo_per_view(cfg, paper_gflops):
  assert forward_macs(cfg) / 1e9 == pytest.approx(paper_gflops, rel=0.005)


def test_training_counts_no_weight_gradients_for_the_frozen_backbone():
  cfg = dict(variant='B/16')
  fwd, aim = forward_macs(cfg), train_macs(cfg)
  assert 2 * fwd < aim < 2.2 * fwd
  assert train_macs(cfg, full_finetune=True) == pytest.approx(3 * fwd)
