"""The seam between the model and its kernels: conv2d, pool2d and Dropout per backend.

  'xla'   the library's ops: lax.conv_general_dilated, each pool's own `apply` (Flax/lax
          pooling), nn.Dropout, all with JAX's derivatives. What GPUs and TPUs run well.
  'cpu'   the kernels in convnet/cpu, written for XLA's CPU backend: im2col with
          hand-written gradients, the blocks batch-innermost (layout='CHWN'), a
          one-channel conv and its max pool as one matmul, and only the conv outputs the
          rest of the net reads (shapes.conv_outputs_read).
  'auto'  'cpu' when JAX's default backend is the CPU, 'xla' on GPU and TPU.

Both backends hold the same parameters and compute the same function (up to float
rounding), so a checkpoint trained with one loads and predicts with the other.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
from jax import lax

from convnet import shapes
from convnet.cpu import conv as cpu_conv
from convnet.cpu import dropout as cpu_dropout
from convnet.cpu import layout as cpu_layout
from convnet.cpu import phases as cpu_phases
from convnet.cpu import pool as cpu_pool

BACKENDS = ('auto', 'cpu', 'xla')
LAYOUTS = cpu_layout.LAYOUTS
# Pools with a CPU kernel; any other registered pool runs its own `apply` on both backends.
CPU_POOLS = {'max': cpu_pool.max_pool, 'avg': cpu_pool.avg_pool}


def resolve(name: str) -> str:
  """'auto' -> 'cpu' on a CPU, 'xla' on GPU/TPU; 'cpu' and 'xla' as they are."""
  if name not in BACKENDS:
    raise ValueError(f'ops must be one of {BACKENDS}, got {name!r}')
  if name == 'auto':
    return 'cpu' if jax.default_backend() == 'cpu' else 'xla'
  return name


@dataclasses.dataclass(frozen=True)
class Ops:
  """A resolved backend ('xla' | 'cpu') and the layout its conv blocks run in."""
  backend: str = 'xla'
  layout: str = 'NHWC'  # 'CHWN' only with the CPU kernels.

  @property
  def channel_axis(self) -> int:
    return 0 if self.layout == 'CHWN' else -1

  def to_blocks(self, x):
    """NHWC images -> the layout the blocks run in."""
    return cpu_layout.swap_batch_and_channels(x) if self.layout == 'CHWN' else x

  def to_nhwc(self, x):
    """The blocks' layout -> NHWC."""
    return cpu_layout.swap_batch_and_channels(x) if self.layout == 'CHWN' else x

  def per_channel(self, v):
    """A [channels] vector shaped to broadcast over the blocks' layout (a bias)."""
    return v[:, None, None, None] if self.layout == 'CHWN' else v

  def conv2d(self, x, kernel, *, stride: int, padding: str,
             out_size: Optional[tuple[int, int]] = None):
    """Convolution with an HWIO kernel; out_size: only these leading outputs (CPU kernels)."""
    if self.backend == 'cpu':
      return cpu_conv.conv2d(x, kernel, stride=stride, padding=padding, layout=self.layout,
                             out_size=out_size)
    if out_size is not None:
      raise ValueError('out_size is a CPU-kernel plan; the library conv computes every output')
    return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def pool2d(self, x, *, kind: str, window: int, stride: int):
    """Pooling of rows and columns (axes 1 and 2) by the registered pool `kind`."""
    pool = shapes.POOLS[kind]
    if self.backend == 'cpu' and kind in CPU_POOLS:
      return CPU_POOLS[kind](x, window, stride, fallback=pool.apply)
    return pool.apply(x, window, stride)

  def conv_outputs(self, blocks, image_hw) -> list[Optional[tuple[int, int]]]:
    """Per block, the conv outputs to compute (None: all). The library ops compute all."""
    if self.backend == 'cpu':
      return shapes.conv_outputs_read(blocks, image_hw)
    return [None] * len(blocks)

  def pools_with_conv(self, block: Any, in_channels: int) -> bool:
    """Whether `block` runs its conv and max pool as one matmul (cpu/phases.py): CPU
    kernels in CHWN, a one-channel input, stride 1, tiling max-pool windows, and no
    norm layer and a nondecreasing activation between conv and pool."""
    return (self.backend == 'cpu' and self.layout == 'CHWN' and in_channels == 1
            and block.stride == 1 and block.pool == 'max'
            and block.pool_size == block.pool_stride and block.commutes_with_max_pool)

  def conv_max_pool(self, x, kernel, *, padding: str, window: int,
                    conv_outputs: Optional[tuple[int, int]] = None):
    """max_pool(conv2d(x, kernel, stride 1), window x window tiles) (see pools_with_conv)."""
    kh, kw = kernel.shape[:2]
    if padding == 'SAME':
      x = cpu_conv.pad_same(x, kh, kw, 1)
    pooled = None if conv_outputs is None else tuple(
        shapes.valid_windows(n, window, window) for n in conv_outputs)
    return cpu_phases.conv_max_pool(x, kernel, window=window, layout=self.layout,
                                    out_size=pooled)

  @property
  def Dropout(self):  # pylint: disable=invalid-name
    """nn.Dropout, or on the CPU kernels the same masks from a faster hash."""
    return cpu_dropout.Dropout if self.backend == 'cpu' else nn.Dropout


def make(name: str = 'auto', layout: str = 'NHWC') -> Ops:
  """The Ops for a config's model.ops and model.layout (the layout of the CPU kernels)."""
  backend = resolve(name)
  return Ops(backend=backend, layout=layout if backend == 'cpu' else 'NHWC')
