"""The CPU kernels (convnet/cpu) against NumPy and against the library ops they replace."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from configs import keras_convnet
from convnet import models, ops, shapes, train
from convnet.cpu import conv, dropout, layout, phases, winograd
from references import numpy_conv, numpy_conv_gradients, numpy_pool


@pytest.mark.parametrize('noise', [0.0, 1e-3])
@pytest.mark.parametrize('window', [2, 3])
def test_max_pool_gradient_goes_to_each_window_first_maximum(mnist, window, noise):
  """Real digits: without noise the blank background ties in every window, and the
  gradient goes to the first maximum in row-major order (np.argmax's), as in TF."""
  noise = np.random.default_rng(0).normal(0, noise, (2, 27, 28, 1))
  x = (mnist.test.images[:2, :27] / 255.0 + noise).astype(np.float32)
  pooled_shape = numpy_pool(x, np.max, window, window).shape
  dy = np.random.default_rng(1).normal(size=pooled_shape).astype(np.float32)
  cpu, block = ops.Ops('cpu'), shapes.Block(filters=1, pool_size=window, pool_stride=window)
  dx = jax.grad(lambda x: jnp.sum(cpu.pool2d(x, block) * dy))(jnp.asarray(x))
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
  np.testing.assert_array_equal(phases.max_over_phases(y), [3.0, 3.0, 2.0])
  grad = jax.grad(lambda y: jnp.sum(phases.max_over_phases(y) * dm))(y)
  np.testing.assert_array_equal(grad, [[0, 20, 30], [10, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize('layout_name', layout.LAYOUTS)
@pytest.mark.parametrize('kernel_size,window,size,channels', [
    (3, 2, 28, 1), (3, 2, 27, 1), (5, 2, 28, 1), (3, 3, 28, 1), (2, 2, 13, 2)])
def test_conv_max_pool_by_phase_matches_numpy_windows(mnist, layout_name, kernel_size, window,
                                                      size, channels):
  """Values against NumPy's sliding windows (odd sizes: the pool drops the last row);
  gradients against lax.conv + Flax's max pool with JAX's derivatives."""
  noise = np.random.default_rng(0).normal(0, 1e-3, (3, size, size, channels))
  x = np.concatenate([mnist.test.images[i:i + 3, :size, :size] for i in range(channels)], -1)
  x = (x / 255.0 + noise).astype(np.float32)  # no pool window with two equal maxima
  kernel = np.random.default_rng(1).normal(size=(kernel_size, kernel_size, channels, 4))
  kernel = kernel.astype(np.float32)
  want = numpy_pool(numpy_conv(x, kernel, 0.0, 1, 'VALID'), np.max, window, window)
  to_layout = (lambda a: a) if layout_name == 'NHWC' else layout.swap_batch_and_channels

  def ours(x, kernel):
    return to_layout(phases.conv_max_pool(to_layout(x), kernel, window=window,
                                          layout=layout_name))

  def reference(x, kernel):
    y = lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return nn.max_pool(y, (window, window), (window, window), 'VALID')

  np.testing.assert_allclose(jax.jit(ours)(x, kernel), want, rtol=1e-5, atol=1e-5)
  dy = np.random.default_rng(2).normal(size=want.shape).astype(np.float32)
  grad = lambda f: jax.jit(jax.grad(lambda x, k: jnp.sum(f(x, k) * dy), argnums=(0, 1)))
  got, expected = grad(ours)(x, kernel), grad(reference)(x, kernel)
  for a, b in zip(got, expected):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def assert_block_computes_as_on_the_library_ops(layout_name, changes, x):
  """A block's output and gradients on the CPU kernels (in `layout_name`) are those of the
  same block on the library ops; `changes` to a VALID 3x3 relu block with 2x2 max pooling."""
  settings = {**dict(filters=4, kernel_size=3, padding='VALID', pool='max', pool_size=2,
                     pool_stride=2, activation='relu'), **changes}
  activation = settings.pop('activation')
  library_block = models.ConvBlock(shapes.Block(**settings), activation=activation)
  block = library_block.clone(ops=ops.Ops('cpu', layout_name))
  variables = library_block.init(jax.random.key(0), x)
  variables = jax.tree_util.tree_map(  # Non-zero biases too, some negative.
      lambda p: 0.3 * jax.random.normal(jax.random.key(1), p.shape), variables)

  def loss(block, variables):
    return jnp.sum(jnp.sin(block.ops.to_nhwc(block.apply(variables, block.ops.to_blocks(x)))))

  got = jax.jit(jax.value_and_grad(lambda v: loss(block, v)))(variables)
  want = jax.jit(jax.value_and_grad(lambda v: loss(library_block, v)))(variables)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('layout_name,changes,by_phase', [
    ('CHWN', {}, True), ('CHWN', {'padding': 'SAME', 'activation': 'leaky_relu'}, True),
    ('NHWC', {}, False), ('CHWN', {'norm': 'layer'}, False), ('CHWN', {'stride': 2}, False),
    ('CHWN', {'pool_stride': 1}, False), ('CHWN', {'activation': 'gelu'}, False)])
def test_a_one_channel_block_pools_by_phase_only_where_that_is_exact(
    mnist, monkeypatch, layout_name, changes, by_phase):
  """Where ConvBlock takes the phase matmul, and that its output and gradients are those
  of the same block on the library ops. Real digits: the pool windows on their blank
  background tie, and both send the gradient to the first maximum."""
  calls = []
  real = phases.conv_max_pool
  monkeypatch.setattr(phases, 'conv_max_pool',
                      lambda *args, **kwargs: calls.append(args) or real(*args, **kwargs))
  x = jnp.asarray(mnist.test.images[:4, :27] / 255.0, jnp.float32)
  assert_block_computes_as_on_the_library_ops(layout_name, changes, x)
  assert len(calls) == (1 if by_phase else 0)


@pytest.mark.parametrize('layout_name,changes,pools_first', [
    ('NHWC', {}, True), ('NHWC', {'padding': 'SAME', 'activation': 'leaky_relu'}, True),
    ('NHWC', {'pool_stride': 1}, True), ('CHWN', {}, False), ('NHWC', {'norm': 'layer'}, False),
    ('NHWC', {'activation': 'gelu'}, False), ('NHWC', {'pool': 'avg'}, False)])
def test_a_block_max_pools_before_its_bias_and_activation_only_where_that_is_exact(
    mnist, monkeypatch, layout_name, changes, pools_first):
  """Where ConvBlock pools the raw conv outputs (its bias then sees the pooled shape), and
  that its output and gradients are those of the same block on the library ops, which
  pool last. Real digits, two channels: blank windows tie, and both send the gradient to
  the first maximum."""
  seen = []
  real = models.ConvBlock._normalize
  monkeypatch.setattr(models.ConvBlock, '_normalize',
                      lambda self, y, train: seen.append(y.shape) or real(self, y, train))
  x = jnp.asarray(np.concatenate([mnist.test.images[:4], mnist.test.images[4:8]], -1) / 255.0,
                  jnp.float32)
  assert_block_computes_as_on_the_library_ops(layout_name, changes, x)
  conv_rows = 28 if changes.get('padding') == 'SAME' else 26
  # Calls: the library block's init, the CPU block's trace (pooled or not), the library's.
  assert [rows < conv_rows for _, rows, *_ in seen] == [False, pools_first, False]


@pytest.mark.parametrize('norm,pool_name,pool_size,pool_stride,padding', [
    ('none', 'max', 2, 2, 'VALID'), ('batch', 'max', 3, 2, 'SAME'), ('layer', 'avg', 2, 2, 'SAME'),
    ('none', 'avg', 3, 1, 'VALID'), ('group', 'max', 2, 2, 'SAME')])
def test_chwn_layout_gives_the_nhwc_model_outputs_and_gradients(
    mnist, norm, pool_name, pool_size, pool_stride, padding):
  """Same parameters, same logits, same gradients (BatchNorm statistics too) in both layouts."""
  blocks = tuple(shapes.Block(filters=f, kernel_size=3, stride=s, padding=padding, norm=norm,
                              norm_groups=2, pool=pool_name, pool_size=pool_size,
                              pool_stride=pool_stride) for f, s in ((4, 1), (8, 2)))
  nhwc = models.ConvNet(blocks=blocks, hidden=(16,), ops=ops.Ops('cpu', 'NHWC'))
  chwn = nhwc.clone(ops=ops.Ops('cpu', 'CHWN'))
  x = jnp.asarray(mnist.test.images[:8] / 255.0, jnp.float32)
  labels = jnp.asarray(mnist.test.labels[:8])
  variables = nhwc.init(jax.random.key(0), x)
  assert (jax.tree_util.tree_structure(variables) ==
          jax.tree_util.tree_structure(chwn.init(jax.random.key(0), x)))

  def loss(model, params):
    logits, updates = model.apply({**variables, 'params': params}, x, train=True,
                                  mutable=['batch_stats'])
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(8), labels]), updates

  (loss_a, stats_a), grads_a = jax.jit(jax.value_and_grad(lambda p: loss(nhwc, p),
                                                         has_aux=True))(variables['params'])
  (loss_b, stats_b), grads_b = jax.jit(jax.value_and_grad(lambda p: loss(chwn, p),
                                                         has_aux=True))(variables['params'])
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves((grads_a, stats_a)),
                  jax.tree_util.tree_leaves((grads_b, stats_b))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('impl', ['threefry2x32', 'rbg'])
@pytest.mark.parametrize('shape', [(7,), (32, 1600), (3, 5, 11)])
def test_threefry_bits_are_jax_random_bits(shape, impl):
  for seed in range(3):
    key = jax.random.key(seed, impl=impl)
    ours = jax.jit(dropout.threefry_bits, static_argnums=1)(key, shape)
    np.testing.assert_array_equal(ours, jax.random.bits(key, shape, jnp.uint32))


@pytest.mark.parametrize('rate', [0.1, 0.5, 0.9])
def test_dropout_masks_are_flax_dropouts(rate):
  x = jax.random.uniform(jax.random.key(1), (64, 300), minval=1.0, maxval=2.0)
  rngs = {'dropout': jax.random.key(2)}
  ours = dropout.Dropout(rate).apply({}, x, rngs=rngs)
  np.testing.assert_array_equal(ours, nn.Dropout(rate, deterministic=False).apply({}, x, rngs=rngs))
  assert abs(float(jnp.mean(ours == 0)) - rate) < 0.02
  kept = ours != 0
  np.testing.assert_allclose(ours[kept], x[kept] / (1 - rate), rtol=1e-6)
  assert dropout.Dropout(rate, deterministic=True).apply({}, x) is x


@pytest.mark.parametrize('bits', [dropout.threefry_bits, dropout.random_bits])
def test_a_traced_dropout_rate_drops_as_that_rate_does(bits):
  """A vmapped sweep group's members each drop their own rate (traced): the same masks and
  scale as the rate given as a number, for either backend's bits; a rate of 0 keeps all."""
  x = jax.random.uniform(jax.random.key(1), (64, 300), minval=1.0, maxval=2.0)
  rngs = {'dropout': jax.random.key(2)}
  rates = jnp.array([0.0, 0.25, 0.5], jnp.float32)
  traced = jax.jit(jax.vmap(lambda rate: dropout.Dropout(rate, bits=bits).apply(
      {}, x, rngs=rngs)))(rates)
  np.testing.assert_array_equal(traced[0], x)
  for rate, ours in zip([0.25, 0.5], traced[1:]):
    np.testing.assert_allclose(
        ours, nn.Dropout(rate, deterministic=False).apply({}, x, rngs=rngs), rtol=1e-6)
    assert abs(float(jnp.mean(ours == 0)) - rate) < 0.02


@pytest.mark.parametrize('layout_name', layout.LAYOUTS)
def test_conv2d_out_size_is_the_leading_corner_of_the_full_output(layout_name):
  x = jax.random.normal(jax.random.key(0), (3, 13, 12, 2))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 2, 4))
  if layout_name == 'CHWN':
    x = layout.swap_batch_and_channels(x)
  for padding, stride, out_size in [('VALID', 1, (10, 8)), ('SAME', 2, (6, 5)),
                                    ('SAME', 1, (12, 12))]:
    block = shapes.Block(filters=4, stride=stride, padding=padding)
    convolve = jax.jit(conv.conv2d, static_argnames=('block', 'layout', 'out_size'))
    full = convolve(x, kernel, block=block, layout=layout_name)
    part = convolve(x, kernel, block=block, layout=layout_name, out_size=out_size)
    np.testing.assert_allclose(part, full[:, :out_size[0], :out_size[1], :], rtol=1e-5,
                               atol=1e-5)


