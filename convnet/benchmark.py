"""Benchmarks, run as commands (never as timed tests).

    python -m convnet.benchmark --mode=seeds --config configs/default.py --num_seeds=2 \
        [--config.num_epochs=1] [--json=bench_seeds.json]

`seeds`: trains num_seeds seeds of one config as one compiled program (vmapped,
config.num_seeds) and then one after another (num_seeds runs with config.num_seeds=1),
and prints the wall, training and compile times of both and the speed-up.
"""

import os
import sys
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

from convnet import config_lib, train, workdir


def timed_run(config, run_dir: str) -> dict:
  start = time.time()
  results = train.train_and_evaluate(config, run_dir)
  return {'wall_s': time.time() - start, 'train_s': results['train_time_s'],
          'compile_s': results['compile_time_s'],
          'test_accuracy_per_seed': results.get('test_accuracy_per_seed',
                                                [results['test_accuracy']])}


def compare_seeds(config, num_seeds: int) -> dict:
  """Wall/train/compile times of num_seeds seeds vmapped in one program vs one by one."""
  with tempfile.TemporaryDirectory() as tmp:
    together = config.copy_and_resolve_references()
    together.num_seeds = num_seeds
    vmapped = timed_run(together, os.path.join(tmp, 'together'))
    runs = []
    for i in range(num_seeds):
      alone = config.copy_and_resolve_references()
      alone.num_seeds, alone.seed = 1, config.seed + i
      runs.append(timed_run(alone, os.path.join(tmp, f'seed{alone.seed}')))
  sequential = {key: sum(r[key] for r in runs) for key in ('wall_s', 'train_s', 'compile_s')}
  sequential['test_accuracy_per_seed'] = [r['test_accuracy_per_seed'][0] for r in runs]
  return {'num_seeds': num_seeds, 'vmapped': vmapped, 'sequential': sequential,
          'wall_speedup': sequential['wall_s'] / vmapped['wall_s'],
          'train_speedup': sequential['train_s'] / vmapped['train_s']}


def print_seeds(result: dict) -> None:
  print(f'{result["num_seeds"]} seeds          wall s   train s   compile s   test accuracy')
  for name in ('vmapped', 'sequential'):
    r = result[name]
    accuracy = ', '.join(f'{100 * a:.2f}' for a in r['test_accuracy_per_seed'])
    print(f'{name:<16} {r["wall_s"]:7.1f} {r["train_s"]:9.1f} {r["compile_s"]:11.1f}   {accuracy}')
  print(f'vmapped is {result["wall_speedup"]:.2f}x the speed of sequential in wall time, '
        f'{result["train_speedup"]:.2f}x in training time')


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  if MODE.value != 'seeds':
    sys.exit(f'error: unknown --mode={MODE.value}; known: seeds')
  try:
    result = compare_seeds(CONFIG.value, NUM_SEEDS.value)
  except train.USER_ERRORS as e:
    sys.exit(f'error: {e}')
  print_seeds(result)
  if JSON.value:
    workdir.write_json(JSON.value, result)


if __name__ == '__main__':
  CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py', 'Config file.',
                                           lock_config=True)
  MODE = flags.DEFINE_string('mode', 'seeds', 'What to measure: seeds.')
  NUM_SEEDS = flags.DEFINE_integer('num_seeds', 2, 'seeds mode: how many seeds.')
  JSON = flags.DEFINE_string('json', '', 'Also write the result to this JSON file.')
  app.run(main, flags_parser=config_lib.parse_flags)
