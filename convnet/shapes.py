"""Output sizes, the pooling registry, and which conv outputs the rest of a net reads.

Every size comes from the config and the input shape, never from a constant, so a
filter or kernel sweep never meets a stale flatten size. A pooling type is one entry
of POOLS: how to compute it, its output-size rule, and optionally which leading input
rows its first outputs read. That last rule is what lets the CPU kernels skip conv
outputs nothing reads; a pool without it is always computed whole, never cropped.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn

PADDINGS = ('SAME', 'VALID')


def conv_output_size(size: int, kernel: int, stride: int, padding: str) -> int:
  """Spatial size after a convolution (TensorFlow/Flax 'SAME'/'VALID' rules)."""
  if padding == 'SAME':
    return -(-size // stride)
  return (size - kernel) // stride + 1


def kernel_extent(block: Mapping[str, Any]) -> int:
  """How many input rows one of a block's conv windows spans: its kernel, dilated."""
  return (block['kernel_size'] - 1) * block.get('dilation', 1) + 1


def windows_extent(count: int, window: int, stride: int) -> int:
  """How many leading rows (or columns) `count` windows of `window` at `stride` cover."""
  return (count - 1) * stride + window


def valid_windows(size: int, window: int, stride: int) -> int:
  """How many whole windows fit ('VALID', the Keras default: partial windows are dropped)."""
  return (size - window) // stride + 1


@dataclasses.dataclass(frozen=True)
class Pool:
  """One pooling type.

  apply(x, window, stride): pools axes 1 and 2 of x (rows and columns in every layout).
  output_size(size, window, stride): the pooled size of a `size`-long axis.
  reads(outputs, window, stride), optional: how many leading input rows the first
    `outputs` outputs read. Give it only if output i reads nothing past that; without
    it the conv before the pool computes every output.
  """
  apply: Callable[..., Any]
  output_size: Optional[Callable[[int, int, int], int]] = None
  reads: Optional[Callable[[int, int, int], int]] = None


def max_pool(x, window: int, stride: int):
  """Max over each window x window window of axes 1 and 2 at `stride` ('VALID').

  Tiling windows (window == stride, the lesson's 2x2) are a reshape and a max, whose
  gradient is a compare and a select: no select-and-scatter, which is slow on GPUs and
  TPUs. Other windows overlap or leave gaps, and go to nn.max_pool."""
  if window != stride:
    return nn.max_pool(x, (window, window), (stride, stride), 'VALID')
  rows, cols = x.shape[1] // window, x.shape[2] // window
  tiles = x[:, :rows * window, :cols * window].reshape(
      x.shape[0], rows, window, cols, window, *x.shape[3:])
  return tiles.max(axis=(2, 4))


POOLS: dict[str, Pool] = {
    'max': Pool(apply=max_pool, output_size=valid_windows, reads=windows_extent),
    'avg': Pool(apply=lambda x, window, stride: nn.avg_pool(x, (window, window),
                                                            (stride, stride), 'VALID'),
                output_size=valid_windows, reads=windows_extent),
    'none': Pool(apply=lambda x, window, stride: x,
                 output_size=lambda size, window, stride: size,
                 reads=lambda outputs, window, stride: outputs),
}


def register_pool(name: str, pool: Pool, replace: bool = False) -> None:
  """Adds a pooling type that configs can name (model.pool); refuses one without a size
  rule, and a name already taken unless `replace` (so no pool is overwritten by mistake)."""
  if name in POOLS and not replace:
    raise ValueError(f'pool {name!r} is already registered; register_pool(..., replace=True) '
                     f'replaces it')
  if not callable(getattr(pool, 'apply', None)):
    raise ValueError(f'pool {name!r}: apply(x, window, stride) is missing')
  if not callable(getattr(pool, 'output_size', None)):
    raise ValueError(f'pool {name!r} has no output_size rule: shapes could not be derived '
                     f'for it; give Pool(output_size=...)')
  POOLS[name] = pool


def block_output_size(size: int, block: Mapping[str, Any]) -> int:
  """Spatial size after a block's conv and its pool."""
  size = conv_output_size(size, kernel_extent(block), block['stride'], block['padding'])
  return POOLS[block['pool']].output_size(size, block['pool_size'], block['pool_stride'])


def feature_shapes(blocks: Sequence[Mapping[str, Any]],
                   image_shape: Sequence[int]) -> list[tuple[int, int, int]]:
  """(height, width, channels) after each block, from the settings alone."""
  h, w, _ = image_shape
  shapes = []
  for block in blocks:
    h, w = block_output_size(h, block), block_output_size(w, block)
    shapes.append((h, w, block['filters']))
  return shapes


def conv_outputs_read(blocks: Sequence[Mapping[str, Any]],
                      image_hw: Sequence[int]) -> list[Optional[tuple[int, int]]]:
  """For each block, the leading rows x cols of its conv output that the rest of the
  net reads, or None where that is all of it.

  Walks back from the last block, whose output is flattened whole: a pool with a
  `reads` rule reads the leading conv rows its outputs cover (a partial window at the
  edge is dropped), and a 'VALID' conv reads windows_extent(outputs) rows of its input,
  so the block before may compute fewer. A norm layer's statistics see every output
  and a 'SAME' conv's padding depends on its whole input: there the cut stops.
  """
  inputs = [tuple(image_hw)]
  for block in blocks[:-1]:
    inputs.append(tuple(block_output_size(n, block) for n in inputs[-1]))
  plan, read = [], None  # read: the rows x cols of this block's output the next one reads.
  for block, size in zip(reversed(blocks), reversed(inputs)):
    k, stride = kernel_extent(block), block['stride']
    conv = tuple(conv_output_size(n, k, stride, block['padding']) for n in size)
    pool = POOLS[block['pool']]
    window, pool_stride = block['pool_size'], block['pool_stride']
    if block['norm'] != 'none' or pool.reads is None:
      needed = conv
    else:
      pooled = read or tuple(pool.output_size(n, window, pool_stride) for n in conv)
      needed = tuple(pool.reads(n, window, pool_stride) for n in pooled)
    plan.insert(0, None if needed == conv else needed)
    read = (tuple(windows_extent(n, k, stride) for n in needed)
            if block['padding'] == 'VALID' else None)
    read = None if read == size else read
  return plan
