"""The test setup itself (tests/conftest.py): the XLA flags it gives every test process."""
import os

from conftest import known_to_xla


def test_a_flag_this_xla_does_not_know_is_dropped_and_known_ones_kept():
  """XLA aborts a process at start-up on a flag it does not know; the setup keeps only the
  flags the installed XLA accepts (a subprocess tries them), in their order."""
  known = ['--xla_force_host_platform_device_count=2', '--xla_backend_optimization_level=0']
  assert known_to_xla([known[0], '--xla_flag_that_no_xla_knows=true', known[1]]) == known


def test_every_flag_the_tests_run_with_is_known_to_this_xla():
  flags = os.environ['XLA_FLAGS'].split()
  assert '--xla_force_host_platform_device_count=8' in flags
  assert '--xla_backend_optimization_level=0' in flags
  assert known_to_xla(flags) == flags
