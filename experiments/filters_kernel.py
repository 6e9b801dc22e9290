"""Filter count x kernel size on the lesson's model: 5 x 4 points, 2 seeds each.

    python -m convnet.sweep --config experiments/filters_kernel.py --workdir runs/fk

The lesson's model (configs/default.py: one conv block, 2x2 max pool, dense 128)
for 2 epochs per point; the results table and heatmap are in docs/filters_kernel.md.
"""

from configs import default
from convnet import sweep


def get_config():
  config = default.get_config()
  config.num_epochs = 2  # Enough to rank the points; the default trains 15.
  config.num_seeds = 2  # Seeds 0 and 1, trained together in one program.
  return config


def get_sweep():
  return sweep.product(sweep.values('model.filters', [8, 16, 32, 64, 128]),
                       sweep.values('model.kernel_size', [1, 3, 5, 7]))
