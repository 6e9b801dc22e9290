"""The lesson's model: conv blocks (conv -> [norm] -> activation -> [pool]), then dense layers.

A ConvBlock slides `filters` kernel_size x kernel_size windows over its input (each
output multiplies-and-adds one window), optionally normalises, applies the
activation, and pools (2x2 max pooling takes 28x28 to 14x14). A ConvNet is a list
of blocks, a flatten whose size comes from whatever the blocks produce, dense
hidden layers with dropout, and the logits.

Convolution, pooling and dropout go through `ops` (convnet/ops.py): the library's
own ops, or the CPU kernels in convnet/cpu. Both hold the same parameters, so the
modules below do not change with the backend. They take plain arguments, not a
ConfigDict, so they can be reused anywhere.

The registries below are the choices config validation offers: a new norm layer or
activation is one entry here; pooling types live in shapes.POOLS.
"""

from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from convnet import shapes
from convnet.ops import Ops


class Activation(NamedTuple):
  fn: Callable
  # Nondecreasing: max-pooling its outputs equals applying it to the max-pooled inputs.
  nondecreasing: bool


ACTIVATIONS = {
    'relu': Activation(jax.nn.relu, True),
    'gelu': Activation(jax.nn.gelu, False),
    'elu': Activation(jax.nn.elu, True),
    'silu': Activation(jax.nn.silu, False),
    'tanh': Activation(jnp.tanh, False),
    'sigmoid': Activation(jax.nn.sigmoid, False),
    'leaky_relu': Activation(jax.nn.leaky_relu, True),
    'identity': Activation(lambda x: x, True),
}

class NormSite(NamedTuple):
  """Where a norm layer sits, which is all a NORMS factory needs to build one."""
  channels: int
  channel_axis: int  # Of the block's layout: -1 in NHWC; 0 in CHWN (batch innermost).
  train: bool
  axis_name: Optional[str]  # BatchNorm statistics are averaged over this pmap axis.
  dtype: Any  # What the layer computes in.
  groups: int  # GroupNorm's channel groups (ConvBlock.norm_groups).


