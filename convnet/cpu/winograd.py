"""Convolution by Winograd's F(2, 3) along the width, for CHWN on the CPU.

A pair of adjacent outputs of a 3-wide kernel takes four products, where im2col's
windows take six: each product multiplies one combination of the four input columns
the pair reads (B^T d) by one combination of the kernel's three columns (G g), and the
pair is two sums of the products (A^T m). With channels and kernel rows as im2col's
rows, each product is one matmul, so the forward pass and both gradients do 2/3 of
im2col's multiply-adds. The backward pass is written by hand, as for im2col.
"""

import jax
import jax.numpy as jnp
from jax import lax

# With fewer input channels the products' matmuls (3 x channels deep) are too thin to
# gain what the transforms cost (docs/performance.md).
MIN_CHANNELS = 32


def applies(x, kernel, *, layout: str, stride: int) -> bool:
  """Whether a 'VALID' conv of x (already padded) with `kernel` takes F(2, 3): CHWN,
  stride 1, a 3-wide kernel, MIN_CHANNELS input channels or more, an even number of
  output columns."""
  return (layout == 'CHWN' and stride == 1 and kernel.shape[1] == 3
          and x.shape[0] >= MIN_CHANNELS and x.shape[2] % 2 == 0)


def _patches(x, kh: int, out_h: int, out_w: int):
  """[4, kh*cin, pixels]: for each product, the transformed input of every output pair,
  rows (tap_row, in_channel), columns (row, pair, image) (CHWN)."""
  cin, n = x.shape[0], x.shape[3]
  pairs = out_w // 2

  def column(i: int, j: int):  # Input rows i.., columns j, j + 2, ..: one per output pair.
    return lax.slice(x, (0, i, j, 0), (cin, i + out_h, j + 2 * pairs - 1, n), (1, 1, 2, 1))

  def transformed(i: int):  # B^T d for kernel row i.
    d = [column(i, j) for j in range(4)]
    return d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]

  rows = [transformed(i) for i in range(kh)]
  return jnp.concatenate([jnp.concatenate([row[k] for row in rows], axis=0)
                          .reshape(1, kh * cin, -1) for k in range(4)], axis=0)


def _combined_kernel(kernel):
  """G g: the kernel's columns combined for each product, [4, kh*cin, cout]."""
  g0, g1, g2 = kernel[:, 0], kernel[:, 1], kernel[:, 2]
  v = jnp.stack([g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2])
  return v.reshape(4, -1, kernel.shape[-1])


_BATCHED = (((1,), (1,)), ((0,), (0,)))  # [4, K, a] x [4, K, b] -> [4, a, b]


def _forward(x, kernel):
  kh, _, _, cout = kernel.shape
  out_h, out_w, n = x.shape[1] - kh + 1, x.shape[2] - 2, x.shape[3]
  patches, combined = _patches(x, kh, out_h, out_w), _combined_kernel(kernel)
  m = lax.dot_general(combined, patches, _BATCHED).reshape(4, cout, out_h, out_w // 2, n)
  y = jnp.stack([m[0] + m[1] + m[2], m[1] - m[2] - m[3]], axis=3)  # A^T m, pairs interleaved.
  return y.reshape(cout, out_h, out_w, n), (patches, combined, x.shape)


@jax.custom_vjp
def conv_valid_winograd(x, kernel):
  """'VALID' stride-1 convolution of CHWN x with a kh x 3 kernel into an even number of
  columns, by Winograd's F(2, 3) along the width: 4 products where im2col takes 6 per
  output pair, so its matmuls (forward and both gradients) do 2/3 of im2col's work."""
  return _forward(x, kernel)[0]


def _backward(residuals, dy):
  """The transposes of the forward's steps: dy through A^T, two batched matmuls, then the
  kernel's combination and the input's, each input column's share added back by a pad."""
  patches, combined, (cin, h, w, n) = residuals
  cout, out_h, out_w, _ = dy.shape
  kh, pairs = combined.shape[1] // cin, out_w // 2
  dy = dy.reshape(cout, out_h, pairs, 2, n)
  even, odd = dy[:, :, :, 0], dy[:, :, :, 1]
  dm = jnp.stack([even, even + odd, even - odd, -odd]).reshape(4, cout, -1)
  dcombined = lax.dot_general(patches, dm, (((2,), (2,)), ((0,), (0,))))  # [4, K, cout]
  dcombined = dcombined.reshape(4, kh, cin, cout)
  half = (dcombined[1] + dcombined[2]) / 2
  dkernel = jnp.stack([dcombined[0] + half, (dcombined[1] - dcombined[2]) / 2,
                       half + dcombined[3]], axis=1)
  dpatches = lax.dot_general(combined, dm, (((2,), (1,)), ((0,), (0,))))  # [4, K, pixels]
  dpatches = dpatches.reshape(4, kh, cin, out_h, pairs, n)
  dx = 0.0
  for i in range(kh):
    d = dpatches[:, i]
    columns = [d[0], d[1] - d[2] + d[3], d[1] + d[2] - d[0], -d[3]]  # B d's transpose.
    for j, column in enumerate(columns):
      dx = dx + lax.pad(column, jnp.zeros((), dy.dtype),
                        ((0, 0, 0), (i, h - i - out_h, 0), (j, w - j - 2 * pairs + 1, 1),
                         (0, 0, 0)))
  return dx, dkernel


conv_valid_winograd.defvjp(_forward, _backward)