def digits_as_channels(mnist, channels: int, size: int) -> np.ndarray:
  """[2, size, size, channels]: 2 * channels real test digits, each one channel."""
  x = mnist.test.images[:2 * channels, :size, :size, 0] / 255.0
  return x.reshape(2, channels, size, size).transpose(0, 2, 3, 1).astype(np.float32)


def kernels_called(monkeypatch) -> list:
  """The names of the conv kernels conv.conv2d calls from now on, in order (not every
  jax this project supports names a custom_vjp's function in a jaxpr)."""
  calls = []

  def spy(real, name):
    def called(*args):
      calls.append(name)
      return real(*args)
    return called

  for module, name in ((conv, 'conv_valid_im2col'), (winograd, 'conv_valid_winograd')):
    monkeypatch.setattr(module, name, spy(getattr(module, name), name))
  return calls


@pytest.mark.parametrize('padding,size,out_size,kernel_rows', [
    ('VALID', 12, None, 3), ('SAME', 14, None, 3), ('VALID', 13, (10, 10), 3),
    ('VALID', 12, None, 5), ('VALID', 12, None, 1)])
def test_winograd_conv_values_and_gradients_match_numpy_windows(mnist, monkeypatch, padding,
                                                                size, out_size, kernel_rows):
  """A CHWN conv of 3-wide kernels over 32 channels into an even number of columns runs
  Winograd's F(2, 3): values and both gradients against NumPy's sliding windows, on 64
  real digits as 2 images of 32 channels."""
  x = digits_as_channels(mnist, 32, size)
  kernel = 0.1 * np.random.default_rng(0).normal(size=(kernel_rows, 3, 32, 5))
  kernel = kernel.astype(np.float32)
  if kernel_rows == 3:
    block = shapes.Block(filters=5, padding=padding)
    chwn = lambda x, k: conv.conv2d(x, k, block, layout='CHWN', out_size=out_size)
  else:
    chwn = winograd.conv_valid_winograd
  ours = lambda x, k: layout.swap_batch_and_channels(chwn(layout.swap_batch_and_channels(x), k))
  if kernel_rows == 3:  # Through conv2d's rule.
    calls = kernels_called(monkeypatch)
    jax.make_jaxpr(ours)(x, kernel)
    assert calls == ['conv_valid_winograd']
  want = numpy_conv(x, kernel, 0.0, 1, padding)
  rows, cols = out_size or want.shape[1:3]
  np.testing.assert_allclose(jax.jit(ours)(x, kernel), want[:, :rows, :cols], rtol=1e-4,
                             atol=1e-4)
  dy = np.zeros_like(want)
  dy[:, :rows, :cols] = np.random.default_rng(1).normal(size=(2, rows, cols, 5))
  dx, dkernel = jax.jit(jax.grad(lambda x, k: jnp.sum(ours(x, k) * dy[:, :rows, :cols]),
                                 argnums=(0, 1)))(x, kernel)
  want_dx, want_dkernel = numpy_conv_gradients(x, kernel, 1, padding, dy)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dkernel, want_dkernel, rtol=1e-4, atol=1e-3)


