"""Pooling over tiling windows as a reshape, and the max's gradient to the first maximum.

When the windows tile the input (window == stride), pooling reduces a reshaped view.
The max pool's backward pass (`jax.custom_vjp`) sends each window's gradient to its
first maximum in row-major order, as TensorFlow and PyTorch do. On a blank background
every window ties (a ReLU of a positive bias); JAX's derivative of jnp.max divides the
gradient among the ties instead, a reduction that costs more than the pooling on CPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax


def first_maximum(candidates, maximum):
  """Elementwise, the index of the first of `candidates` equal to `maximum`."""
  index = jnp.full(maximum.shape, len(candidates), jnp.int32)
  for i in reversed(range(len(candidates))):
    index = jnp.where(candidates[i] == maximum, i, index)
  return index


def _tiles(x, window: int):
  n, h, w, c = x.shape
  return x.reshape(n, h // window, window, w // window, window, c)


def _max_pool_forward(x, window: int):
  y = jnp.max(_tiles(x, window), axis=(2, 4))
  return y, (x, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_tiles(x, window: int):
  """Max over non-overlapping window x window tiles of x (its sizes divisible by window)."""
  return _max_pool_forward(x, window)[0]


def _max_pool_backward(window: int, residuals, dy):
  x, y = residuals
  tiles = _tiles(x, window)
  first = first_maximum([tiles[:, :, a, :, b, :] for a in range(window)
                         for b in range(window)], y)
  shape = (1, 1, window, 1, window, 1)
  position = (lax.broadcasted_iota(jnp.int32, shape, 2) * window
              + lax.broadcasted_iota(jnp.int32, shape, 4))
  to_first = position == first[:, :, None, :, None, :]
  return (jnp.where(to_first, dy[:, :, None, :, None, :], 0.0).reshape(x.shape),)


max_pool_tiles.defvjp(_max_pool_forward, _max_pool_backward)


def _crop_to_tiles(x, window: int):
  return x[:, :x.shape[1] // window * window, :x.shape[2] // window * window]


def max_pool(x, window: int, stride: int, fallback):
  """Max pooling of axes 1 and 2 ('VALID'); `fallback` for overlapping windows."""
  if window != stride:
    return fallback(x, window, stride)
  return max_pool_tiles(_crop_to_tiles(x, window), window)


def avg_pool(x, window: int, stride: int, fallback):
  """Average pooling of axes 1 and 2 ('VALID'); `fallback` for overlapping windows."""
  if window != stride:
    return fallback(x, window, stride)
  return jnp.mean(_tiles(_crop_to_tiles(x, window), window), axis=(2, 4))
