"""Derived shapes, the outputs-read planner, and a pooling type registered from outside."""

import dataclasses
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from convnet import config_lib, models, ops, shapes, train
from references import ALL_OPS, OPS_IDS


def blocks(paddings, norms=None, pool_sizes=None, pools=None, strides=None, filters=4):
  n = len(paddings)
  return tuple(shapes.Block(filters=filters, kernel_size=3, stride=(strides or (1,) * n)[i],
                            padding=paddings[i], norm=(norms or ('none',) * n)[i],
                            pool=(pools or ('max',) * n)[i],
                            pool_size=(pool_sizes or (2,) * n)[i],
                            pool_stride=(pool_sizes or (2,) * n)[i]) for i in range(n))


def block_output_shapes(model, x) -> list[tuple[int, int]]:
  """What each ConvBlock really returns (rows, cols), seen by Flax method interception."""
  seen = []

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if isinstance(context.module, models.ConvBlock) and context.method_name == '__call__':
      seen.append(tuple(model.ops.to_nhwc(y).shape[1:3]))
    return y

  with nn.intercept_methods(record):
    jax.eval_shape(model.init, jax.random.key(0), x)  # Traced, not run: shapes are enough.
  return seen


@pytest.mark.parametrize('paddings,norms,pool_sizes,want', [
    # keras_convnet: block 2 pools 10 of its 11 conv rows, so reads 12 of block 1's 13,
    # whose pool reads 24 of its 26 conv rows.
    (('VALID', 'VALID'), None, (2, 2), [(24, 24), (10, 10)]),
    # 28 -> 26 -> 8 (reads 24), 8 -> 6 -> 2 (reads 6): block 1's 8 all read.
    (('VALID', 'VALID'), None, (3, 3), [(24, 24), None]),
    # A 'SAME' block's outputs can be cut (after its padding): 28 -> 28 -> 9, 9 -> 7 -> 3.
    (('SAME', 'VALID'), None, (3, 2), [(24, 24), (6, 6)]),
    # Block 2's 'SAME' padding needs all of block 1's rows; its own 13 -> 6 reads 12.
    (('VALID', 'SAME'), None, (2, 2), [None, (12, 12)]),
    (('VALID', 'VALID'), ('none', 'batch'), (2, 2), [None, None]),  # statistics: every row
    (('VALID', 'VALID'), ('batch', 'none'), (2, 2), [None, (10, 10)]),  # of its own outputs
    # Three blocks: block 3 (5 -> 3 -> 1) reads 4 of block 2's 5 rows; block 2 pools 8
    # of its conv rows for those and so reads 10 of block 1's 13.
    (('VALID',) * 3, None, (2, 2, 2), [(20, 20), (8, 8), (2, 2)])])
def test_each_block_computes_only_the_conv_outputs_the_rest_reads(paddings, norms,
                                                                   pool_sizes, want):
  spec = blocks(paddings, norms, pool_sizes)
  assert shapes.conv_outputs_read(spec, (28, 28)) == want
  cpu = models.ConvNet(blocks=spec, hidden=(), ops=ops.Ops('cpu', 'CHWN'))
  assert cpu.ops.conv_outputs(spec, (28, 28)) == want
  assert ops.Ops('xla').conv_outputs(spec, (28, 28)) == [None] * len(spec)
  # Each block's output is what its computed conv outputs pool to; the last one whole.
  x = jnp.zeros((2, 28, 28, 1))
  full = [s[:2] for s in shapes.feature_shapes(spec, (28, 28, 1))]
  got = block_output_shapes(cpu, x)
  assert got[-1] == full[-1]
  for block, outputs, shape, whole in zip(spec, want, got, full):
    pooled = outputs and tuple(shapes.valid_windows(n, block.pool_size, block.pool_size)
                               for n in outputs)
    assert shape == (pooled or whole)


def reference_convnet(params, x, spec, hidden):
  """The ConvNet (no norm, ReLU, hidden layers) from lax.conv and Flax's pooling, for
  JAX's own derivatives: every conv output computed, the pool dropping what it drops."""
  for i, block in enumerate(spec):
    p = params[f'ConvBlock_{i}']
    x = jax.nn.relu(lax.conv_general_dilated(
        x, p['kernel'], (block.stride,) * 2, block.padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + p['bias'])
    x = shapes.POOLS[block.pool].apply(x, block.pool_size, block.pool_stride)
  x = x.reshape(x.shape[0], -1)
  for j in range(len(hidden)):
    x = jax.nn.relu(x @ params[f'Dense_{j}']['kernel'] + params[f'Dense_{j}']['bias'])
  last = params[f'Dense_{len(hidden)}']
  return x @ last['kernel'] + last['bias']


@pytest.mark.parametrize('layout', ['NHWC', 'CHWN'])
@pytest.mark.parametrize('paddings,stride,pool,pool_size,pool_stride', [
    (('VALID',) * 2, 1, 'max', 2, 2),   # keras_convnet
    (('SAME',) * 2, 1, 'max', 3, 3),    # 28 -> 9 (row 28 unread), 9 -> 3
    (('SAME',) * 2, 2, 'avg', 3, 2),    # overlapping windows: 14 -> 6 (row 14 unread)
    (('VALID',) * 2, 1, 'max', 3, 2),   # 26 -> 12, then 10 -> 4 reads 9: block 1 computes 11
    (('SAME', 'VALID'), 1, 'max', 3, 3)])
def test_convnet_computing_only_the_outputs_read_matches_lax_conv(
    layout, paddings, stride, pool, pool_size, pool_stride):
  """Logits and every gradient against lax.conv + Flax pooling with JAX's derivatives
  (random images: no ties for the max pool to break differently)."""
  spec = tuple(dataclasses.replace(b, pool=pool, pool_size=pool_size, pool_stride=pool_stride,
                                   stride=s) for b, s in zip(blocks(paddings), (stride, 1)))
  model = models.ConvNet(blocks=spec, hidden=(16,), ops=ops.Ops('cpu', layout))
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  params = model.init(jax.random.key(1), x)['params']
  params = jax.tree_util.tree_map(  # Non-zero biases too.
      lambda p: 0.3 * jax.random.normal(jax.random.key(2), p.shape), params)
  np.testing.assert_allclose(jax.jit(model.apply)({'params': params}, x),
                             reference_convnet(params, x, spec, (16,)), rtol=1e-4, atol=1e-4)
  ours = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(model.apply({'params': p}, x)))))(params)
  want = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(reference_convnet(p, x, spec, (16,))))))(
      params)
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


