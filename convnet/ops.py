"""The seam between the model and its kernels: conv2d, pool2d and Dropout per backend.

  'xla'   the library's ops: lax.conv_general_dilated (its backward pass written out as
          the two convolutions JAX's own rule emits: see `library_conv`), each pool's own
          `apply` (Flax/lax pooling), nn.Dropout. What GPUs and TPUs run well.
  'cpu'   the kernels in convnet/cpu, written for XLA's CPU backend: im2col with
          hand-written gradients (Winograd's F(2, 3) for 3-wide kernels over many
          channels in CHWN), the blocks batch-innermost (layout='CHWN'), a
          one-channel conv and its max pool as one matmul, in NHWC the max pool before the
          bias and activation, and only the conv outputs the rest of the net reads
          (shapes.conv_outputs_read).
  'auto'  'cpu' when JAX's default backend is the CPU, 'xla' on GPU and TPU.

Both backends hold the same parameters and compute the same function (up to float
rounding), so a checkpoint trained with one loads and predicts with the other.

The compute dtype is a policy of the backend, as in Flax's ImageNet example: the
library ops compute in bfloat16 on GPUs and TPUs ('auto'), with parameters, optimizer
state, BatchNorm statistics, the loss and the softmax in float32 (so checkpoints are the
same either way); the CPU kernels compute in float32.
"""

import dataclasses
import functools
import sys
from typing import Optional

import jax
from jax import lax

from convnet import shapes
from convnet.cpu import conv as cpu_conv
from convnet.cpu import dropout as cpu_dropout
from convnet.cpu import layout as cpu_layout
from convnet.cpu import phases as cpu_phases
from convnet.cpu import pool as cpu_pool

BACKENDS = ('auto', 'cpu', 'xla')
DTYPES = ('auto', 'float32', 'bfloat16')
LAYOUTS = cpu_layout.LAYOUTS
# Pools with a CPU kernel; any other registered pool runs its own `apply` on both backends.
CPU_POOLS = {'max': cpu_pool.max_pool, 'avg': cpu_pool.avg_pool}

# The shapes.Block fields the CPU kernels were written for. Each kernel lists the values
# it handles (None: any); a block setting a field it does not list away from its default,
# or a listed one to another value, runs that op on the library ops instead
# (Block.unhandled), said once: a new option is never skipped by a kernel that predates it.
CPU_KNOWN = dict.fromkeys(('filters', 'kernel_size', 'stride', 'dilation', 'padding', 'norm',
                           'norm_groups', 'pool', 'pool_size', 'pool_stride'))
CPU_CONV_HANDLES = {**CPU_KNOWN, 'dilation': (1,)}
CPU_POOL_HANDLES = {**CPU_KNOWN, 'pool': tuple(CPU_POOLS)}
# The one-matmul conv + max pool (Ops.pools_with_conv).
FUSED_HANDLES = {**CPU_CONV_HANDLES, 'stride': (1,), 'pool': ('max',)}


def resolve(name: str) -> str:
  """'auto' -> 'cpu' on a CPU, 'xla' on GPU/TPU; 'cpu' and 'xla' as they are."""
  if name not in BACKENDS:
    raise ValueError(f'ops must be one of {BACKENDS}, got {name!r}')
  if name == 'auto':
    return 'cpu' if jax.default_backend() == 'cpu' else 'xla'
  return name


def compute_dtype(name: str, backend: str) -> str:
  """'auto' -> 'bfloat16' for the library ops on a GPU or TPU, else 'float32'; a named
  dtype as it is (config validation keeps bfloat16 off the CPU kernels)."""
  if name not in DTYPES:
    raise ValueError(f'dtype must be one of {DTYPES}, got {name!r}')
  if name == 'auto':
    return 'bfloat16' if backend == 'xla' and jax.default_backend() != 'cpu' else 'float32'
  return name


