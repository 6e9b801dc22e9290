"""Depth: 1, 2 and 3 conv blocks (32, 64, 128 filters, 3x3, each with a 2x2 max pool).

    python -m convnet.sweep --config experiments/depth.py --workdir runs/depth

Feature maps go 28 -> 14 -> 7 -> 3; the dense layer shrinks as blocks are added.
Expected: each block adds accuracy, from ~98.2% for one to ~99.2% for three
(measured figures and times: docs/ablations.md).
"""

from configs import default
from convnet import sweep


def get_config():
  config = default.get_config()
  config.num_epochs = 3
  config.num_seeds = 2
  return config


def get_sweep():
  return sweep.zipped(sweep.values('model.num_blocks', [1, 2, 3]),
                      sweep.values('model.filters', [(32,), (32, 64), (32, 64, 128)]))
