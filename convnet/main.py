"""Command-line entry point: parse flags, then call train.train_and_evaluate.

    python -m convnet.main --config configs/default.py --workdir runs/default \
        [--config.model.filters=64 --config.model.kernel_size=5 ...]
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from convnet import config_lib, parallel, train

CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/default.py '
                                         '(or configs/default.py:smoke).', lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for config.json, metrics.jsonl, '
                              'results.json.')
ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False, 'Resume a workdir even though its config.json differs in keys '
    'that change results (e.g. to train for more epochs).')
COORDINATOR = flags.DEFINE_string(
    'coordinator_address', os.environ.get('JAX_COORDINATOR_ADDRESS', ''),
    'Multi-process runs: host:port of process 0 (default $JAX_COORDINATOR_ADDRESS); '
    'empty = one process.')
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                     'Multi-process runs: how many (default $JAX_NUM_PROCESSES).')
PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                  'Multi-process runs: this one, 0-based (default $JAX_PROCESS_ID).')
CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', 0, 'Split the CPU into this many XLA devices (pmap over them), e.g. to '
    'try data parallelism on a laptop; docs/performance.md has what it does to speed. '
    '0 = leave XLA_FLAGS as it is.', lower_bound=0)
COMPILATION_CACHE = flags.DEFINE_bool(
    'compilation_cache', True, 'Keep compiled programs in $CONVNET_CACHE (default '
    '~/.cache/convnet/jax), so a rerun, a resume or a run of the same shapes skips compiling.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO.
  if CPU_DEVICES.value:  # Read by XLA when the CPU backend starts: before any jax call.
    parallel.force_cpu_devices(CPU_DEVICES.value)
  if COMPILATION_CACHE.value:
    parallel.use_compilation_cache(parallel.compilation_cache_dir())
  try:
    start_processes()
    train.train_and_evaluate(CONFIG.value, WORKDIR.value, ALLOW_CONFIG_CHANGE.value)
  except train.Interrupted as e:
    print(f'stopped: {e}', file=sys.stderr)
    sys.exit(train.EXIT_INTERRUPTED)
  except train.USER_ERRORS as e:
    sys.exit(f'error: {e}')


def start_processes() -> None:
  """jax.distributed for a multi-process run (flags, or a cluster's environment), then
  the backend: what the environment gets wrong is one line before anything is read."""
  cluster = parallel.cluster()
  if COORDINATOR.value:
    parallel.initialize_distributed(
        COORDINATOR.value,
        parallel.env_int('JAX_NUM_PROCESSES', 1) if NUM_PROCESSES.value is None
        else NUM_PROCESSES.value,
        parallel.env_int('JAX_PROCESS_ID', 0) if PROCESS_ID.value is None else PROCESS_ID.value)
  elif cluster:  # The cluster tells JAX the processes; no flags needed.
    print(f'{cluster}: jax.distributed.initialize()', flush=True)
    parallel.initialize_distributed()
  parallel.start_backend()


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