NHWC_HWIO = ('NHWC', 'HWIO', 'NHWC')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def library_conv(x, kernel, stride: int, padding: tuple[tuple[int, int], ...],
                 dilation: int = 1):
  """lax.conv_general_dilated of NHWC images with an HWIO kernel (explicit padding),
  its taps `dilation` pixels apart.

  Its backward pass is the two convolutions JAX's transpose rules emit, called through
  the public lax API: jax 0.7.2 (Colab's) tags them with an output sharding that its own
  vmap rule then refuses inside pmap and shard_map (NotImplementedError,
  jax-ml/jax#32157), which is where the trainer vmaps its step over seeds.
  """
  return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                  rhs_dilation=(dilation, dilation),
                                  dimension_numbers=NHWC_HWIO)


def _library_conv_fwd(x, kernel, stride, padding, dilation):
  return library_conv(x, kernel, stride, padding, dilation), (x, kernel)


def _library_conv_bwd(stride, padding, dilation, residuals, dy):
  x, kernel = residuals
  size_in, size_out = x.shape[1:3], dy.shape[1:3]
  k = [(n - 1) * dilation + 1 for n in kernel.shape[:2]]  # The rows a window spans.
  # Where the last window started, counted in input pixels: (out - 1) * stride + 1.
  spanned = [(o - 1) * stride + 1 for o in size_out]
  # dx: dy, spread out by the stride, convolved with the flipped (dilated) kernel, in/out
  # swapped.
  dx_padding = [(k_ - 1 - lo, n - span + lo)
                for n, k_, span, (lo, _) in zip(size_in, k, spanned, padding)]
  dx = lax.conv_general_dilated(dy, lax.rev(kernel, (0, 1)), (1, 1), dx_padding,
                                lhs_dilation=(stride, stride), rhs_dilation=(dilation, dilation),
                                dimension_numbers=('NHWC', 'HWOI', 'NHWC'))
  # dkernel: x correlated with dy (spread by the stride) at every dilation-th offset,
  # summed over the batch.
  dk_padding = [(lo, span - n + k_ - 1 - lo)
                for n, k_, span, (lo, _) in zip(size_in, k, spanned, padding)]
  dkernel = lax.conv_general_dilated(x, dy, (dilation, dilation), dk_padding,
                                     rhs_dilation=(stride, stride),
                                     dimension_numbers=('CHWN', 'IHWO', 'HWNC'))
  return dx, dkernel


library_conv.defvjp(_library_conv_fwd, _library_conv_bwd)


