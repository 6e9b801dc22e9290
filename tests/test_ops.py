"""The kernel seam: which backend 'auto' picks, and every backend against the library ops."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from configs import best, cifar10, default, fashion_mnist, keras_convnet
from convnet import config_lib, models, ops, parallel, shapes, train, workdir
from references import ALL_OPS, OPS_IDS, numpy_conv, numpy_conv_gradients, numpy_pool


def jaxprs(config) -> tuple[str, str]:
  """The jaxprs of one training step and of one forward pass of config's model, as the
  trainer builds it, as text. (A step's jaxpr has the custom VJPs' rules inlined.)"""
  config = config_lib.read(config)
  model = train.build_model(config.model)
  state = train.create_train_state(jax.random.key(0), config, model, (28, 28, 1),
                                   lambda step: 1e-3)
  batch = {'image': jnp.zeros((1, 8, 28, 28, 1)), 'label': jnp.zeros((1, 8), jnp.int32)}
  step = jax.vmap(functools.partial(train.train_step, micro_batch_size=0),
                  in_axes=(None, 0, None), axis_name=parallel.AXIS)
  forward = functools.partial(model.apply, train=True, rngs={'dropout': jax.random.key(2)})
  return (str(jax.make_jaxpr(step)(state, batch, jax.random.key(1))),
          str(jax.make_jaxpr(forward)({'params': state.params}, batch['image'][0])))


@pytest.mark.parametrize('platform,backend', [('gpu', 'xla'), ('tpu', 'xla'), ('cpu', 'cpu')])
def test_auto_picks_the_library_ops_on_accelerators_and_the_cpu_kernels_on_cpu(
    monkeypatch, platform, backend):
  monkeypatch.setattr(jax, 'default_backend', lambda: platform)
  config = keras_convnet.get_config()
  assert config.model.ops == 'auto'
  assert train.build_model(config_lib.read(config).model).ops.backend == backend
  step, forward = jaxprs(config)
  if backend == 'xla':  # lax.conv forward and backward, nn.Dropout's random bits.
    assert 'conv_general_dilated' in forward and 'random_bits' in step
    assert step.count('conv_general_dilated') >= 3 * forward.count('conv_general_dilated')
  else:  # im2col matmuls with hand-written backward passes, the hash written out.
    assert 'conv_general_dilated' not in step and 'random_bits' not in step
    assert 'custom_vjp_call' in forward


@pytest.mark.parametrize('platform,ops_name,dtype', [('gpu', 'auto', 'bfloat16'),
                                                     ('tpu', 'xla', 'bfloat16'),
                                                     ('cpu', 'xla', 'float32'),
                                                     ('cpu', 'auto', 'float32')])
def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu(monkeypatch, platform,
                                                                   ops_name, dtype):
  monkeypatch.setattr(jax, 'default_backend', lambda: platform)
  assert ops.make(ops_name, dtype='auto').dtype == dtype


def test_bfloat16_reaches_xla_as_bfloat16_convolutions_with_float32_state(smoke_config, mnist):
  """The training chunk as XLA receives it: every convolution and matmul (forward and
  backward) in bfloat16; parameters, optimizer state, BatchNorm statistics and the
  loss in float32 after a step. (XLA's CPU compiler then computes bfloat16 convolutions in
  float32; a GPU or TPU keeps them, which the device check asserts there.)"""
  config = smoke_config
  config.model.ops, config.model.dtype, config.model.norm = 'xla', 'bfloat16', ('batch',)
  config.model.num_blocks, config.model.filters = 2, (4, 8)
  spec = config_lib.validate(config, 1)
  devices = jax.local_devices()[:1]
  _, _, state, data_keys, dropout_keys = train.init_run(spec, (28, 28, 1), 4)
  chunk = train.parallel_train_chunk(2, 4, 32, mnist.mean, mnist.std, devices)
  args = (state, *(parallel.replicate(x[:128], devices) for x in mnist.train),
          train.epoch_permutations(data_keys, 0, 128), dropout_keys, {})
  lowered = chunk.lower(*args)
  program = lowered.as_text().splitlines()
  convolutions = [line for line in program if 'stablehlo.convolution' in line]
  # 2 forward, 2 kernel gradients, the second block's input gradient (and, with jax 0.6,
  # the first block's, which nothing reads: XLA drops it).
  assert len(convolutions) in (5, 6)
  matmuls = [line for line in program if 'stablehlo.dot_general' in line]
  assert len(matmuls) == 6  # The two dense layers, forward and backward.
  assert all(line.rstrip().endswith('xbf16>') for line in convolutions + matmuls)
  compiled = lowered.compile()
  if jax.default_backend() != 'cpu':
    outputs = [line.split(' convolution(')[0].split('=')[-1].strip()
               for line in compiled.as_text().splitlines() if ' convolution(' in line]
    assert outputs and all(out.startswith('bf16[') for out in outputs), outputs
  state, metrics = compiled(*args)
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(
      (state.params, state.opt_state, state.batch_stats, metrics['loss']))
            if jnp.issubdtype(x.dtype, jnp.floating)}  # Not Adam's step count.
  assert dtypes == {jnp.dtype('float32')}
  assert np.all(np.isfinite(metrics['loss']))


def test_bfloat16_on_the_cpu_kernels_is_a_config_error_saying_what_to_do(smoke_config):
  smoke_config.model.dtype = 'bfloat16'  # model.ops='auto': the CPU kernels here.
  with pytest.raises(config_lib.ConfigError, match=r"model.dtype='bfloat16' computes on the "
                                                   r"library ops.*set model.ops='xla'"):
    config_lib.validate(smoke_config, 2)
  smoke_config.model.ops = 'xla'
  config_lib.validate(smoke_config, 2)


def test_an_unknown_backend_is_a_config_error_naming_the_key(smoke_config):
  smoke_config.model.ops = 'gpu'
  with pytest.raises(config_lib.ConfigError, match=r"model.ops must be one of \('auto', "):
    config_lib.validate(smoke_config, 2)


@pytest.mark.parametrize('ops_', ALL_OPS, ids=OPS_IDS)
@pytest.mark.parametrize('padding', shapes.PADDINGS)
@pytest.mark.parametrize('kernel_size,stride,dilation', [(3, 1, 1), (5, 2, 1), (4, 3, 1),
                                                       (2, 2, 1), (3, 1, 2), (3, 2, 3)])
def test_conv_values_and_gradients_match_numpy_windows(mnist, ops_, padding, kernel_size,
                                                       stride, dilation):
  """Each backend's convolution (the CPU kernels' hand-written backward pass, the library
  conv's) against the windows' sums, on real digits stacked as a 3-channel (colour)
  image; dilated kernels too (the CPU kernels run those on the library conv)."""
  x = (np.concatenate([mnist.test.images[:2], mnist.test.images[2:4], mnist.test.images[4:6]],
                      -1) / 255.0)[:, :13]
  kernel = np.asarray(jax.random.normal(jax.random.key(0), (kernel_size, kernel_size, 3, 3)))
  block = shapes.Block(filters=3, kernel_size=kernel_size, stride=stride, dilation=dilation,
                       padding=padding)
  conv = lambda x, k: ops_.to_nhwc(ops_.conv2d(ops_.to_blocks(x), k, block))
  y = jax.jit(conv)(jnp.asarray(x, jnp.float32), jnp.asarray(kernel))
  np.testing.assert_allclose(y, numpy_conv(x, kernel, 0, stride, padding, dilation), rtol=1e-4,
                             atol=1e-4)
  dy = np.asarray(jax.random.normal(jax.random.key(1), y.shape))
  dx, dkernel = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) * dy), argnums=(0, 1)))(
      jnp.asarray(x, jnp.float32), jnp.asarray(kernel))
  want_dx, want_dkernel = numpy_conv_gradients(x, kernel, stride, padding, dy, dilation)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dkernel, want_dkernel, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('padding,kernel_size,stride,dilation', [
    ('SAME', 3, 1, 1), ('VALID', 5, 2, 1), ('SAME', 4, 3, 1), ('VALID', 3, 2, 2)])
def test_library_conv_gradients_vmapped_over_seeds_match_numpy_per_seed(mnist, padding,
                                                                        kernel_size, stride,
                                                                        dilation):
  """vmap(grad) of the library conv in a shard_map, as the trainer runs it (vmapped over
  seeds, parallel='jit'): jax 0.7.2 (Colab's) refuses that for lax.conv's own derivative
  (NotImplementedError); each seed's gradients must be that seed's NumPy ones."""
  x = mnist.test.images[:4, :15, :13].reshape(2, 2, 15, 13, 1) / 255.0  # [seeds, batch, ...]
  kernels = np.asarray(jax.random.normal(jax.random.key(0), (2, kernel_size, kernel_size, 1, 2)))
  xla = ops.Ops('xla')
  block = shapes.Block(filters=2, kernel_size=kernel_size, stride=stride, dilation=dilation,
                       padding=padding)
  conv = lambda x, k: xla.conv2d(x, k, block)
  dy = np.asarray(jax.random.normal(jax.random.key(1), (2, *jax.eval_shape(
      conv, x[0], kernels[0]).shape)))
  grads = parallel.parallelize(
      jax.vmap(jax.grad(lambda x, k, dy: jnp.sum(conv(x, k) * dy), argnums=(0, 1))),
      jax.local_devices()[:1], in_axes=(0, 0, 0), how='jit')
  dx, dkernel = grads(*(jnp.asarray(a[None], jnp.float32) for a in (x, kernels, dy)))
  for seed in range(2):
    want_dx, want_dkernel = numpy_conv_gradients(x[seed], kernels[seed], stride, padding,
                                                 dy[seed], dilation)
    np.testing.assert_allclose(dx[seed], want_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dkernel[seed], want_dkernel, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('ops_', ALL_OPS, ids=OPS_IDS)
@pytest.mark.parametrize('kind,reduce,init,op', [('max', np.max, -np.inf, lax.max),
                                                 ('avg', np.mean, 0.0, lax.add)])
@pytest.mark.parametrize('window,stride', [(2, 2), (3, 3), (3, 2), (2, 1)])
def test_pooling_values_and_gradients_match_lax_reduce_window(mnist, ops_, kind, reduce, init,
                                                              op, window, stride):
  """Values against NumPy windows; gradients against JAX's derivative of lax.reduce_window
  (digits plus noise: no window with two equal maxima, where the two may pick differently)."""
  noise = np.random.default_rng(0).normal(0, 1e-3, (3, 27, 28, 2))
  x = (np.concatenate([mnist.test.images[:3, :27]] * 2, -1) / 255.0 + noise).astype(np.float32)

  def reference(x):
    y = lax.reduce_window(x, init, op, (1, window, window, 1), (1, stride, stride, 1), 'VALID')
    return y / window**2 if kind == 'avg' else y

  block = shapes.Block(filters=2, pool=kind, pool_size=window, pool_stride=stride)
  pool = lambda x: ops_.to_nhwc(ops_.pool2d(ops_.to_blocks(x), block))
  np.testing.assert_allclose(pool(x), numpy_pool(x, reduce, window, stride), rtol=1e-5,
                             atol=1e-6)
  dy = np.random.default_rng(1).normal(size=reference(x).shape).astype(np.float32)
  got = jax.grad(lambda x: jnp.sum(pool(x) * dy))(x)
  want = jax.grad(lambda x: jnp.sum(reference(x) * dy))(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('window', [2, 3])
def test_tiling_max_pool_is_a_reshape_whose_gradient_needs_no_scatter(mnist, window):
  """The library ops' max pool with window == stride against nn.max_pool, values and
  gradients (digits plus noise: no ties), on 27x28 maps that leave a partial window."""
  noise = np.random.default_rng(0).normal(0, 1e-3, (3, 27, 28, 2))
  x = (np.concatenate([mnist.test.images[:3, :27]] * 2, -1) / 255.0 + noise).astype(np.float32)
  pool = lambda x: ops.Ops('xla').pool2d(x, shapes.Block(filters=2, pool_size=window,
                                                         pool_stride=window))
  reference = lambda x: nn.max_pool(x, (window, window), (window, window), 'VALID')
  np.testing.assert_array_equal(pool(x), reference(x))
  dy = np.random.default_rng(1).normal(size=reference(x).shape).astype(np.float32)
  gradient = jax.grad(lambda x: jnp.sum(pool(x) * dy))
  np.testing.assert_array_equal(gradient(x), jax.grad(lambda x: jnp.sum(reference(x) * dy))(x))
  backward = str(jax.make_jaxpr(gradient)(x))
  assert 'select_and_scatter' not in backward and 'reduce_window' not in backward


@pytest.mark.parametrize('config_module,image_shape', [
    (default, (28, 28, 1)), (keras_convnet, (28, 28, 1)), (best, (28, 28, 1)),
    (fashion_mnist, (28, 28, 1)), (cifar10, (32, 32, 3))])
def test_parameters_from_one_backend_give_the_same_logits_on_the_other(config_module,
                                                                      image_shape):
  """A checkpoint moves between CPU and GPU/TPU: same parameter tree, same function
  (best.py: BatchNorm in the CPU kernels' CHWN layout against NHWC); every shipped
  config, on its dataset's image shape."""
  config = config_module.get_config()
  model = train.validate(config).model
  config_lib.check_shapes(model.blocks, image_shape)
  cpu_model = train.build_model(dataclasses.replace(model, ops='cpu'), axis_name=None)
  xla_model = train.build_model(dataclasses.replace(model, ops='xla'), axis_name=None)
  x = jax.random.normal(jax.random.key(1), (16, *image_shape))
  cpu_vars = cpu_model.init(jax.random.key(0), x)
  xla_vars = xla_model.init(jax.random.key(0), x)
  assert jax.tree_util.tree_structure(cpu_vars) == jax.tree_util.tree_structure(xla_vars)
  for a, b in zip(jax.tree_util.tree_leaves(cpu_vars), jax.tree_util.tree_leaves(xla_vars)):
    np.testing.assert_array_equal(a, b)  # The same initialisation, too.
  np.testing.assert_allclose(cpu_model.apply(cpu_vars, x), xla_model.apply(cpu_vars, x),
                             rtol=1e-4, atol=1e-4)


def test_cpu_kernels_and_library_ops_train_the_same_loss_curve_on_mnist(smoke_config, tmp_path):
  """200 steps of the lesson's model, narrowed (dropout included: both draw the same masks)."""
  smoke_config.data.num_train, smoke_config.num_epochs = 25600, 1  # One test pass each.
  smoke_config.model.filters, smoke_config.model.hidden = (16,), (64,)
  smoke_config.log_every_steps, smoke_config.progress = 10, False
  curves = {}
  for backend in ('cpu', 'xla'):
    smoke_config.model.ops = backend
    results = train.train_and_evaluate(smoke_config, str(tmp_path / backend))
    records = workdir.read_jsonl(str(tmp_path / backend / 'metrics.jsonl'))
    curves[backend] = np.array([r['train_loss'] for r in records if 'train_loss' in r])
    curves[backend + ' test'] = results['test_accuracy']
  assert len(curves['cpu']) == 20 and curves['cpu'][-1] < 0.5 * curves['cpu'][0]
  np.testing.assert_allclose(curves['cpu'], curves['xla'], rtol=0.02, atol=0.005)
  assert abs(curves['cpu test'] - curves['xla test']) < 0.005


@pytest.mark.parametrize('layout', ['NHWC', 'CHWN'])
def test_a_dilated_net_computes_the_same_on_the_cpu_kernels_and_the_library_ops(layout):
  """Dilation in the first of two VALID blocks: the CPU kernels run that conv on the
  library conv and crop it to the outputs the next block reads (shapes.conv_outputs_read
  with the dilated extent); the logits and gradients are the library ops'."""
  blocks = tuple(shapes.Block(filters=f, kernel_size=3, stride=1, dilation=d, padding='VALID',
                              norm='none', pool=p, pool_size=3, pool_stride=2)
                 for f, d, p in ((4, 2, 'max'), (8, 1, 'avg')))
  # 28 -> 24 (a 3x3 kernel dilated by 2 spans 5) -> 11 -> 9 -> 4.
  assert shapes.feature_shapes(blocks, (28, 28, 1)) == [(11, 11, 4), (4, 4, 8)]
  with pytest.raises(config_lib.ConfigError, match=r'block 0 has a 3x3 kernel spanning 29x29 '
                                                   r'\(Block.conv_extent\) but its input is only'):
    config_lib.check_shapes((shapes.Block(filters=4, dilation=14),), (28, 28, 1))
  cpu = models.ConvNet(blocks=blocks, hidden=(16,), ops=ops.Ops('cpu', layout))
  xla = cpu.clone(ops=ops.Ops('xla'))
  x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
  variables = xla.init(jax.random.key(0), x)
  loss = lambda model, v: jnp.sum(jnp.sin(model.apply(v, x)))
  for a, b in zip(jax.tree_util.tree_leaves(jax.value_and_grad(lambda v: loss(cpu, v))(variables)),
                  jax.tree_util.tree_leaves(jax.value_and_grad(lambda v: loss(xla, v))(variables))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