def test_winograd_conv_vmapped_over_seeds_is_each_seeds_own(mnist):
  """Seeds train vmapped (num_seeds): each seed's values and gradients are those of the
  conv run alone on that seed's kernel."""
  x = layout.swap_batch_and_channels(digits_as_channels(mnist, 32, 12))
  kernels = 0.1 * jax.random.normal(jax.random.key(0), (2, 3, 3, 32, 4))
  dy = jax.random.normal(jax.random.key(1), (2, 4, 10, 10, 2))
  loss = lambda x, k, dy: jnp.sum(winograd.conv_valid_winograd(x, k) * dy)
  both = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1)), in_axes=(None, 0, 0)))
  values, (dx, dkernel) = both(x, kernels, dy)
  for seed in range(2):
    value, (want_dx, want_dkernel) = jax.value_and_grad(loss, argnums=(0, 1))(
        x, kernels[seed], dy[seed])
    np.testing.assert_allclose(values[seed], value, rtol=1e-5)
    np.testing.assert_allclose(dx[seed], want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dkernel[seed], want_dkernel, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('channels,size,conv_layout,stride', [
    (16, 12, 'CHWN', 1), (32, 13, 'CHWN', 1), (32, 12, 'NHWC', 1), (32, 12, 'CHWN', 2)])
def test_other_convs_stay_im2col(monkeypatch, channels, size, conv_layout, stride):
  """Fewer than winograd.MIN_CHANNELS channels, an odd number of output columns, NHWC,
  or a stride: each alone keeps im2col (32 images, so that NHWC's leading axis is as
  wide as CHWN's channels)."""
  x = jnp.zeros((channels, size, size, 32) if conv_layout == 'CHWN'
                else (32, size, size, channels))
  kernel = jnp.ones((3, 3, channels, 2))
  block = shapes.Block(filters=2, padding='VALID', stride=stride)
  calls = kernels_called(monkeypatch)
  jax.make_jaxpr(lambda x: conv.conv2d(x, kernel, block, layout=conv_layout))(x)
  assert calls == ['conv_valid_im2col']


def test_flop_count_is_a_direct_convolutions_where_winograd_runs():
  """keras_convnet's second conv runs F(2, 3) on the CPU kernels; the reported FLOPs
  (benchmark, results, sweep reports) stay the model's: the multiply-adds of the outputs
  computed (conv1 24x24 of 26x26 through its phases, conv2 10x10 of 11x11), 2 FLOPs
  each, times 2 for conv1 (no input gradient) and 3 for conv2 and the dense layer."""
  spec = train.validate(keras_convnet.get_config())
  assert ops.make(spec.model.ops, spec.model.layout).backend == 'cpu'
  state = train.first_seed(train.init_run(spec, (28, 28, 1), 1, axis_name=None).state)
  flops = train.training_flops_per_image(spec.model, state, (28, 28, 1))
  matmuls = 2 * (2 * 24 * 24 * 9 * 32 + 3 * 10 * 10 * 288 * 64 + 3 * 1600 * 10)
  assert matmuls < flops < 1.1 * matmuls  # F(2, 3)'s own count would be about 0.7x.


@pytest.mark.parametrize('out_size', [(27, 5), (0, 5)])
def test_conv2d_asked_for_outputs_it_does_not_have_names_out_size(out_size):
  x = jnp.zeros((1, 28, 28, 1))  # 3x3 'VALID': 26x26 outputs
  with pytest.raises(ValueError, match=r'out_size=\(%d, 5\) is not within its 26x26' % out_size[0]):
    conv.conv2d(x, jnp.zeros((3, 3, 1, 2)), shapes.Block(filters=2, padding='VALID'),
                out_size=out_size)
