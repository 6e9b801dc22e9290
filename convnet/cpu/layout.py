"""CHWN: the conv blocks with the batch innermost.

With the batch as the fastest-moving axis, the im2col patches are plain slices
concatenated on the channel axis, and pooling and the elementwise ops vectorise over
the batch; on CPU that is faster for stacks of blocks. Rows and columns stay on axes
1 and 2, as in NHWC, so padding, pooling and cropping code serves both layouts.
"""

import jax.numpy as jnp

LAYOUTS = ('NHWC', 'CHWN')


def swap_batch_and_channels(x):
  """NHWC <-> CHWN (the permutation is its own inverse)."""
  return jnp.transpose(x, (3, 1, 2, 0))
