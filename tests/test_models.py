"""Conv and pooling blocks against plain NumPy sliding windows, as the lesson explains them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convnet import config_lib, models
from configs import default


def numpy_conv(x, kernel, bias, stride, padding):
  """Slide each kh x kw window over x; multiply by the kernel and add (NHWC, HWIO)."""
  kh, kw, _, cout = kernel.shape
  n, h, w, _ = x.shape
  if padding == 'SAME':
    out_h, out_w = -(-h // stride), -(-w // stride)
    pad_h = max((out_h - 1) * stride + kh - h, 0)
    pad_w = max((out_w - 1) * stride + kw - w, 0)
    x = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                   (0, 0)))
  else:
    out_h, out_w = (h - kh) // stride + 1, (w - kw) // stride + 1
  out = np.zeros((n, out_h, out_w, cout))
  for i in range(out_h):
    for j in range(out_w):
      window = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      out[:, i, j, :] = np.tensordot(window, kernel, axes=([1, 2, 3], [0, 1, 2])) + bias
  return out


def numpy_pool(x, reduce, window, stride):
  n, h, w, c = x.shape
  out_h, out_w = (h - window) // stride + 1, (w - window) // stride + 1
  out = np.zeros((n, out_h, out_w, c))
  for i in range(out_h):
    for j in range(out_w):
      out[:, i, j, :] = reduce(x[:, i * stride:i * stride + window,
                                 j * stride:j * stride + window, :], axis=(1, 2))
  return out


@pytest.mark.parametrize('impl', models.CONV_IMPLS)
@pytest.mark.parametrize('padding', models.PADDINGS)
@pytest.mark.parametrize('kernel_size,stride,filters', [(3, 1, 1), (3, 1, 8), (5, 2, 4),
                                                        (1, 1, 3), (4, 3, 2)])
def test_conv_block_matches_numpy_sliding_window(mnist, impl, padding, kernel_size, stride,
                                                 filters):
  x = np.concatenate([mnist.test.images[:2], mnist.test.images[2:4]], -1) / 255.0  # 2 channels
  block = models.ConvBlock(filters, kernel_size, stride, padding, activation='identity',
                           pool='none', conv_impl=impl)
  params = block.init(jax.random.key(0), x)
  params = jax.tree_util.tree_map(
      lambda p: jax.random.normal(jax.random.key(1), p.shape), params)  # non-zero bias too
  got = block.apply(params, x)
  want = numpy_conv(x, np.asarray(params['params']['kernel']),
                    np.asarray(params['params']['bias']), stride, padding)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('kind,reduce', [('max', np.max), ('avg', np.mean)])
@pytest.mark.parametrize('window,stride', [(2, 2), (3, 3), (3, 2), (2, 1)])
def test_pooling_matches_numpy_windows(mnist, kind, reduce, window, stride):
  x = mnist.test.images[:3, :27, :, :].astype(np.float32)  # odd height: partial windows dropped
  got = models.pool2d(jnp.asarray(x), kind, window, stride)
  np.testing.assert_allclose(got, numpy_pool(x, reduce, window, stride), rtol=1e-6)


def test_max_pool_takes_28_to_14_and_keeps_each_2x2_maximum(mnist):
  x = mnist.test.images[:1].astype(np.float32)
  pooled = models.pool2d(jnp.asarray(x), 'max', 2, 2)
  assert pooled.shape == (1, 14, 14, 1)
  assert pooled[0, 5, 7, 0] == x[0, 10:12, 14:16, 0].max()


def line_filters():
  vertical = np.array([[-1, 2, -1]] * 3, np.float32)  # bright column between dark ones
  return vertical, vertical.T


def test_vertical_line_filter_lights_up_vertical_strokes(mnist):
  """The lesson's feature detector, on real digits '1' upright and turned on their side."""
  ones = mnist.test.images[mnist.test.labels == 1][:100] / 255.0
  vertical, horizontal = line_filters()
  kernel = np.stack([vertical, horizontal], -1)[:, :, None, :]  # HWIO, two filters
  block = models.ConvBlock(2, 3, activation='relu', pool='max')
  params = {'params': {'kernel': kernel, 'bias': np.zeros(2, np.float32)}}
  assert block.apply(params, ones).shape == (100, 14, 14, 2)
  upright = block.apply(params, ones).sum(axis=(1, 2))  # [100, 2] total response per filter
  sideways = block.apply(params, ones.transpose(0, 2, 1, 3)).sum(axis=(1, 2))
  assert np.all(upright[:, 0] > upright[:, 1])
  assert upright[:, 0].mean() > 2 * upright[:, 1].mean()
  assert np.all(sideways[:, 1] > sideways[:, 0])
  assert sideways[:, 1].mean() > 2 * sideways[:, 0].mean()


def test_convnet_shapes_and_parameter_count_for_the_lesson_model():
  config = default.get_config()
  model = models.ConvNet(**config_lib.model_args(config.model))
  x = jnp.zeros((3, 28, 28, 1))
  params = model.init(jax.random.key(0), x)
  assert model.apply(params, x).shape == (3, 10)
  assert models.feature_shapes(model, (28, 28, 1)) == [(14, 14, 32)]
  conv = 3 * 3 * 1 * 32 + 32
  dense = 14 * 14 * 32 * 128 + 128
  logits = 128 * 10 + 10
  assert models.count_params(params['params']) == conv + dense + logits


def test_parameter_count_of_a_two_block_batchnorm_net_with_valid_padding():
  config = default.get_config()
  config.model.num_blocks = 2
  config.model.filters = (16, 32)
  config.model.kernel_size = (5, 3)
  config.model.padding = ('VALID',)
  config.model.norm = ('batch',)
  config.model.hidden = ()
  model = models.ConvNet(**config_lib.model_args(config.model))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  # 28 -5+1-> 24 -pool-> 12 -3+1-> 10 -pool-> 5; no conv bias before BatchNorm.
  assert models.feature_shapes(model, (28, 28, 1)) == [(12, 12, 16), (5, 5, 32)]
  want = (5 * 5 * 1 * 16 + 2 * 16) + (3 * 3 * 16 * 32 + 2 * 32) + (5 * 5 * 32 * 10 + 10)
  assert models.count_params(variables['params']) == want
  assert models.count_params(variables['batch_stats']) == 2 * (16 + 32)
