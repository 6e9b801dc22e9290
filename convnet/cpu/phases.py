"""A one-channel conv and its max pool as one matmul over the pool window's phases.

Each output of a window x window max pool over a 'VALID' stride-1 conv reads a
(kh + window - 1) x (kw + window - 1) patch of the input. The kernel placed at each
of the window's window**2 offsets in that patch (zeros elsewhere) gives one block of
output channels per offset, or phase, and the pool is the elementwise max of those
blocks. A one-channel conv is bound by memory traffic, not arithmetic: this writes
fewer patches than the plain im2col, drops the separate pass over the whole conv
output, and makes the kernel gradient a wider matmul. A bias and a nondecreasing
activation commute with the max, so the caller adds them after the pool.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from convnet.cpu import conv
from convnet.cpu.pool import first_maximum
from convnet.shapes import Block, valid_windows


def _max_over_phases_forward(y):
  # Elementwise maxima of the slices, which XLA fuses; a reduce over this leading axis
  # went to a slower library kernel.
  m = functools.reduce(jnp.maximum, list(y))
  return m, (y, m)


@jax.custom_vjp
def max_over_phases(y):
  """Max over the leading axis of y, its gradient to the first maximum (the phases are
  in row-major order within the window, as pool.max_pool_tiles orders a window)."""
  return _max_over_phases_forward(y)[0]


def _max_over_phases_backward(residuals, dm):
  y, m = residuals
  phase = lax.broadcasted_iota(jnp.int32, y.shape, 0)
  return (jnp.where(phase == first_maximum(list(y), m), dm, 0.0),)


max_over_phases.defvjp(_max_over_phases_forward, _max_over_phases_backward)


def conv_max_pool(x, kernel, *, window: int, layout: str = 'NHWC',
                  out_size: Optional[tuple[int, int]] = None):
  """max_pool(conv(x, kernel, stride 1, 'VALID'), window x window tiles) as one strided
  matmul; with out_size=(rows, cols), only the pool's leading rows x cols outputs."""
  kh, kw, _, cout = kernel.shape
  phases = [jnp.pad(kernel, ((a, window - 1 - a), (b, window - 1 - b), (0, 0), (0, 0)))
            for a in range(window) for b in range(window)]
  out_size = out_size or tuple(valid_windows(n - k + 1, window, window)
                               for n, k in ((x.shape[1], kh), (x.shape[2], kw)))
  strided = Block(filters=window * window * cout, kernel_size=kh + window - 1, stride=window,
                  padding='VALID')
  y = conv.conv2d(x, jnp.concatenate(phases, axis=-1), strided, layout=layout,
                  out_size=out_size)
  if layout == 'NHWC':
    y = jnp.moveaxis(y.reshape(*y.shape[:3], window * window, cout), 3, 0)
  else:
    y = y.reshape(window * window, cout, *y.shape[1:])
  return max_over_phases(y)
