"""The benchmark times real jitted steps and reports consistent figures."""

import pytest

from benchmarks import step_benchmark
from configs import tiny


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_time_steps_reports_consistent_figures(mode):
  config = tiny.get_config()
  r = step_benchmark.time_steps(config, batch=4, mode=mode, steps_n=3, warmup=1)
  assert r['steps'] == 3 and r['batch'] == 4 and r['devices'] >= 1
  assert r['step_s_p10'] <= r['step_s_median'] <= r['step_s_p90']
  assert r['clips_per_s'] == pytest.approx(4 / r['step_s_median'])
  assert r['compile_s'] > 0 and r['gmacs_per_clip'] > 0
  assert r['mfu'] is None  # no bf16 peak is claimed for a CPU
  assert step_benchmark.format_row(r).count('|') == 12


def test_peak_table_knows_the_accelerators_we_report():
  class Dev:
    device_kind = 'NVIDIA H100 80GB HBM3'
  assert step_benchmark.device_peak(Dev()) == 989e12
