"""Convolution as the lesson explains it: each output multiplies-and-adds one window.

im2col writes the kh*kw shifted slices of the input as the rows of one matrix and
does one matmul with the kernel. The backward pass is written by hand
(`jax.custom_vjp`): the kernel gradient reuses the forward's patches, and the input
gradient adds each tap's share back with a pad, one fused loop where JAX's own
transpose of the slicing writes a scatter per tap. For 3-wide kernels over many
channels in CHWN, Winograd's F(2, 3) does the same convolution with a third fewer
multiplications (cpu/winograd.py).
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from convnet.cpu import winograd as winograd_lib
from convnet.shapes import conv_output_size


def pad(x, block):
  """x padded as `block`'s conv pads it (rows and columns are axes 1 and 2 in both layouts)."""
  pads = [block.conv_padding(n) for n in x.shape[1:3]]
  return jnp.pad(x, ((0, 0), *pads, (0, 0))) if any(map(any, pads)) else x


def _patches(x, kh: int, kw: int, stride: int, out_h: int, out_w: int, layout: str):
  """The im2col matrix, channel-major: [kh*kw*cin, pixels].

  Row (tap_row, tap_col, in_channel), like a flattened HWIO kernel; one column per
  output pixel, (image, row, col) for NHWC input and (row, col, image) for CHWN.
  Channel-major because both matmuls that read it (the forward pass and the kernel
  gradient) then need no transposed copy. Built as kh rows of kw taps: XLA's CPU
  backend fuses a concatenation of at most 8 operands, so one concatenation of a 3x3
  kernel's 9 taps would be written out and copied again. Each row gets its leading
  axis by a reshape, not jnp.stack, which under vmap (several seeds) put the seed
  axis inside the tap axes and cost a transposing copy.
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
  summed. Both layouts keep rows and columns on axes 1 and 2, so the pads agree.
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


def conv2d(x, kernel, block, *, layout: str = 'NHWC',
           out_size: Optional[tuple[int, int]] = None, winograd: bool = True):
  """2-D convolution of x (NHWC or CHWN) with an HWIO kernel as `block` (a shapes.Block:
  its stride and padding; dilation 1) sets it, as lax.conv computes it.

  With out_size=(rows, cols), only the output's leading rows x cols are computed, from
  the input rows and columns they read. winograd=False: im2col even where F(2, 3) applies.
  """
  x = pad(x, block)
  if out_size is not None:
    full = [conv_output_size(n, block.conv_extent, block.stride, 'VALID') for n in x.shape[1:3]]
    if not all(1 <= o <= f for o, f in zip(out_size, full)):
      raise ValueError(f'conv2d out_size={tuple(out_size)} is not within its '
                       f'{full[0]}x{full[1]} output')
    x = x[:, :block.conv_reads(out_size[0]), :block.conv_reads(out_size[1])]
  if winograd and winograd_lib.applies(x, kernel, layout=layout, stride=block.stride):
    return winograd_lib.conv_valid_winograd(x, kernel)
  return conv_valid_im2col(x, kernel, block.stride, layout)
