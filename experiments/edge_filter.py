"""The lesson's demonstration on real digits: hand-made edge filters, then 2x2 max pooling.

    python -m experiments.edge_filter [--out runs/figures/edge_filter.png]

A 3x3 vertical-line filter (-1 2 -1 in every row) and its transpose, the
horizontal-line filter, run through the project's own ConvBlock (SAME
padding, no bias, identity activation, 2x2 max pool) on MNIST test digits. Vertical
strokes light up the first, horizontal ones the second; pooling keeps each 2x2
window's largest response, taking 28x28 to 14x14.
"""

import os
import sys

import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from convnet import input_pipeline, models, shapes, visualize

VERTICAL = np.array([[-1, 2, -1]] * 3, np.float32)
HORIZONTAL = VERTICAL.T


def edge_responses(images: np.ndarray):
  """(conv [n, 28, 28, 2], pooled [n, 14, 14, 2]) of the two filters on uint8 digits."""
  block = models.ConvBlock(shapes.Block(filters=2, kernel_size=3, padding='SAME', pool='max',
                                        pool_size=2, pool_stride=2), activation='identity')
  kernel = np.stack([VERTICAL, HORIZONTAL], axis=-1)[:, :, None, :]  # [3, 3, 1, 2]
  variables = {'params': {'kernel': jnp.asarray(kernel), 'bias': jnp.zeros(2)}}
  pooled, state = block.apply(variables, jnp.asarray(images, jnp.float32) / 255.0,
                              mutable=['intermediates'])
  return np.asarray(state['intermediates']['conv'][0]), np.asarray(pooled)


def edge_filter_figure(path: str, images: np.ndarray) -> str:
  conv, pooled = edge_responses(images)
  maps = [('vertical', conv[..., :1]), ('pooled', pooled[..., :1]),
          ('horizontal', conv[..., 1:]), ('pooled', pooled[..., 1:])]
  return visualize.plot_feature_maps(path, images, maps, channels=1)


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # JAX logs each backend it looks for at INFO.
  data = input_pipeline.load_dataset('idx', input_pipeline.SHIPPED_MNIST, 'mnist', 10)
  digits = data.test.images[[int(np.flatnonzero(data.test.labels == d)[0]) for d in (1, 4, 7, 0)]]
  os.makedirs(os.path.dirname(os.path.abspath(flags.FLAGS.out)), exist_ok=True)
  print('wrote ' + edge_filter_figure(flags.FLAGS.out, digits))


if __name__ == '__main__':
  flags.DEFINE_string('out', 'runs/figures/edge_filter.png', 'Where to write the PNG.')
  app.run(main)