class GroupNorm(nn.Module):
  """Each example's channels in `groups` groups, each normalised over its channels and
  every position; for any layout (Flax's nn.GroupNorm takes axis 0 for the batch, which
  the CHWN layout puts last). Statistics in float32; a scale and bias per channel."""
  groups: int
  channel_axis: int
  dtype: Any = jnp.float32
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    channels, axis = x.shape[self.channel_axis], self.channel_axis % x.ndim
    shape = (*x.shape[:axis], self.groups, channels // self.groups, *x.shape[axis + 1:])
    grouped = x.reshape(shape).astype(jnp.float32)
    rows_and_columns = tuple(a + (a > axis) for a in (1, 2))  # Axes 1 and 2 in every layout.
    reduce = (*rows_and_columns, axis + 1)
    mean = grouped.mean(reduce, keepdims=True)
    var = jnp.square(grouped - mean).mean(reduce, keepdims=True)
    y = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    at_channels = [1] * x.ndim
    at_channels[axis] = channels
    scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    return (y * scale.reshape(at_channels) + bias.reshape(at_channels)).astype(self.dtype)


# name -> NormSite -> a norm layer; 'none' means a bias instead. Statistics and scales are
# float32 at any compute dtype.
NORMS = {
    'none': None,
    'batch': lambda site: nn.BatchNorm(
        use_running_average=not site.train, momentum=0.9, axis=site.channel_axis,
        axis_name=site.axis_name if site.train else None, dtype=site.dtype),
    'layer': lambda site: nn.LayerNorm(reduction_axes=site.channel_axis,
                                       feature_axes=site.channel_axis, dtype=site.dtype),
    'group': lambda site: GroupNorm(groups=site.groups, channel_axis=site.channel_axis,
                                    dtype=site.dtype),
}


class ConvBlock(nn.Module):
  """conv -> [norm] -> activation -> [pool]: one block of the lesson's model, as its
  `spec` (a shapes.Block: the per-block config keys and their geometry) sets it.

  Input and output have rows and columns on axes 1 and 2 (NHWC, or CHWN when the
  CPU kernels run batch-innermost); the parameters are the same either way.
  """
  spec: shapes.Block
  activation: str = 'relu'  # A key of ACTIVATIONS (model.activation: one for every block).
  ops: Ops = Ops()
  axis_name: Optional[str] = None  # BatchNorm statistics are averaged over this pmap axis.
  conv_outputs: Optional[tuple[int, int]] = None  # Leading conv outputs to compute; None: all.

  @property
  def commutes_with_max_pool(self) -> bool:
    """Whether what comes between conv and pool (a bias, the activation) commutes with a max."""
    return NORMS[self.spec.norm] is None and ACTIVATIONS[self.activation].nondecreasing

  @nn.compact
  def __call__(self, x, train: bool = False):
    ops, spec = self.ops, self.spec
    in_channels = x.shape[ops.channel_axis]
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (spec.kernel_size, spec.kernel_size, in_channels, spec.filters),
                        jnp.float32)
    if ops.pools_with_conv(spec, in_channels, self.commutes_with_max_pool):  # One matmul (CPU).
      y = ops.conv_max_pool(x, kernel, spec, conv_outputs=self.conv_outputs)
      return ACTIVATIONS[self.activation].fn(self._normalize(y, train))
    y = ops.conv2d(x, kernel, spec, out_size=self.conv_outputs)
    if ops.pools_before_activation(spec, self.commutes_with_max_pool):  # CPU kernels, NHWC.
      return ACTIVATIONS[self.activation].fn(self._normalize(ops.pool2d(y, spec), train))
    y = self._normalize(y, train)
    y = ACTIVATIONS[self.activation].fn(y)
    self.sow('intermediates', 'conv', ops.to_nhwc(y))  # Kept only when asked for (visualize).
    y = ops.pool2d(y, spec)
    self.sow('intermediates', 'pool', ops.to_nhwc(y))
    return y

  def _normalize(self, y, train: bool):
    """The norm layer, or a bias where there is none (a bias before a norm is redundant)."""
    make_norm = NORMS[self.spec.norm]
    if make_norm is None:
      bias = self.param('bias', nn.initializers.zeros, (self.spec.filters,), jnp.float32)
      return y + self.ops.per_channel(bias).astype(y.dtype)
    return make_norm(NormSite(channels=self.spec.filters, channel_axis=self.ops.channel_axis,
                              train=train, axis_name=self.axis_name, dtype=self.ops.dtype,
                              groups=self.spec.norm_groups))(y)


# The values a per-block str field (of shapes.Block) may take: a registry's names at
# validation time.
BLOCK_CHOICES = {'padding': shapes.PADDINGS, 'norm': NORMS, 'pool': shapes.POOLS}


class ConvNet(nn.Module):
  """Conv blocks, flatten, dense hidden layers (each after a dropout), dropout, logits.

  `blocks` holds one shapes.Block per conv block; images come in as NHWC. The
  layers compute in ops.dtype; the logits come out in float32, for the loss.
  """
  blocks: Sequence[shapes.Block]
  activation: str = 'relu'
  hidden: Sequence[int] = (128,)
  dropout: float = 0.0
  num_classes: int = 10
  ops: Ops = Ops()
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv_outputs = self.ops.conv_outputs(self.blocks, x.shape[1:3])
    x = self.ops.to_blocks(x)
    for block, outputs in zip(self.blocks, conv_outputs):
      x = ConvBlock(block, activation=self.activation, ops=self.ops,
                    axis_name=self.axis_name, conv_outputs=outputs)(x, train)
    x = self.ops.to_nhwc(x)
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = self.ops.Dropout(self.dropout, deterministic=not train)(x)
      x = ACTIVATIONS[self.activation].fn(nn.Dense(width, dtype=self.ops.dtype)(x))
    x = self.ops.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.ops.dtype)(x).astype(jnp.float32)


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def feature_maps(model: ConvNet, variables, x) -> list[tuple[str, jax.Array]]:
  """[(name, [n, h, w, c])] after each block's conv (and activation) and its pooling.

  Computed whole by the library ops on the same parameters: the CPU kernels may skip
  conv outputs that the next block does not read.
  """
  whole = model.clone(ops=Ops())
  _, state = jax.jit(lambda v, x: whole.apply(v, x, mutable=['intermediates']))(variables, x)
  blocks = state['intermediates']
  return [(f'block {i} {kind}', blocks[f'ConvBlock_{i}'][kind][0])
          for i in range(len(blocks)) for kind in ('conv', 'pool')]
