"""XLA flags of the test processes and of every subprocess they start.

Only the tests set these; the package and its commands never do.
"""
from __future__ import annotations

import os

# The tests compile many small programs and run each a few times, so LLVM's
# optimisation passes cost more compile time than they save run time (the
# whole suite took 15.1 min instead of 17.6 on 2 cores; a tiny codec's
# initialisation compiles in 11 s instead of 17). With that, XLA:CPU's older
# elemental fusion emitters compile in half the time of its MLIR fusion
# emitters, and the programs run as fast (a tiny codec's GAN step: 5.2 s instead
# of 10.2, a tiny decoder's train step 0.7 s instead of 1.5). At the default
# optimisation level they are slower (the micro quickstart: 191 s instead of 158).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a process of `devices` virtual CPU devices."""
  return f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"


def subprocess_env(devices: int = 1, **extra: str) -> dict[str, str]:
  """This process's environment (which carries the run's compilation cache and
  shared directory) for a subprocess of `devices` virtual CPU devices."""
  return dict(os.environ, XLA_FLAGS=xla_flags(devices), **extra)