@dataclasses.dataclass(frozen=True)
class Ops:
  """A resolved backend ('xla' | 'cpu'), the layout its conv blocks run in and the dtype
  they compute in."""
  backend: str = 'xla'
  layout: str = 'NHWC'  # 'CHWN' only with the CPU kernels.
  dtype: str = 'float32'  # 'bfloat16' only with the library ops.
  winograd: bool = True  # CPU kernels: False keeps every conv im2col (a direct convolution).

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

  def conv2d(self, x, kernel, block: shapes.Block,
             out_size: Optional[tuple[int, int]] = None):
    """`block`'s convolution with an HWIO kernel; out_size: only these leading outputs
    (CPU kernels). A block the CPU conv does not handle (CPU_CONV_HANDLES) runs the
    library conv there (in NHWC, its leading out_size outputs kept), said once."""
    if self.backend == 'cpu':
      unhandled = block.unhandled(CPU_CONV_HANDLES)
      if unhandled is None:
        return cpu_conv.conv2d(x, kernel, block, layout=self.layout, out_size=out_size,
                               winograd=self.winograd)
      say_once(f'model.{unhandled}: the CPU conv kernel does not handle it; such blocks run '
               f'the library conv (lax.conv_general_dilated)')
      y = self.to_blocks(Ops().conv2d(self.to_nhwc(x), kernel, block))
      return y if out_size is None else y[:, :out_size[0], :out_size[1]]
    if out_size is not None:
      raise ValueError('out_size is a CPU-kernel plan; the library conv computes every output')
    pads = tuple(block.conv_padding(n) for n in x.shape[1:3])
    return library_conv(x.astype(self.dtype), kernel.astype(self.dtype), block.stride, pads,
                        block.dilation)

  def pool2d(self, x, block: shapes.Block):
    """`block`'s pooling of rows and columns (axes 1 and 2) by its registered pool: on the
    CPU kernels, the CPU_POOLS kernel where CPU_POOL_HANDLES covers the block."""
    pool = shapes.POOLS[block.pool]
    if self.backend == 'cpu' and block.unhandled(CPU_POOL_HANDLES) is None:
      return CPU_POOLS[block.pool](x, block.pool_size, block.pool_stride, fallback=pool.apply)
    return pool.apply(x, block.pool_size, block.pool_stride)

  def conv_outputs(self, blocks, image_hw) -> list[Optional[tuple[int, int]]]:
    """Per block, the conv outputs to compute (None: all). The library ops compute all."""
    if self.backend == 'cpu':
      return shapes.conv_outputs_read(blocks, image_hw)
    return [None] * len(blocks)

  def pools_with_conv(self, block: shapes.Block, in_channels: int, commutes: bool) -> bool:
    """Whether `block` runs its conv and max pool as one matmul (cpu/phases.py): CPU
    kernels in CHWN, a one-channel input, a block that kernel handles (FUSED_HANDLES:
    stride 1, no dilation, max pooling) with tiling windows, and what comes between conv
    and pool commuting with the max (`commutes`: no norm layer, a nondecreasing activation)."""
    return (self.backend == 'cpu' and self.layout == 'CHWN' and in_channels == 1
            and block.unhandled(FUSED_HANDLES) is None
            and block.pool_size == block.pool_stride and commutes)

  def pools_before_activation(self, block: shapes.Block, commutes: bool) -> bool:
    """Whether `block` max-pools its conv's outputs before the bias and activation
    (`commutes`, as for pools_with_conv): the same values, and the bias, the activation
    and their gradients then run on a quarter of the elements (2x2 windows). CPU
    kernels in NHWC only, where it trains faster; in CHWN it does not
    (docs/performance.md)."""
    return (self.backend == 'cpu' and self.layout == 'NHWC' and block.pool == 'max'
            and block.unhandled(CPU_POOL_HANDLES) is None and commutes)

  def conv_max_pool(self, x, kernel, block: shapes.Block,
                    conv_outputs: Optional[tuple[int, int]] = None):
    """max_pool(conv2d(x, kernel), pool_size tiles) for a block pools_with_conv takes."""
    window = block.pool_size
    pooled = None if conv_outputs is None else tuple(
        shapes.valid_windows(n, window, window) for n in conv_outputs)
    return cpu_phases.conv_max_pool(cpu_conv.pad(x, block), kernel, window=window,
                                    layout=self.layout, out_size=pooled)

  @property
  def Dropout(self):  # pylint: disable=invalid-name
    """nn.Dropout's masks, on the CPU kernels from a faster hash; its rate may be traced."""
    return functools.partial(cpu_dropout.Dropout, bits=cpu_dropout.threefry_bits
                             if self.backend == 'cpu' else cpu_dropout.random_bits)


_SAID: set = set()


def say_once(text: str) -> None:
  """A line on stderr the first time this process says `text` (traced code runs often)."""
  if text not in _SAID:
    _SAID.add(text)
    print(f'note: {text}', file=sys.stderr, flush=True)


def make(name: str = 'auto', layout: str = 'NHWC', dtype: str = 'auto') -> Ops:
  """The Ops for a config's model.ops, model.layout (the layout of the CPU kernels) and
  model.dtype."""
  backend = resolve(name)
  return Ops(backend=backend, layout=layout if backend == 'cpu' else 'NHWC',
             dtype=compute_dtype(dtype, backend))