# Pools registered the way a user would, from outside the package.
def l2_pool(x, window, stride):
  """sqrt of the mean square over each window (L2 pooling, 'VALID' windows)."""
  return jnp.sqrt(nn.avg_pool(x * x, (window, window), (stride, stride), 'VALID') + 1e-12)


def same_max_pool(x, window, stride):
  """Max pooling with 'SAME' padding: a partial window at the edge is kept."""
  return nn.max_pool(x, (window, window), (stride, stride), 'SAME')


EXTRA_POOLS = {
    # L2 pooling reads its windows like max pooling, so it may say so and be cropped.
    'l2': shapes.Pool(apply=l2_pool, output_size=shapes.valid_windows,
                      reads=shapes.windows_extent),
    # A 'SAME' pool's padding depends on its whole input: no `reads`, never cropped.
    'same_max': shapes.Pool(apply=same_max_pool,
                            output_size=lambda size, window, stride: -(-size // stride)),
}


@pytest.fixture
def extra_pools():
  """EXTRA_POOLS registered; afterwards shapes.POOLS exactly as it was found."""
  found = dict(shapes.POOLS)
  try:
    for name, pool in EXTRA_POOLS.items():
      shapes.register_pool(name, pool)
    yield
  finally:
    shapes.POOLS.clear()
    shapes.POOLS.update(found)


@pytest.mark.parametrize('pool', ['l2', 'same_max'])
def test_a_pool_registered_from_outside_trains_with_the_shapes_the_planner_says(
    extra_pools, smoke_config, tmp_path, pool):
  smoke_config.model.update(num_blocks=2, filters=(8, 16), padding=('VALID',), pool=(pool,),
                            pool_size=(3,), pool_stride=(2,), hidden=(32,), dropout=0.0,
                            layout='CHWN')
  smoke_config.update(num_epochs=2, progress=False, learning_rate=3e-3)
  smoke_config.data.num_train = 4096
  model = train.build_model(config_lib.read(smoke_config).model)
  spec = model.blocks
  # 'l2': 28 -> 26 -> 12, 12 -> 10 -> 4, which reads 9 conv rows of 10, so 11 of block 1's
  # 12, whose pool reads (11 - 1) * 2 + 3 = 23 of its 26 conv rows. 'same_max': 26 -> 13,
  # 11 -> 6, no cut.
  want_plan = {'l2': [(23, 23), (9, 9)], 'same_max': [None, None]}[pool]
  assert shapes.conv_outputs_read(spec, (28, 28)) == want_plan
  full = [s[:2] for s in shapes.feature_shapes(spec, (28, 28, 1))]
  assert full == {'l2': [(12, 12), (4, 4)], 'same_max': [(13, 13), (6, 6)]}[pool]
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  got = block_output_shapes(model, x)
  assert got[-1] == full[-1] and (pool == 'l2' or got == full)
  # The same function as the library ops computing every output.
  variables = model.init(jax.random.key(1), x)
  np.testing.assert_allclose(model.apply(variables, x),
                             model.clone(ops=ops.Ops('xla')).apply(variables, x),
                             rtol=1e-4, atol=1e-4)
  if pool == 'l2':  # And it trains, through the whole CLI path's function.
    results = train.train_and_evaluate(smoke_config, str(tmp_path / pool))
    assert results['test_accuracy'] > 0.6  # 64 steps of a small net: it learns.


def test_a_taken_pool_name_is_refused_unless_replaced(extra_pools):
  with pytest.raises(ValueError, match=r"pool 'max' is already registered; "
                                       r"register_pool\(..., replace=True\) replaces it"):
    shapes.register_pool('max', EXTRA_POOLS['l2'])
  assert shapes.POOLS['max'].apply is shapes.max_pool
  shapes.register_pool('l2', EXTRA_POOLS['same_max'], replace=True)
  assert shapes.POOLS['l2'] is EXTRA_POOLS['same_max']


def test_a_pool_without_an_output_size_rule_is_refused_naming_it(smoke_config):
  with pytest.raises(ValueError, match=r"pool 'lp' has no output_size rule"):
    shapes.register_pool('lp', shapes.Pool(apply=l2_pool))
  assert 'lp' not in shapes.POOLS
  smoke_config.model.pool = ('lp',)
  with pytest.raises(config_lib.ConfigError, match=r"model.pool must be one of \("):
    config_lib.validate(smoke_config, 2)


@pytest.mark.parametrize('ops_', ALL_OPS, ids=OPS_IDS)
def test_pools_registered_from_outside_run_on_every_backend(extra_pools, ops_):
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  for name in EXTRA_POOLS:
    block = shapes.Block(filters=3, pool=name, pool_size=3, pool_stride=2)
    got = ops_.to_nhwc(ops_.pool2d(ops_.to_blocks(x), block))
    np.testing.assert_allclose(got, EXTRA_POOLS[name].apply(x, 3, 2), rtol=1e-6)
