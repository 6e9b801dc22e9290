"""Learning rate x dropout for the lesson model: points that change no shape.

    python -m convnet.sweep --config experiments/learning_rate.py --workdir runs/lr

The six points differ only in keys that change no shape (train.VMAPPED_KEYS), so they
train vmapped, several points to a program (`--vmap_points`; by default the points are
shared out over the programs that run at once: all six in one on a single GPU, two
programs of three on a CPU), each writing its own workdir as it would alone. Expected:
3e-4 the least accurate in 3 epochs (measured figures and times: docs/ablations.md).
"""

from configs import default
from convnet import sweep


def get_config():
  config = default.get_config()
  config.num_epochs = 3
  return config


def get_sweep():
  return sweep.product(sweep.values('learning_rate', [3e-4, 1e-3, 3e-3]),
                       sweep.values('model.dropout', [0.0, 0.25]))
