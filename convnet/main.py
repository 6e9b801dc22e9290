"""Command-line entry point: parse flags, then call train.train_and_evaluate.

    python -m convnet.main --config configs/default.py --workdir runs/default \
        [--config.model.filters=64 --config.model.kernel_size=5 ...]
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from convnet import config_lib, input_pipeline, train

CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/default.py '
                                         '(or configs/default.py:smoke).', lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for config.json, metrics.jsonl, '
                              'results.json.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with a one-line message instead of a traceback for a bad override."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError) as e:  # ml_collections' answer to an unknown key.
    key = str(e).strip('"\'')
    sys.exit(f'error: unknown config key {key!r}; see configs/default.py for every key')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  try:
    train.train_and_evaluate(CONFIG.value, WORKDIR.value)
  except (config_lib.ConfigError, input_pipeline.DataError, FileExistsError,
          PermissionError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
