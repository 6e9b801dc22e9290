"""Conv and pooling blocks, and the ConvNet that stacks them.

The modules take plain arguments (no ConfigDict) so they can be reused anywhere.
Convolution and pooling are written out as the lesson explains them (a window
that multiplies-and-adds; the max of each window) in a form XLA runs fast on CPU:
im2col (stack the kh*kw shifted slices, one matmul) and reshape-max pooling, each
with a hand-written backward pass (`jax.custom_vjp`): the im2col backward reuses
the forward's patches and adds the input gradient back tap by tap, and the max
pool sends each gradient to its window's first maximum, as TF and PyTorch do. Inside a
scanned training loop these are several times faster on CPU than
`lax.conv_general_dilated`, `reduce_window` and JAX's own derivatives of them
(measured in README "Performance"); `conv_impl='xla'` keeps the library
convolution available for comparison and for accelerators. The blocks run in NHWC
or, with layout='CHWN', batch-innermost, which makes the patches plain slices and is
faster on CPU for stacks of blocks; both hold the same parameters. In CHWN a block on
a one-channel input computes its conv and max pool as one matmul over the pool
window's phases (`conv_max_pool_by_phase`). Dropout is nn.Dropout's, with its random
bits computed in a form XLA fuses on CPU.
"""

import functools
import math
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

PADDINGS = ('SAME', 'VALID')
POOLS = ('max', 'avg', 'none')
NORMS = ('none', 'batch', 'layer')
CONV_IMPLS = ('im2col', 'xla')
LAYOUTS = ('NHWC', 'CHWN')
ACTIVATIONS = ('relu', 'gelu', 'elu', 'silu', 'tanh', 'sigmoid', 'leaky_relu', 'identity')
# Nondecreasing: pooling their outputs is taking them of the pooled inputs. (Where one
# is flat, the pool may pick another of the tied inputs, but the gradient there is ~0.)
MONOTONE_ACTIVATIONS = ('relu', 'elu', 'leaky_relu', 'identity')


