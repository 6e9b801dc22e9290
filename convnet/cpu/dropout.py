"""nn.Dropout's masks, bit for bit, with the threefry hash written out for XLA's CPU backend.

JAX lowers threefry on CPU as a 5-trip loop over whole arrays (it compiles faster);
written out round by round, XLA fuses the 20 rounds into one pass. That pass runs as
a 2-trip loop over halves of the counters so that XLA writes the bits out once:
otherwise it fuses the whole hash into every consumer, among them the max pool's
gradient, which reads each bit several times.
"""

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry_bits(key, shape: Sequence[int]):
  """jax.random.bits(key, shape) for a threefry key (JAX's default); other key types go
  to jax.random.bits."""
  size = math.prod(shape)
  if str(jax.random.key_impl(key)) != 'threefry2x32' or size >= 2**32:
    return jax.random.bits(key, shape, jnp.uint32)
  k = jax.random.key_data(key)
  ks = (k[0], k[1], k[0] ^ k[1] ^ jnp.uint32(0x1BD11BDA))

  def threefry(counters):
    # A 64-bit counter per element, as two uint32 words: (0, flat index).
    hi = jnp.zeros_like(counters) + ks[0]
    lo = counters + ks[1]
    for i in range(5):
      for r in _THREEFRY_ROTATIONS[i % 2]:
        hi = hi + lo
        lo = ((lo << r) | (lo >> (32 - r))) ^ hi
      hi = hi + ks[(i + 1) % 3]
      lo = lo + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return hi ^ lo

  half = -(-size // 2)
  bits = lax.map(threefry, lax.iota(jnp.uint32, 2 * half).reshape(2, half))
  return bits.reshape(-1)[:size].reshape(shape)


def random_bits(key, shape: Sequence[int]):
  """jax.random.bits as uint32: the bits nn.Dropout's masks come from."""
  return jax.random.bits(key, shape, jnp.uint32)


class Dropout(nn.Module):
  """nn.Dropout (same fields, same masks bit for bit) with its bits from `bits`
  (threefry_bits on the CPU kernels). `rate` may be traced: the members of a vmapped
  sweep group each drop their own rate, and a rate of 0 then keeps every element."""
  rate: Any
  deterministic: bool = False
  bits: Callable = threefry_bits

  @nn.compact
  def __call__(self, x):
    static = isinstance(self.rate, (int, float))
    if self.deterministic or (static and self.rate == 0.0):
      return x
    if static and self.rate == 1.0:
      return jnp.zeros_like(x)
    keep_prob = 1.0 - self.rate
    # jax.random.bernoulli keeps an element when its uniform, (bits >> 9) * 2**-23, is
    # below float32(keep_prob): the same as this integer comparison (exact: a power of 2).
    threshold = jnp.ceil(jnp.float32(keep_prob) * 2**23).astype(jnp.uint32)
    keep = (self.bits(self.make_rng('dropout'), x.shape) >> 9) < threshold
    return lax.select(keep, (x / keep_prob).astype(x.dtype), jnp.zeros_like(x))
