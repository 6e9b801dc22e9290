"""Plain NumPy references, as the lesson explains conv and pooling: sliding windows."""

import numpy as np

from convnet import ops

# Every kernel backend, in both of the CPU kernels' layouts.
ALL_OPS = [ops.Ops('xla'), ops.Ops('cpu', 'NHWC'), ops.Ops('cpu', 'CHWN')]
OPS_IDS = ['xla', 'cpu-NHWC', 'cpu-CHWN']


def same_padding(size, kernel, stride):
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def dilated(kernel, dilation):
  """An HWIO kernel with dilation - 1 zero rows and columns between its taps."""
  kh, kw, cin, cout = kernel.shape
  spread = np.zeros(((kh - 1) * dilation + 1, (kw - 1) * dilation + 1, cin, cout), kernel.dtype)
  spread[::dilation, ::dilation] = kernel
  return spread


def numpy_conv(x, kernel, bias, stride, padding, dilation=1):
  """Slide each kh x kw window over x; multiply by the kernel and add (NHWC, HWIO). A
  dilated kernel is its taps spread apart with zeros between."""
  kernel = dilated(kernel, dilation)
  kh, kw, _, cout = kernel.shape
  n, h, w, _ = x.shape
  if padding == 'SAME':
    x = np.pad(x, ((0, 0), same_padding(h, kh, stride), same_padding(w, kw, stride), (0, 0)))
  out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = np.zeros((n, out_h, out_w, cout))
  for i in range(out_h):
    for j in range(out_w):
      window = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      out[:, i, j, :] = np.tensordot(window, kernel, axes=([1, 2, 3], [0, 1, 2])) + bias
  return out


def numpy_conv_gradients(x, kernel, stride, padding, dy, dilation=1):
  """d(sum(conv(x) * dy)) / d(x, kernel): each window's product with dy, added back (the
  kernel's gradient at its taps, for a dilated one)."""
  if dilation > 1:
    dx, dspread = numpy_conv_gradients(x, dilated(kernel, dilation), stride, padding, dy)
    return dx, dspread[::dilation, ::dilation]
  kh, kw, _, _ = kernel.shape
  _, h, w, _ = x.shape
  pad_h = pad_w = (0, 0)
  if padding == 'SAME':
    pad_h, pad_w = same_padding(h, kh, stride), same_padding(w, kw, stride)
  xp = np.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  dxp, dkernel = np.zeros_like(xp), np.zeros_like(kernel)
  for i in range(dy.shape[1]):
    for j in range(dy.shape[2]):
      rows, cols = slice(i * stride, i * stride + kh), slice(j * stride, j * stride + kw)
      dkernel += np.einsum('nabi,no->abio', xp[:, rows, cols, :], dy[:, i, j, :])
      dxp[:, rows, cols, :] += np.einsum('abio,no->nabi', kernel, dy[:, i, j, :])
  return dxp[:, pad_h[0]:pad_h[0] + h, pad_w[0]:pad_w[0] + w], dkernel


def numpy_pool(x, reduce, window, stride):
  """`reduce` over each window x window window at `stride` ('VALID': partial ones dropped)."""
  n, h, w, c = x.shape
  out_h, out_w = (h - window) // stride + 1, (w - window) // stride + 1
  out = np.zeros((n, out_h, out_w, c))
  for i in range(out_h):
    for j in range(out_w):
      out[:, i, j, :] = reduce(x[:, i * stride:i * stride + window,
                                 j * stride:j * stride + window, :], axis=(1, 2))
  return out
