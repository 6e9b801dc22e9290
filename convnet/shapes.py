"""A block's settings and their geometry, the pooling registry, and which conv outputs
the rest of a net reads.

Every size comes from the config (a Block per conv block) and the input shape, never
from a constant, so a filter or kernel sweep never meets a stale flatten size. A
pooling type is one entry of POOLS: how to compute it, its output-size rule, and
optionally which leading input rows its first outputs read. That last rule is what lets
the CPU kernels skip conv outputs nothing reads; a pool without it is always computed
whole, never cropped.
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


@dataclasses.dataclass(frozen=True)
class Block:
  """One conv block's settings, and the geometry they give: its conv's output size, the
  input rows its conv outputs read, its padding, its pooled size.

  The conv (models.ConvBlock via ops.Ops.conv2d), the size checks, the CPU kernels'
  crop plan (conv_outputs_read) and the peers all read these methods, so shapes cannot
  disagree with the conv. Each field is a per-block config key, model.<field>
  (config_lib.BLOCK_SCHEMA): an int must be > 0, a str one of models.BLOCK_CHOICES; a
  config without the key takes the default. A new field with a default is a config key at
  once; a conv option that changes which pixels a window reads changes `conv_extent` here.
  """
  filters: int
  kernel_size: int = 3
  stride: int = 1
  dilation: int = 1  # Taps this many pixels apart: a 3x3 kernel dilated by 2 spans 5x5.
  padding: str = 'SAME'  # 'SAME' keeps the size (at stride 1); 'VALID' loses the extent - 1.
  norm: str = 'none'  # A key of models.NORMS.
  norm_groups: int = 8  # norm='group': channel groups (dividing filters).
  pool: str = 'max'  # A key of POOLS.
  pool_size: int = 2
  pool_stride: int = 2

  @property
  def conv_extent(self) -> int:
    """How many input rows (or columns) one conv window spans: its kernel, dilated."""
    return (self.kernel_size - 1) * self.dilation + 1

  def conv_output_size(self, size: int) -> int:
    return conv_output_size(size, self.conv_extent, self.stride, self.padding)

  def conv_reads(self, outputs: int) -> int:
    """How many leading rows of the (padded) input the first `outputs` conv outputs read."""
    return windows_extent(outputs, self.conv_extent, self.stride)

  def conv_padding(self, size: int) -> tuple[int, int]:
    """The zeros before and after a `size`-long axis (TensorFlow's 'SAME': the odd one after)."""
    if self.padding == 'VALID':
      return 0, 0
    total = max(self.conv_reads(self.conv_output_size(size)) - size, 0)
    return total // 2, total - total // 2

  def output_size(self, size: int) -> int:
    """Spatial size after the conv and the pool."""
    return POOLS[self.pool].output_size(self.conv_output_size(size), self.pool_size,
                                        self.pool_stride)

  def unhandled(self, handles: Mapping[str, Optional[Sequence[Any]]]) -> Optional[str]:
    """The first field a kernel written for `handles` would get wrong, as 'name=value', or
    None: a field it does not list set away from its default, or a listed one at a value
    outside its tuple (None: any value). So a new option is never skipped by a kernel
    that predates it."""
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name in handles:
        allowed = handles[field.name]
        if allowed is not None and value not in allowed:
          return f'{field.name}={value!r}'
      elif value != field.default:
        return f'{field.name}={value!r}'
    return None


def feature_shapes(blocks: Sequence[Block],
                   image_shape: Sequence[int]) -> list[tuple[int, int, int]]:
  """(height, width, channels) after each block, from the settings alone."""
  h, w, _ = image_shape
  shapes = []
  for block in blocks:
    h, w = block.output_size(h), block.output_size(w)
    shapes.append((h, w, block.filters))
  return shapes


def conv_outputs_read(blocks: Sequence[Block],
                      image_hw: Sequence[int]) -> list[Optional[tuple[int, int]]]:
  """For each block, the leading rows x cols of its conv output that the rest of the
  net reads, or None where that is all of it.

  Walks back from the last block, whose output is flattened whole: a pool with a
  `reads` rule reads the leading conv rows its outputs cover (a partial window at the
  edge is dropped), and a 'VALID' conv reads Block.conv_reads(outputs) rows of its input,
  so the block before may compute fewer. A norm layer's statistics see every output
  and a 'SAME' conv's padding depends on its whole input: there the cut stops.
  """
  inputs = [tuple(image_hw)]
  for block in blocks[:-1]:
    inputs.append(tuple(block.output_size(n) for n in inputs[-1]))
  plan, read = [], None  # read: the rows x cols of this block's output the next one reads.
  for block, size in zip(reversed(blocks), reversed(inputs)):
    conv = tuple(block.conv_output_size(n) for n in size)
    pool = POOLS[block.pool]
    window, pool_stride = block.pool_size, block.pool_stride
    if block.norm != 'none' or pool.reads is None:
      needed = conv
    else:
      pooled = read or tuple(pool.output_size(n, window, pool_stride) for n in conv)
      needed = tuple(pool.reads(n, window, pool_stride) for n in pooled)
    plan.insert(0, None if needed == conv else needed)
    read = tuple(block.conv_reads(n) for n in needed) if block.padding == 'VALID' else None
    read = None if read == size else read
  return plan