def conv_output_size(size: int, kernel: int, stride: int, padding: str) -> int:
  """Spatial size after a convolution (TensorFlow/Flax 'SAME'/'VALID' rules)."""
  if padding == 'SAME':
    return -(-size // stride)
  return (size - kernel) // stride + 1


def pool_output_size(size: int, window: int, stride: int) -> int:
  """Spatial size after 'VALID' pooling (the Keras default): partial windows are dropped."""
  return (size - window) // stride + 1


def windows_extent(count: int, window: int, stride: int) -> int:
  """How many leading rows (or columns) `count` windows of `window` at `stride` cover:
  what that many conv or pool outputs read of their input."""
  return (count - 1) * stride + window


def pool_reads(size: int, pool: str, window: int, stride: int,
               outputs: Optional[int] = None) -> int:
  """How many leading rows (or columns) of `size` a 'VALID' pool reads to compute its
  first `outputs` (all, if None); the rest, such as a partial window at the edge, it
  drops."""
  if pool == 'none':
    return size if outputs is None else outputs
  if outputs is None:
    outputs = pool_output_size(size, window, stride)
  return windows_extent(outputs, window, stride)


def block_output_size(size: int, kernel: int, stride: int, padding: str, pool: str,
                      pool_size: int, pool_stride: int) -> int:
  """Spatial size after a conv and its pool."""
  size = conv_output_size(size, kernel, stride, padding)
  return size if pool == 'none' else pool_output_size(size, pool_size, pool_stride)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  total = max(windows_extent(conv_output_size(size, kernel, stride, 'SAME'), kernel, stride)
              - size, 0)
  return total // 2, total - total // 2


def pad_same(x, kh: int, kw: int, stride: int):
  """x padded as a 'SAME' convolution pads it (rows and columns are axes 1 and 2 in
  both layouts)."""
  h, w = x.shape[1], x.shape[2]
  return jnp.pad(x, ((0, 0), _same_padding(h, kh, stride), _same_padding(w, kw, stride), (0, 0)))


def swap_batch_and_channels(x):
  """NHWC <-> CHWN (the permutation is its own inverse)."""
  return jnp.transpose(x, (3, 1, 2, 0))


def _patches(x, kh: int, kw: int, stride: int, out_h: int, out_w: int, layout: str):
  """The im2col matrix, channel-major: [kh*kw*cin, pixels].

  Row (tap_row, tap_col, in_channel), like a flattened HWIO kernel; one column per
  output pixel, (image, row, col) for NHWC input and (row, col, image) for CHWN.
  Channel-major because both matmuls that read it (the forward pass and the
  kernel gradient) then need no transposed copy of it. Built as kh rows of kw taps,
  not as one concatenation of kh*kw taps: XLA's CPU backend fuses a concatenation
  of at most 8 operands, so a 3x3 kernel's 9 taps were each written out and then
  copied again. Each row gets its leading axis by a reshape, not jnp.stack: under
  vmap (num_seeds > 1) stack put the seed axis inside the tap axes, which cost a
  transposing copy of the patches.
  """
  if layout == 'NHWC':
    x = jnp.transpose(x, (3, 0, 1, 2))  # C N H W
  rows, cols = (2, 3) if layout == 'NHWC' else (1, 2)

  def tap(i: int, j: int):
    start, limit, strides = [0] * 4, list(x.shape), [1] * 4
    start[rows], limit[rows], strides[rows] = i, i + (out_h - 1) * stride + 1, stride
    start[cols], limit[cols], strides[cols] = j, j + (out_w - 1) * stride + 1, stride
    return lax.slice(x, start, limit, strides)
  def row(i: int):  # [1, kw*cin, ...]
    taps = jnp.concatenate([tap(i, j) for j in range(kw)], axis=0)
    return taps.reshape((1,) + taps.shape)
  patches = jnp.concatenate([row(i) for i in range(kh)], axis=0)
  return patches.reshape(kh * kw * x.shape[0], -1)


def _conv_valid_forward(x, kernel, stride: int, layout: str):
  kh, kw, _, cout = kernel.shape
  h, w, n = x.shape[1], x.shape[2], x.shape[0 if layout == 'NHWC' else 3]
  out_h = conv_output_size(h, kh, stride, 'VALID')
  out_w = conv_output_size(w, kw, stride, 'VALID')
  patches = _patches(x, kh, kw, stride, out_h, out_w, layout)
  if layout == 'NHWC':
    y = lax.dot_general(patches, kernel.reshape(-1, cout), (((0,), (0,)), ((), ())))
    y = y.reshape(n, out_h, out_w, cout)
  else:
    y = (kernel.reshape(-1, cout).T @ patches).reshape(cout, out_h, out_w, n)
  return y, (patches, kernel, x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_valid_im2col(x, kernel, stride: int, layout: str = 'NHWC'):
  """'VALID' convolution as one matmul of the im2col patches with the kernel."""
  return _conv_valid_forward(x, kernel, stride, layout)[0]


def _conv_valid_backward(stride: int, layout: str, residuals, dy):
  """Kernel gradient from the saved patches; input gradient added back tap by tap.

  Each tap's slice of the patches' gradient (kernel times dy) is padded (with
  stride - 1 zeros between rows and columns when strided) to the input's size and
  summed: one fused loop, where JAX's own transpose of the slicing writes a scatter
  per tap. Both layouts keep rows and columns on axes 1 and 2, so the pads agree.
  """
  patches, kernel, x_shape = residuals
  kh, kw, cin, cout = kernel.shape
  kernel = kernel.reshape(-1, cout)
  out_h, out_w = dy.shape[1], dy.shape[2]
  if layout == 'NHWC':
    dkernel = patches @ dy.reshape(-1, cout)
    dpatches = dy @ kernel.T
    tap = lambda t: dpatches[..., t * cin:(t + 1) * cin]
  else:
    dy = dy.reshape(cout, -1)
    dkernel = lax.dot_general(patches, dy, (((1,), (1,)), ((), ())))
    dpatches = (kernel @ dy).reshape(kh * kw, cin, out_h, out_w, -1)
    tap = lambda t: dpatches[t]
  h, w = x_shape[1], x_shape[2]
  span_h, span_w = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1
  dx = 0.0
  for t in range(kh * kw):
    i, j = divmod(t, kw)
    dx = dx + lax.pad(tap(t), jnp.zeros((), patches.dtype),
                      ((0, 0, 0), (i, h - i - span_h, stride - 1),
                       (j, w - j - span_w, stride - 1), (0, 0, 0)))
  return dx, dkernel.reshape(kh, kw, cin, cout)


conv_valid_im2col.defvjp(_conv_valid_forward, _conv_valid_backward)


def conv2d(x, kernel, stride: int = 1, padding: str = 'SAME', impl: str = 'im2col',
           layout: str = 'NHWC', out_size: Optional[tuple[int, int]] = None):
  """2-D convolution of `x` with an HWIO `kernel` (cross-correlation, as in Keras).

  x and the result are NHWC, or CHWN (batch innermost) when layout='CHWN'. With
  out_size=(rows, cols), only the output's first rows x cols are computed.
  """
  kh, kw = kernel.shape[:2]
  if impl == 'xla':
    y = lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=(layout, 'HWIO', layout))
    return y if out_size is None else y[:, :out_size[0], :out_size[1], :]
  if padding == 'SAME':
    x = pad_same(x, kh, kw, stride)
  if out_size is not None:  # The input rows and columns those outputs read.
    x = x[:, :windows_extent(out_size[0], kh, stride), :windows_extent(out_size[1], kw, stride), :]
  return conv_valid_im2col(x, kernel, stride, layout)


def _max_pool_forward(x, window: int):
  n, h, w, c = x.shape
  y = jnp.max(x.reshape(n, h // window, window, w // window, window, c), axis=(2, 4))
  return y, (x, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_tiles(x, window: int):
  """Max over non-overlapping window x window tiles of x (its sizes divisible by window)."""
  return _max_pool_forward(x, window)[0]


def _first_maximum(candidates, maximum):
  """Elementwise, the index of the first of `candidates` equal to `maximum`."""
  index = jnp.full(maximum.shape, len(candidates), jnp.int32)
  for i in reversed(range(len(candidates))):
    index = jnp.where(candidates[i] == maximum, i, index)
  return index


def _max_pool_backward(window: int, residuals, dy):
  """Each tile's gradient goes to its first maximum in row-major order, as TF's and
  PyTorch's max pooling send it.

  On a blank background every tile ties (a ReLU of a positive bias): a gradient to
  every tied maximum would count the bias window**2 times there. JAX's derivative of
  jnp.max divides by the number of ties instead, a reduction that costs more than the
  pooling itself on CPU.
  """
  x, y = residuals
  n, h, w, c = x.shape
  tiles = x.reshape(n, h // window, window, w // window, window, c)
  first = _first_maximum([tiles[:, :, a, :, b, :] for a in range(window)
                          for b in range(window)], y)
  shape = (1, 1, window, 1, window, 1)
  position = (lax.broadcasted_iota(jnp.int32, shape, 2) * window
              + lax.broadcasted_iota(jnp.int32, shape, 4))
  to_first = position == first[:, :, None, :, None, :]
  return (jnp.where(to_first, dy[:, :, None, :, None, :], 0.0).reshape(x.shape),)


max_pool_tiles.defvjp(_max_pool_forward, _max_pool_backward)


def _max_over_phases_forward(y):
  # Elementwise maxima of the slices, which XLA fuses: a reduce over this leading axis
  # went to a library kernel ~5x slower than the conv's matmul.
  m = functools.reduce(jnp.maximum, list(y))
  return m, (y, m)


@jax.custom_vjp
def max_over_phases(y):
  """Max over the leading axis of y, its gradient to the first maximum (as
  max_pool_tiles: the phases are in row-major order within the window)."""
  return _max_over_phases_forward(y)[0]


def _max_over_phases_backward(residuals, dm):
  y, m = residuals
  phase = lax.broadcasted_iota(jnp.int32, y.shape, 0)
  return (jnp.where(phase == _first_maximum(list(y), m), dm, 0.0),)


max_over_phases.defvjp(_max_over_phases_forward, _max_over_phases_backward)


def conv_max_pool_by_phase(x, kernel, window: int, layout: str = 'NHWC',
                           out_size: Optional[tuple[int, int]] = None):
  """max_pool(conv2d(x, kernel, 1, 'VALID'), window x window tiles), as one strided matmul;
  with out_size=(rows, cols), only the pool's first rows x cols outputs.

  Each pool output reads a (kh + window - 1) x (kw + window - 1) patch of x; the
  kernel placed at each of the window's window**2 offsets in that patch (zeros
  elsewhere) gives one block of output channels per offset, or phase, and the pool is
  the elementwise max of those blocks. For a one-channel input the conv is bound by
  memory traffic, not arithmetic: for a 3x3 kernel and 2x2 pool this writes 4/9 of the
  patches the plain im2col writes, drops the separate pooling pass over the whole
  conv output and shapes the kernel gradient as a wider matmul, for 16/9 of the
  multiply-adds (README "Performance"). Add a bias and a MONOTONE_ACTIVATIONS
  activation after the pool: that is pooling the activated conv.
  """
  kh, kw, _, cout = kernel.shape
  phases = [jnp.pad(kernel, ((a, window - 1 - a), (b, window - 1 - b), (0, 0), (0, 0)))
            for a in range(window) for b in range(window)]
  out_size = out_size or tuple(pool_output_size(n - k + 1, window, window)
                               for n, k in ((x.shape[1], kh), (x.shape[2], kw)))
  y = conv2d(x, jnp.concatenate(phases, axis=-1), window, 'VALID', 'im2col', layout, out_size)
  if layout == 'NHWC':
    y = jnp.moveaxis(y.reshape(*y.shape[:3], window * window, cout), 3, 0)
  else:
    y = y.reshape(window * window, cout, *y.shape[1:])
  return max_over_phases(y)


def pool2d(x, kind: str, window: int, stride: int):
  """Max or average pooling over `window` x `window` windows ('VALID') of axes 1 and 2.

  Those are the rows and columns in NHWC and in CHWN alike.
  """
  if kind == 'none':
    return x
  n, h, w, c = x.shape
  if window == stride:
    # Non-overlapping windows: crop the partial edge, then reduce a reshaped view.
    out_h, out_w = h // window, w // window
    x = x[:, :out_h * window, :out_w * window, :]
    if kind == 'max':
      return max_pool_tiles(x, window)
    return jnp.mean(x.reshape(n, out_h, window, out_w, window, c), axis=(2, 4))
  if kind == 'max':
    return nn.max_pool(x, (window, window), (stride, stride), 'VALID')
  return nn.avg_pool(x, (window, window), (stride, stride), 'VALID')


def activation_fn(name: str) -> Callable:
  return (lambda x: x) if name == 'identity' else getattr(jax.nn, name)


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry_bits(key, shape: Sequence[int]):
  """jax.random.bits(key, shape) for a threefry key (JAX's default), with the hash's
  20 rounds written out.

  JAX lowers threefry on CPU as a 5-trip loop over whole arrays (it compiles
  faster); written out, XLA fuses the rounds into one pass. That pass runs as a
  2-trip loop over halves of the counters so that XLA writes the bits out once:
  otherwise it fuses the whole hash into every consumer, among them the pool's
  gradient, which reads each bit four times. On the Keras example, writing the hash
  out saved ~7% of a training step and writing its bits out once another 4-9% (README
  "Performance"). Other key types go to jax.random.bits.
  """
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


class Dropout(nn.Module):
  """nn.Dropout (the same masks, bit for bit) with its random bits from threefry_bits."""
  rate: float

  @nn.compact
  def __call__(self, x, train: bool):
    if not train or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep_prob = 1.0 - self.rate
    # jax.random.bernoulli keeps an element when its uniform, (bits >> 9) * 2**-23,
    # is below float32(keep_prob): the same as this integer comparison.
    threshold = math.ceil(float(np.float32(keep_prob)) * 2**23)
    keep = (threefry_bits(self.make_rng('dropout'), x.shape) >> 9) < threshold
    return lax.select(keep, x / keep_prob, jnp.zeros_like(x))


class ConvBlock(nn.Module):
  """conv -> [norm] -> activation -> [pool]: one block of the lesson's model.

  Takes and returns NHWC, or CHWN (batch innermost) when layout='CHWN'; the
  parameters are the same either way.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: str = 'SAME'
  norm: str = 'none'
  activation: str = 'relu'
  pool: str = 'max'
  pool_size: int = 2
  pool_stride: int = 2
  conv_impl: str = 'im2col'
  axis_name: Optional[str] = None  # BatchNorm statistics are averaged over this pmap axis.
  layout: str = 'NHWC'
  # The leading rows x cols of the output that the next block reads (None: all). Only
  # those are computed, where that is exact (see _conv_outputs_read).
  out_size: Optional[tuple[int, int]] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    k = self.kernel_size
    channels = -1 if self.layout == 'NHWC' else 0
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (k, k, x.shape[channels], self.features), jnp.float32)
    if self.out_size is not None:
      full = [block_output_size(n, k, self.stride, self.padding, self.pool, self.pool_size,
                                self.pool_stride) for n in (x.shape[1], x.shape[2])]
      if not all(1 <= o <= f for o, f in zip(self.out_size, full)):
        raise ValueError(f'ConvBlock out_size={tuple(self.out_size)} is not within its '
                         f'{full[0]}x{full[1]} output')
    by_phase = self._pools_by_phase(x.shape[channels])
    if by_phase:
      x = pad_same(x, k, k, 1) if self.padding == 'SAME' else x
      y = conv_max_pool_by_phase(x, kernel, self.pool_size, self.layout, self.out_size)
    else:
      y = conv2d(x, kernel, self.stride, self.padding, self.conv_impl, self.layout,
                 self._conv_outputs_read(x.shape[1], x.shape[2]))
    if self.norm == 'batch':
      y = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis=channels,
                       axis_name=self.axis_name if train else None)(y)
    elif self.norm == 'layer':
      y = nn.LayerNorm(reduction_axes=channels, feature_axes=channels)(y)
    else:  # A bias is redundant before a normalisation layer, so only here.
      bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + (bias if self.layout == 'NHWC' else bias[:, None, None, None])
    y = activation_fn(self.activation)(y)
    if by_phase:  # Pooled already, and no feature maps to keep (see _pools_by_phase).
      return y
    self._keep_nhwc('conv', y)
    y = pool2d(y, self.pool, self.pool_size, self.pool_stride)
    self._keep_nhwc('pool', y)
    return y

  def _pools_by_phase(self, in_channels: int) -> bool:
    """Whether to run conv + max pool as conv_max_pool_by_phase: measured faster for a
    one-channel input in CHWN (keras_convnet's first block, kernel 3 or 5), slower in
    NHWC (the lesson's model). It needs tiling windows, a stride of 1, no norm layer, an
    activation that commutes with the max, and no feature maps kept to be shown."""
    return (self.layout == 'CHWN' and in_channels == 1 and self.conv_impl == 'im2col'
            and self.stride == 1 and self.pool == 'max' and self.pool_size == self.pool_stride
            and self.norm == 'none' and self.activation in MONOTONE_ACTIVATIONS
            and not self.is_mutable_collection('intermediates'))

  def _conv_outputs_read(self, h: int, w: int) -> Optional[tuple[int, int]]:
    """The conv outputs the pool reads to give the outputs the next block reads, when
    fewer than all: a pool whose windows do not tile the conv output drops its last
    rows and columns (keras_convnet's 11x11 -> 10x10: 17% of its second conv), and a
    'VALID' next block may not read the last ones (its 3x3 kernel reads 12 of the first
    block's 13). Only without a norm layer (BatchNorm's statistics cover every output)
    and when the feature maps are not kept to be shown."""
    if self.norm != 'none' or self.is_mutable_collection('intermediates'):
      return None
    size = lambda n: conv_output_size(n, self.kernel_size, self.stride, self.padding)
    wanted = self.out_size or (None, None)
    used = tuple(pool_reads(size(n), self.pool, self.pool_size, self.pool_stride, want)
                 for n, want in zip((h, w), wanted))
    return used if used != (size(h), size(w)) else None

  def _keep_nhwc(self, name: str, y):
    """Sows y, as NHWC, for the visualisations; only when 'intermediates' is mutable, so
    a plain apply does no transposes."""
    if self.is_mutable_collection('intermediates'):
      self.sow('intermediates', name, y if self.layout == 'NHWC' else swap_batch_and_channels(y))


class ConvNet(nn.Module):
  """A stack of ConvBlocks, flatten, optional dense hidden layers with dropout, logits.

  Every per-block argument is a sequence with one entry per block. Flatten sizes
  are whatever the blocks produce: nothing here depends on the input size. Images
  come in NHWC; layout='CHWN' runs the blocks batch-innermost (one transpose in,
  one out), which is faster on CPU for stacks of blocks with many channels
  (README "Performance"); the parameters and results are the same.
  """
  filters: Sequence[int]
  kernel_sizes: Sequence[int]
  strides: Sequence[int]
  paddings: Sequence[str]
  norms: Sequence[str]
  pools: Sequence[str]
  pool_sizes: Sequence[int]
  pool_strides: Sequence[int]
  activation: str = 'relu'
  hidden: Sequence[int] = (128,)
  dropout: float = 0.0
  num_classes: int = 10
  conv_impl: str = 'im2col'
  axis_name: Optional[str] = None
  layout: str = 'NHWC'

  @nn.compact
  def __call__(self, x, train: bool = False):
    out_sizes = self._outputs_read(x.shape[1:3])
    if self.layout == 'CHWN':
      x = swap_batch_and_channels(x)
    for i, features in enumerate(self.filters):
      x = ConvBlock(features, self.kernel_sizes[i], self.strides[i], self.paddings[i],
                    self.norms[i], self.activation, self.pools[i], self.pool_sizes[i],
                    self.pool_strides[i], self.conv_impl, self.axis_name, self.layout,
                    out_sizes[i])(x, train)
    if self.layout == 'CHWN':
      x = swap_batch_and_channels(x)
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = Dropout(self.dropout)(x, train)
      x = activation_fn(self.activation)(nn.Dense(width)(x))
    x = Dropout(self.dropout)(x, train)
    return nn.Dense(self.num_classes)(x)

  def _outputs_read(self, image_hw: Sequence[int]) -> list[Optional[tuple[int, int]]]:
    """For each block, the leading rows x cols of its output that the next block reads,
    or None for all, which is also what the block computes: a 'VALID' conv reads
    windows_extent(outputs, kernel, stride) rows of its input, and may compute fewer
    outputs than its input allows (ConvBlock's _conv_outputs_read). The last block's
    output is flattened whole; a 'SAME' conv's padding depends on its whole input, a
    norm layer's statistics on every output."""
    if self.is_mutable_collection('intermediates'):  # Feature maps shown whole.
      return [None] * len(self.filters)
    sizes = [tuple(image_hw)] + [s[:2] for s in feature_shapes(self, (*image_hw, 1))]
    out_sizes, read = [], None  # read: the outputs of block i that block i + 1 reads.
    for i in reversed(range(len(self.filters))):
      # A norm layer's statistics see every output: that block computes them all.
      cut = self.norms[i] == 'none'
      out_sizes.insert(0, read if cut else None)
      k, stride = self.kernel_sizes[i], self.strides[i]
      if not cut or self.paddings[i] != 'VALID':
        read = None
        continue
      conv = [conv_output_size(n, k, stride, 'VALID') for n in sizes[i]]
      pooled = read or (None, None)
      read = tuple(windows_extent(pool_reads(n, self.pools[i], self.pool_sizes[i],
                                             self.pool_strides[i], want), k, stride)
                   for n, want in zip(conv, pooled))
      if read == sizes[i]:
        read = None
    return out_sizes


def feature_shapes(model: ConvNet, image_shape: Sequence[int]) -> list[tuple[int, int, int]]:
  """(height, width, channels) after each block, derived from the arguments alone."""
  h, w, _ = image_shape
  shapes = []
  for i, c in enumerate(model.filters):
    h, w = (block_output_size(n, model.kernel_sizes[i], model.strides[i], model.paddings[i],
                              model.pools[i], model.pool_sizes[i], model.pool_strides[i])
            for n in (h, w))
    shapes.append((h, w, c))
  return shapes


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
