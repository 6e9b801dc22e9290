"""Conv and pooling blocks against plain NumPy sliding windows, as the lesson explains them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
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


def numpy_conv_gradients(x, kernel, stride, padding, dy):
  """d(sum(conv(x) * dy)) / d(x, kernel): each window's product with dy, added back.

  The same windows as numpy_conv: the kernel gradient sums window * dy over every
  position, the input gradient adds kernel * dy back onto each window's pixels.
  """
  kh, kw, _, _ = kernel.shape
  n, h, w, _ = x.shape
  pad_h = pad_w = (0, 0)
  if padding == 'SAME':
    total_h = max((dy.shape[1] - 1) * stride + kh - h, 0)
    total_w = max((dy.shape[2] - 1) * stride + kw - w, 0)
    pad_h, pad_w = (total_h // 2, total_h - total_h // 2), (total_w // 2, total_w - total_w // 2)
  xp = np.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  dxp, dkernel = np.zeros_like(xp), np.zeros_like(kernel)
  for i in range(dy.shape[1]):
    for j in range(dy.shape[2]):
      rows, cols = slice(i * stride, i * stride + kh), slice(j * stride, j * stride + kw)
      dkernel += np.einsum('nabi,no->abio', xp[:, rows, cols, :], dy[:, i, j, :])
      dxp[:, rows, cols, :] += np.einsum('abio,no->nabi', kernel, dy[:, i, j, :])
  return dxp[:, pad_h[0]:pad_h[0] + h, pad_w[0]:pad_w[0] + w], dkernel


@pytest.mark.parametrize('layout', models.LAYOUTS)
@pytest.mark.parametrize('impl', models.CONV_IMPLS)
@pytest.mark.parametrize('padding', models.PADDINGS)
@pytest.mark.parametrize('kernel_size,stride', [(3, 1), (5, 2), (1, 1), (4, 3), (2, 2)])
def test_conv_gradients_match_numpy_windows(mnist, impl, padding, kernel_size, stride, layout):
  """The hand-written im2col backward pass (and lax.conv's) against the windows' sums."""
  x = (np.concatenate([mnist.test.images[:2], mnist.test.images[2:4]], -1) / 255.0)[:, :13]
  kernel = np.asarray(jax.random.normal(jax.random.key(0), (kernel_size, kernel_size, 2, 3)))
  # The layout under test inside; NHWC in and out, as the NumPy reference.
  to = (lambda a: a) if layout == 'NHWC' else models.swap_batch_and_channels
  conv = lambda x, k: to(models.conv2d(to(x), k, stride, padding, impl, layout))
  y = conv(jnp.asarray(x), jnp.asarray(kernel))
  assert y.shape == numpy_conv(x, kernel, 0, stride, padding).shape
  dy = np.asarray(jax.random.normal(jax.random.key(1), y.shape))
  dx, dkernel = jax.grad(lambda x, k: jnp.sum(conv(x, k) * dy),
                         argnums=(0, 1))(jnp.asarray(x, jnp.float32), jnp.asarray(kernel))
  want_dx, want_dkernel = numpy_conv_gradients(x, kernel, stride, padding, dy)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dkernel, want_dkernel, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('noise', [0.0, 1e-3])
@pytest.mark.parametrize('window', [2, 3])
def test_max_pool_gradient_goes_to_each_window_first_maximum(mnist, window, noise):
  """Real digits: without noise the blank background ties in every window, and the
  gradient goes to the first maximum in row-major order (np.argmax's), as in TF."""
  noise = np.random.default_rng(0).normal(0, noise, (2, 27, 28, 1))
  x = (mnist.test.images[:2, :27] / 255.0 + noise).astype(np.float32)
  pooled_shape = numpy_pool(x, np.max, window, window).shape
  dy = np.random.default_rng(1).normal(size=pooled_shape).astype(np.float32)
  dx = jax.grad(lambda x: jnp.sum(models.pool2d(x, 'max', window, window) * dy))(jnp.asarray(x))
  want = np.zeros_like(x)
  for i in range(pooled_shape[1]):
    for j in range(pooled_shape[2]):
      for n in range(2):
        tile = x[n, i * window:(i + 1) * window, j * window:(j + 1) * window, 0]
        a, b = np.unravel_index(np.argmax(tile), tile.shape)
        want[n, i * window + a, j * window + b, 0] = dy[n, i, j, 0]
  np.testing.assert_allclose(dx, want, rtol=1e-6)


def test_max_over_phases_sends_the_gradient_to_the_first_tied_maximum():
  y = jnp.array([[1.0, 3.0, 2.0], [3.0, 0.0, 2.0], [3.0, 3.0, 2.0]])  # [phase, position]
  dm = jnp.array([10.0, 20.0, 30.0])
  np.testing.assert_array_equal(models.max_over_phases(y), [3.0, 3.0, 2.0])
  grad = jax.grad(lambda y: jnp.sum(models.max_over_phases(y) * dm))(y)
  np.testing.assert_array_equal(grad, [[0, 20, 30], [10, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize('layout', models.LAYOUTS)
@pytest.mark.parametrize('kernel_size,window,size,channels', [
    (3, 2, 28, 1), (3, 2, 27, 1), (5, 2, 28, 1), (3, 3, 28, 1), (2, 2, 13, 2)])
def test_conv_max_pool_by_phase_matches_numpy_windows(mnist, layout, kernel_size, window, size,
                                                      channels):
  """Values against NumPy's sliding windows (odd sizes: the pool drops the last row);
  gradients against lax.conv + Flax's max pool with JAX's derivatives."""
  noise = np.random.default_rng(0).normal(0, 1e-3, (3, size, size, channels))
  x = np.concatenate([mnist.test.images[i:i + 3, :size, :size] for i in range(channels)], -1)
  x = (x / 255.0 + noise).astype(np.float32)  # no pool window with two equal maxima
  kernel = np.random.default_rng(1).normal(size=(kernel_size, kernel_size, channels, 4))
  kernel = kernel.astype(np.float32)
  want = numpy_pool(numpy_conv(x, kernel, 0.0, 1, 'VALID'), np.max, window, window)
  to_layout = (lambda a: a) if layout == 'NHWC' else models.swap_batch_and_channels

  def ours(x, kernel):
    return to_layout(models.conv_max_pool_by_phase(to_layout(x), kernel, window, layout))

  def reference(x, kernel):
    y = lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return nn.max_pool(y, (window, window), (window, window), 'VALID')

  np.testing.assert_allclose(ours(x, kernel), want, rtol=1e-5, atol=1e-5)
  dy = np.random.default_rng(2).normal(size=want.shape).astype(np.float32)
  got = jax.grad(lambda x, k: jnp.sum(ours(x, k) * dy), argnums=(0, 1))(x, kernel)
  expected = jax.grad(lambda x, k: jnp.sum(reference(x, k) * dy), argnums=(0, 1))(x, kernel)
  for a, b in zip(got, expected):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('layout,changes,by_phase', [
    ('CHWN', {}, True), ('CHWN', {'padding': 'SAME', 'activation': 'leaky_relu'}, True),
    ('NHWC', {}, False), ('CHWN', {'norm': 'layer'}, False), ('CHWN', {'stride': 2}, False),
    ('CHWN', {'pool_stride': 1}, False), ('CHWN', {'activation': 'gelu'}, False),
    ('CHWN', {'conv_impl': 'xla'}, False)])
def test_a_one_channel_block_pools_by_phase_only_where_that_is_exact(
    mnist, monkeypatch, layout, changes, by_phase):
  """Where ConvBlock takes conv_max_pool_by_phase, and that the block's output and
  gradients are those of the same block in NHWC, which never takes it. Real digits:
  the pool windows on their blank background tie, and both send the gradient to the
  first maximum."""
  calls = []
  real = models.conv_max_pool_by_phase
  monkeypatch.setattr(models, 'conv_max_pool_by_phase',
                      lambda *args: calls.append(args) or real(*args))
  settings = {**dict(features=4, kernel_size=3, padding='VALID', pool='max', pool_size=2,
                     pool_stride=2, activation='relu'), **changes}
  block = models.ConvBlock(**settings, layout=layout)
  nhwc_block = models.ConvBlock(**settings)
  x = jnp.asarray(mnist.test.images[:4, :27] / 255.0, jnp.float32)
  to_layout = (lambda a: a) if layout == 'NHWC' else models.swap_batch_and_channels
  variables = nhwc_block.init(jax.random.key(0), x)
  variables = jax.tree_util.tree_map(  # Non-zero biases too.
      lambda p: 0.3 * jax.random.normal(jax.random.key(1), p.shape), variables)

  def loss(block, variables, x):
    return jnp.sum(jnp.sin(block.apply(variables, x)))

  got = jax.value_and_grad(lambda v: loss(block, v, to_layout(x)))(variables)
  assert len(calls) == (1 if by_phase else 0)
  want = jax.value_and_grad(lambda v: loss(nhwc_block, v, x))(variables)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize('norm,pool,pool_size,pool_stride,padding', [
    ('none', 'max', 2, 2, 'VALID'), ('batch', 'max', 3, 2, 'SAME'), ('layer', 'avg', 2, 2, 'SAME'),
    ('none', 'avg', 3, 1, 'VALID')])
def test_chwn_layout_gives_the_nhwc_model_outputs_and_gradients(
    mnist, norm, pool, pool_size, pool_stride, padding):
  """Same parameters, same logits, same gradients (BatchNorm statistics too) in both layouts.
  (conv_impl='xla' in CHWN is checked against NumPy in the conv gradient test.)"""
  args = dict(filters=(4, 8), kernel_sizes=(3, 3), strides=(1, 2), paddings=(padding,) * 2,
              norms=(norm,) * 2, pools=(pool,) * 2, pool_sizes=(pool_size,) * 2,
              pool_strides=(pool_stride,) * 2, hidden=(16,))
  nhwc, chwn = models.ConvNet(**args), models.ConvNet(**args, layout='CHWN')
  x = jnp.asarray(mnist.test.images[:8] / 255.0, jnp.float32)
  labels = jnp.asarray(mnist.test.labels[:8])
  variables = nhwc.init(jax.random.key(0), x)
  assert (jax.tree_util.tree_structure(variables) ==
          jax.tree_util.tree_structure(chwn.init(jax.random.key(0), x)))

  def loss(model, params):
    logits, updates = model.apply({**variables, 'params': params}, x, train=True,
                                  mutable=['batch_stats'])
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(8), labels]), updates

  (loss_a, stats_a), grads_a = jax.value_and_grad(lambda p: loss(nhwc, p), has_aux=True)(
      variables['params'])
  (loss_b, stats_b), grads_b = jax.value_and_grad(lambda p: loss(chwn, p), has_aux=True)(
      variables['params'])
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves((grads_a, stats_a)),
                  jax.tree_util.tree_leaves((grads_b, stats_b))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(nhwc.apply(variables, x), chwn.apply(variables, x), rtol=1e-4,
                             atol=1e-5)
  # The feature maps kept for the visualisations are NHWC in both.
  _, kept_a = nhwc.apply(variables, x, mutable=['intermediates'])
  _, kept_b = chwn.apply(variables, x, mutable=['intermediates'])
  for a, b in zip(jax.tree_util.tree_leaves(kept_a), jax.tree_util.tree_leaves(kept_b)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize('impl', ['threefry2x32', 'rbg'])
@pytest.mark.parametrize('shape', [(7,), (32, 1600), (3, 5, 11)])
def test_threefry_bits_are_jax_random_bits(shape, impl):
  for seed in range(3):
    key = jax.random.key(seed, impl=impl)
    ours = jax.jit(models.threefry_bits, static_argnums=1)(key, shape)
    np.testing.assert_array_equal(ours, jax.random.bits(key, shape, jnp.uint32))


@pytest.mark.parametrize('rate', [0.1, 0.5, 0.9])
def test_dropout_masks_are_flax_dropouts(rate):
  x = jax.random.uniform(jax.random.key(1), (64, 300), minval=1.0, maxval=2.0)
  rngs = {'dropout': jax.random.key(2)}
  ours = models.Dropout(rate).apply({}, x, True, rngs=rngs)
  np.testing.assert_array_equal(ours, nn.Dropout(rate, deterministic=False).apply({}, x, rngs=rngs))
  assert abs(float(jnp.mean(ours == 0)) - rate) < 0.02
  kept = ours != 0
  np.testing.assert_allclose(ours[kept], x[kept] / (1 - rate), rtol=1e-6)
  assert models.Dropout(rate).apply({}, x, False) is x


@pytest.mark.parametrize('layout', models.LAYOUTS)
@pytest.mark.parametrize('impl', models.CONV_IMPLS)
def test_conv2d_out_size_is_the_leading_corner_of_the_full_output(impl, layout):
  x = jax.random.normal(jax.random.key(0), (3, 13, 12, 2))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 2, 4))
  if layout == 'CHWN':
    x = models.swap_batch_and_channels(x)
  for padding, stride, out_size in [('VALID', 1, (10, 8)), ('SAME', 2, (6, 5)),
                                    ('SAME', 1, (12, 12))]:
    full = models.conv2d(x, kernel, stride, padding, impl, layout)
    part = models.conv2d(x, kernel, stride, padding, impl, layout, out_size)
    np.testing.assert_allclose(part, full[:, :out_size[0], :out_size[1], :], rtol=1e-5,
                               atol=1e-5)


def reference_convnet(params, x, args):
  """The ConvNet (no norm, ReLU, hidden layers) from lax.conv and Flax's pooling, for
  JAX's own derivatives: every conv output computed, the pool dropping what it drops."""
  for i, features in enumerate(args['filters']):
    p = params[f'ConvBlock_{i}']
    x = jax.nn.relu(lax.conv_general_dilated(
        x, p['kernel'], (args['strides'][i],) * 2, args['paddings'][i],
        dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + p['bias'])
    pool = nn.max_pool if args['pools'][i] == 'max' else nn.avg_pool
    x = pool(x, (args['pool_sizes'][i],) * 2, (args['pool_strides'][i],) * 2, 'VALID')
  x = x.reshape(x.shape[0], -1)
  for j in range(len(args['hidden'])):
    x = jax.nn.relu(x @ params[f'Dense_{j}']['kernel'] + params[f'Dense_{j}']['bias'])
  last = params[f'Dense_{len(args["hidden"])}']
  return x @ last['kernel'] + last['bias']


@pytest.mark.parametrize('paddings,norms,pool_sizes,want', [
    # keras_convnet: block 2 pools 10 of its 11 conv rows, so reads 12 of block 1's 13.
    (('VALID', 'VALID'), ('none', 'none'), (2, 2), [(12, 12), None]),
    # 28 -> 26 -> 8 (reads 24), 8 -> 6 -> 2 (reads 6): block 1's 8 all read.
    (('VALID', 'VALID'), ('none', 'none'), (3, 3), [None, None]),
    # A 'SAME' block's outputs can be cut (after its padding): 28 -> 28 -> 9, 9 -> 7 -> 3.
    (('SAME', 'VALID'), ('none', 'none'), (3, 2), [(8, 8), None]),
    (('VALID', 'SAME'), ('none', 'none'), (2, 2), [None, None]),  # padding needs every row
    (('VALID', 'VALID'), ('none', 'batch'), (2, 2), [None, None]),  # statistics: every row
    (('VALID', 'VALID'), ('batch', 'none'), (2, 2), [None, None]),  # and of its own outputs
    # Three blocks: block 3 (5 -> 3 -> 1) reads 4 of block 2's 5 rows; block 2 pools 8
    # of its conv rows for those and so reads 10 of block 1's 13.
    (('VALID',) * 3, ('none',) * 3, (2, 2, 2), [(10, 10), (4, 4), None])])
def test_each_block_computes_only_the_outputs_the_next_block_reads(paddings, norms,
                                                                    pool_sizes, want):
  n = len(paddings)
  model = models.ConvNet(filters=(4,) * n, kernel_sizes=(3,) * n, strides=(1,) * n,
                         paddings=paddings, norms=norms, pools=('max',) * n,
                         pool_sizes=pool_sizes, pool_strides=pool_sizes, hidden=())
  assert model.bind({})._outputs_read((28, 28)) == want
  shown = model.bind({}, mutable=['intermediates'])  # feature maps are shown whole
  assert shown._outputs_read((28, 28)) == [None] * n

  # And each block's output is that size (the full feature map where want is None).
  block_outputs = []
  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if isinstance(context.module, models.ConvBlock) and context.method_name == '__call__':
      block_outputs.append(y.shape[1:3])
    return y
  with nn.intercept_methods(record):
    model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)))
  full = [shape[:2] for shape in models.feature_shapes(model, (28, 28, 1))]
  assert block_outputs == [w or f for w, f in zip(want, full)]


