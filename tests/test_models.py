"""The lesson's blocks against plain NumPy sliding windows, on every kernel backend."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from convnet import config_lib, models, shapes, train
from references import ALL_OPS, OPS_IDS, numpy_conv, numpy_pool


def block_apply(block, variables, x):
  """Applies a block to NHWC x in its backend's layout; returns NHWC."""
  return block.ops.to_nhwc(block.apply(variables, block.ops.to_blocks(x)))


@pytest.mark.parametrize('ops', ALL_OPS, ids=OPS_IDS)
@pytest.mark.parametrize('padding', shapes.PADDINGS)
@pytest.mark.parametrize('kernel_size,stride,filters', [(3, 1, 8), (4, 3, 2)])
def test_conv_block_matches_numpy_sliding_window(mnist, ops, padding, kernel_size, stride,
                                                 filters):
  x = np.concatenate([mnist.test.images[:2], mnist.test.images[2:4]], -1) / 255.0  # 2 channels
  block = models.ConvBlock(shapes.Block(filters=filters, kernel_size=kernel_size, stride=stride,
                                        padding=padding, pool='none'),
                           activation='identity', ops=ops)
  params = block.init(jax.random.key(0), ops.to_blocks(jnp.asarray(x, jnp.float32)))
  params = jax.tree_util.tree_map(
      lambda p: jax.random.normal(jax.random.key(1), p.shape), params)  # non-zero bias too
  got = jax.jit(lambda p, x: block_apply(block, p, x))(params, jnp.asarray(x, jnp.float32))
  want = numpy_conv(x, np.asarray(params['params']['kernel']),
                    np.asarray(params['params']['bias']), stride, padding)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('ops', ALL_OPS, ids=OPS_IDS)
@pytest.mark.parametrize('pool,reduce', [('max', np.max), ('avg', np.mean)])
def test_conv_block_pools_its_activated_conv_like_numpy(mnist, ops, pool, reduce):
  """relu(conv + bias), then 2x2 pooling: 28 -> 14, each output the window's max (mean)."""
  x = (mnist.test.images[:3] / 255.0).astype(np.float32)
  block = models.ConvBlock(shapes.Block(filters=4, kernel_size=3, pool=pool), ops=ops)
  variables = block.init(jax.random.key(0), ops.to_blocks(jnp.asarray(x)))
  got = block_apply(block, variables, jnp.asarray(x))
  p = variables['params']
  conv = np.maximum(numpy_conv(x, np.asarray(p['kernel']), np.asarray(p['bias']), 1, 'SAME'), 0)
  assert got.shape == (3, 14, 14, 4)
  np.testing.assert_allclose(got, numpy_pool(conv, reduce, 2, 2), rtol=1e-4, atol=1e-5)


def line_filters():
  vertical = np.array([[-1, 2, -1]] * 3, np.float32)  # bright column between dark ones
  return vertical, vertical.T


@pytest.mark.parametrize('ops', ALL_OPS[:2], ids=OPS_IDS[:2])
def test_vertical_line_filter_lights_up_vertical_strokes(mnist, ops):
  """The lesson's feature detector, on real digits '1' upright and turned on their side."""
  ones = (mnist.test.images[mnist.test.labels == 1][:100] / 255.0).astype(np.float32)
  vertical, horizontal = line_filters()
  kernel = np.stack([vertical, horizontal], -1)[:, :, None, :]  # HWIO, two filters
  block = models.ConvBlock(shapes.Block(filters=2, kernel_size=3, pool='max'), activation='relu',
                           ops=ops)
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
  model = train.build_model(config_lib.read(config).model)
  x = jnp.zeros((3, 28, 28, 1))
  params = model.init(jax.random.key(0), x)
  assert model.apply(params, x).shape == (3, 10)
  assert shapes.feature_shapes(model.blocks, (28, 28, 1)) == [(14, 14, 32)]
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
  model = train.build_model(config_lib.read(config).model)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  # 28 -5+1-> 24 -pool-> 12 -3+1-> 10 -pool-> 5; no conv bias before BatchNorm.
  assert shapes.feature_shapes(model.blocks, (28, 28, 1)) == [(12, 12, 16), (5, 5, 32)]
  want = (5 * 5 * 1 * 16 + 2 * 16) + (3 * 3 * 16 * 32 + 2 * 32) + (5 * 5 * 32 * 10 + 10)
  assert models.count_params(variables['params']) == want
  assert models.count_params(variables['batch_stats']) == 2 * (16 + 32)


@pytest.mark.parametrize('ops_', ALL_OPS, ids=OPS_IDS)
def test_group_norm_is_numpys_on_every_backend_and_layout(ops_):
  """norm='group' normalises each example's channel groups over their channels and every
  position, whatever axis the layout gives the batch (CHWN: the last), as NumPy and
  Flax's own nn.GroupNorm (NHWC) do."""
  x = np.random.default_rng(0).normal(2, 3, (5, 6, 7, 8)).astype(np.float32)  # NHWC
  norm = models.GroupNorm(groups=4, channel_axis=ops_.channel_axis)
  blocks = ops_.to_blocks(jnp.asarray(x))
  rng = np.random.default_rng(1)
  variables = {'params': {'scale': rng.normal(1, 0.5, 8).astype(np.float32),
                          'bias': rng.normal(0, 0.5, 8).astype(np.float32)}}
  assert jax.tree_util.tree_structure(norm.init(jax.random.key(0), blocks)) == (
      jax.tree_util.tree_structure(variables))
  got = ops_.to_nhwc(norm.apply(variables, blocks))
  groups = x.reshape(5, 6, 7, 4, 2)
  mean, var = groups.mean((1, 2, 4), keepdims=True), groups.var((1, 2, 4), keepdims=True)
  want = ((groups - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
  want = want * variables['params']['scale'] + variables['params']['bias']
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  flax_norm = nn.GroupNorm(num_groups=4, epsilon=1e-5)
  np.testing.assert_allclose(flax_norm.apply(variables, x), want, rtol=1e-4, atol=1e-4)


def test_group_norm_groups_must_divide_the_filters(smoke_config):
  smoke_config.model.update(norm=('group',), norm_groups=(5,))
  with pytest.raises(config_lib.ConfigError, match=r"model.norm_groups: block 0's 32 filters do "
                                                   r"not split into 5 groups"):
    config_lib.validate(smoke_config, 2)
