"""Pooling ablation at equal depth: max vs average vs none vs a stride-2 conv.

    python -m convnet.sweep --config experiments/pooling.py --workdir runs/pooling

Two conv blocks (32, 64 filters, 3x3). Max and average pooling take 28 -> 14 -> 7;
'strided' downsamples as much with a stride-2 convolution and no pooling;
'none' keeps 28x28 (and so has a far larger dense layer). Expected: max pooling
ahead, strided convs ~0.3 points behind (measured figures and times: docs/ablations.md).
"""

from configs import default
from convnet import sweep


def get_config():
  config = default.get_config()
  config.num_epochs = 3
  config.num_seeds = 2
  config.model.num_blocks = 2
  config.model.filters = (32, 64)
  return config


def get_sweep():
  # Each point sets pool and stride together, named by the pooling it tests.
  return sweep.zipped(sweep.values('model.pool', ['max', 'avg', 'none', 'none']),
                      sweep.values('model.stride', [1, 1, 1, 2]))