@pytest.mark.parametrize('out_size', [(14, 13), (0, 5)])
def test_a_block_asked_for_outputs_it_does_not_have_names_out_size(out_size):
  block = models.ConvBlock(features=4, padding='VALID', out_size=out_size)  # 28 -> 26 -> 13
  with pytest.raises(ValueError, match=r'out_size=\(%d, %d\) is not within its 13x13' % out_size):
    block.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


@pytest.mark.parametrize('layout', models.LAYOUTS)
@pytest.mark.parametrize('paddings,stride,pool,pool_size,pool_stride', [
    # keras_convnet: 26 -> 13, then 11 -> 5 (row 11 unread), so block 1 computes 12 rows
    (('VALID',) * 2, 1, 'max', 2, 2),
    (('SAME',) * 2, 1, 'max', 3, 3),    # 28 -> 9 (row 28 unread), 9 -> 3
    (('SAME',) * 2, 2, 'avg', 3, 2),    # overlapping windows: 14 -> 6 (row 14 unread)
    (('VALID',) * 2, 1, 'max', 3, 2),   # 26 -> 12, then 10 -> 4 reads 9: block 1 computes 11
    (('SAME', 'VALID'), 1, 'max', 3, 3)])  # 28 -> 9, then 7 -> 2 reads 6: block 1 computes 8
def test_convnet_computing_only_the_pooled_conv_outputs_matches_lax_conv(
    layout, paddings, stride, pool, pool_size, pool_stride):
  """Logits and every gradient against lax.conv + Flax pooling with JAX's derivatives
  (random images: no ties for the max pool to break differently)."""
  args = dict(filters=(4, 8), kernel_sizes=(3, 3), strides=(stride, 1),
              paddings=paddings, norms=('none',) * 2, pools=(pool,) * 2,
              pool_sizes=(pool_size,) * 2, pool_strides=(pool_stride,) * 2, hidden=(16,))
  model = models.ConvNet(**args, layout=layout)
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  params = model.init(jax.random.key(1), x)['params']
  params = jax.tree_util.tree_map(  # Non-zero biases too.
      lambda p: 0.3 * jax.random.normal(jax.random.key(2), p.shape), params)
  np.testing.assert_allclose(model.apply({'params': params}, x),
                             reference_convnet(params, x, args), rtol=1e-4, atol=1e-4)
  ours = jax.grad(lambda p: jnp.sum(jnp.sin(model.apply({'params': p}, x))))(params)
  want = jax.grad(lambda p: jnp.sum(jnp.sin(reference_convnet(p, x, args))))(params)
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
