"""Training: pmap equivalence, exact evaluation, learning on real MNIST, config errors."""

import importlib
import json
import os
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from conftest import fingerprint, metrics_without_timings
from convnet import config_lib, input_pipeline, optim, parallel, train, workdir


def batchnorm_config(smoke_config):
  config = smoke_config
  config.model.num_blocks = 2
  config.model.filters = (8, 16)
  config.model.norm = ('batch',)
  config.model.dropout = 0.0  # Masks are drawn per device, so they differ with the device count.
  return config


def run_epoch(config, mnist, devices, num_images=64, how='pmap', chunk_steps=None,
              augment=('none', 0)):
  """One epoch over the first num_images training images on the given devices (one seed),
  in chunks of chunk_steps steps (default: the whole epoch in one compiled scan)."""
  config = config_lib.read(config)
  model = train.build_model(config.model)
  steps = num_images // config.batch_size
  init_keys, data_keys, dropout_keys = train.seed_keys(config.seed, 1)
  state = train.create_train_states(init_keys, config, model, (28, 28, 1),
                                    optim.create_learning_rate_fn(config, steps))
  chunk = train.parallel_train_chunk(chunk_steps or steps, steps, config.batch_size, mnist.mean,
                                     mnist.std, devices, how, config.micro_batch_size, augment)
  images, labels = (parallel.replicate(x[:num_images], devices) for x in mnist.train)
  perms = train.epoch_permutations(data_keys, 0, num_images)
  metrics = []
  for _ in range(steps // (chunk_steps or steps)):
    state, chunk_metrics = chunk(state, images, labels, perms, dropout_keys, {})
    metrics.append(jax.device_get(chunk_metrics))  # Blocks on every chunk.
  metrics = jax.tree_util.tree_map(lambda *m: np.concatenate(m, axis=1), *metrics)
  return jax.tree_util.tree_map(lambda x: x[0], (state, metrics))


@pytest.mark.parametrize('kernels', ['cpu', 'xla'])
def test_pmap_over_two_devices_equals_one_device_on_the_same_global_batches(smoke_config, mnist,
                                                                           kernels):
  config = batchnorm_config(smoke_config)
  config.batch_size = 32
  config.model.ops = kernels
  one_state, one_metrics = run_epoch(config, mnist, jax.local_devices()[:1])
  two_state, two_metrics = run_epoch(config, mnist, jax.local_devices()[:2])
  assert int(one_state.step) == int(two_state.step) == 2
  for one, two in zip(jax.tree_util.tree_leaves((one_state.params, one_state.batch_stats)),
                      jax.tree_util.tree_leaves((two_state.params, two_state.batch_stats))):
    np.testing.assert_allclose(one, two, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(one_metrics['loss'], two_metrics['loss'], rtol=1e-5)
  # The step really moved the parameters and the BatchNorm statistics.
  spec = config_lib.read(config)
  fresh = train.create_train_state(jax.random.split(jax.random.key(config.seed), 3)[0], spec,
                                   train.build_model(spec.model), (28, 28, 1), lambda s: 0.)
  assert not np.allclose(fresh.params['ConvBlock_0']['kernel'],
                         one_state.params['ConvBlock_0']['kernel'])
  assert not np.allclose(fresh.batch_stats['ConvBlock_1']['BatchNorm_0']['mean'],
                         one_state.batch_stats['ConvBlock_1']['BatchNorm_0']['mean'])


@pytest.mark.parametrize('kernels', ['cpu', 'xla'])
def test_jit_with_sharding_equals_pmap(smoke_config, mnist, kernels):
  config = batchnorm_config(smoke_config)
  config.batch_size = 32
  config.model.ops = kernels
  devices = jax.local_devices()[:2]
  pmap_state, pmap_metrics = run_epoch(config, mnist, devices, how='pmap')
  jit_state, jit_metrics = run_epoch(config, mnist, devices, how='jit')
  for a, b in zip(jax.tree_util.tree_leaves((pmap_state.params, pmap_state.batch_stats)),
                  jax.tree_util.tree_leaves((jit_state.params, jit_state.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pmap_metrics['loss'], jit_metrics['loss'], rtol=1e-6)


@pytest.mark.parametrize('num_devices', [1, 2])
def test_micro_batches_give_the_whole_batch_gradient(smoke_config, mnist, num_devices):
  config = smoke_config
  config.model.update(num_blocks=2, filters=(8, 16), padding=('VALID',), hidden=())
  config.model.dropout = 0.0  # Slices draw their own masks; without dropout the steps must agree.
  config.optimizer, config.learning_rate = 'sgd', 0.1  # Adam would hide a wrongly scaled gradient.
  config.batch_size = 32
  devices = jax.local_devices()[:num_devices]
  whole_state, whole_metrics = run_epoch(config, mnist, devices, num_images=96)
  config.micro_batch_size = 8
  micro_state, micro_metrics = run_epoch(config, mnist, devices, num_images=96)
  assert int(micro_state.step) == 3
  for a, b in zip(jax.tree_util.tree_leaves(whole_state.params),
                  jax.tree_util.tree_leaves(micro_state.params)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  for key in ('loss', 'accuracy'):
    np.testing.assert_allclose(whole_metrics[key], micro_metrics[key], rtol=1e-5)


def test_train_step_refuses_a_micro_batch_size_that_does_not_divide_its_batch(smoke_config):
  spec = config_lib.read(smoke_config)
  state = train.create_train_state(jax.random.key(0), spec, train.build_model(spec.model),
                                   (28, 28, 1), lambda step: 0.0)
  batch = {'image': jnp.zeros((1, 12, 28, 28, 1)), 'label': jnp.zeros((1, 12), jnp.int32)}
  step = jax.vmap(lambda b: train.train_step(state, b, jax.random.key(0), micro_batch_size=5),
                  axis_name=parallel.AXIS)
  with pytest.raises(ValueError, match='micro_batch_size=5 does not divide the per-device batch '
                                       'of 12'):
    step(batch)


def host_loop_epoch(config, mnist, devices, num_images):
  """The obvious loop, as a reference: NumPy batches cut on the host in the epoch's
  order and sent to the devices each step, one pmapped train_step per batch."""
  config = config_lib.read(config)
  model = train.build_model(config.model)
  steps = num_images // config.batch_size
  init_keys, data_keys, dropout_keys = train.seed_keys(config.seed, 1)
  state = jax.tree_util.tree_map(lambda x: x[0], train.create_train_states(
      init_keys, config, model, (28, 28, 1), optim.create_learning_rate_fn(config, steps)))
  step = jax.pmap(train.train_step, axis_name=parallel.AXIS, in_axes=(None, 0, None),
                  out_axes=None, devices=devices)
  order = np.asarray(input_pipeline.epoch_permutation(data_keys[0], 0, num_images))
  losses, batches = [], []
  for j in range(steps):
    idx = order[j * config.batch_size:(j + 1) * config.batch_size]
    batch = {'image': input_pipeline.normalize(mnist.train.images[idx], mnist.mean, mnist.std),
             'label': mnist.train.labels[idx]}
    batch = jax.tree_util.tree_map(lambda x: x.reshape(len(devices), -1, *x.shape[1:]), batch)
    state, metrics = step(state, batch, dropout_keys[0])
    losses.append(float(metrics['loss']))
    batches.append(idx)
  return state, np.array(losses), batches


def test_scanned_epoch_equals_the_step_by_step_host_loop(smoke_config, mnist):
  """The trainer's device-resident data, on-device permutation and lax.scan over steps
  (one scan per epoch, or chunks of 2 steps) against NumPy batches fed step by step:
  the same batches in the same order, so the same losses and parameters."""
  config = smoke_config
  config.batch_size = 16
  devices = jax.local_devices()[:2]
  host_state, host_losses, batches = host_loop_epoch(config, mnist, devices, 64)
  assert sorted(np.concatenate(batches)) == list(range(64))  # Every image once per epoch.
  for chunk_steps in (None, 2):
    state, metrics = run_epoch(config, mnist, devices, chunk_steps=chunk_steps)
    assert int(state.step) == int(host_state.step) == 4
    np.testing.assert_allclose(metrics['loss'], host_losses, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(state.params),
                    jax.tree_util.tree_leaves(host_state.params)):
      # Adam divides by sqrt(v): float rounding in tiny gradients moves params ~1e-6.
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # A different order gives different losses: the comparison above can see the order.
  swapped = config.copy_and_resolve_references()
  swapped.seed = config.seed + 1
  other_losses = host_loop_epoch(swapped, mnist, devices, 64)[1]
  assert not np.allclose(other_losses[1:], host_losses[1:], rtol=1e-3)


def test_augmentation_draws_the_same_moves_in_any_chunking_and_changes_training(
    smoke_config, mnist):
  """Moves keyed by seed, step and device: chunks of 2 steps (as after a resume) train
  on the same moved images as one scan over the epoch."""
  smoke_config.batch_size = 16
  devices = jax.local_devices()[:2]
  whole = run_epoch(smoke_config, mnist, devices, augment=('crop_flip', 2))[1]['loss']
  chunked = run_epoch(smoke_config, mnist, devices, chunk_steps=2, augment=('crop_flip', 2))
  np.testing.assert_allclose(chunked[1]['loss'], whole, rtol=1e-5)
  plain = run_epoch(smoke_config, mnist, devices)[1]['loss']
  assert not np.allclose(plain, whole, rtol=1e-3)  # The images really moved.


def test_train_step_is_traced_once_per_run_not_once_per_epoch(smoke_config, tmp_path,
                                                                monkeypatch):
  config = smoke_config
  config.num_epochs, config.data.num_train, config.log_every_steps = 3, 512, 0
  traces = []

  def counted_train_step(*args, **kwargs):
    traces.append(1)
    return train.train_step.__wrapped__(*args, **kwargs)

  counted_train_step = chex.assert_max_traces(counted_train_step, n=1)
  counted_train_step.__wrapped__ = train.train_step
  monkeypatch.setattr(train, 'train_step', counted_train_step)
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['num_epochs'] == 3 and len(traces) == 1


def test_evaluation_counts_every_test_image_once(smoke_config, mnist):
  """Two seeds' models at once, on 1 and 2 devices, in batches that divide 2,000 test
  images or leave a padded last batch: each sum equals those images through model.apply."""
  test = input_pipeline.Split(*(x[:2000] for x in mnist.test))
  spec = config_lib.read(smoke_config)
  model = train.build_model(spec.model)
  states = train.create_train_states(jax.random.split(jax.random.key(0), 2), spec,
                                     model, (28, 28, 1), lambda s: 0.)
  references = []  # All of them through model.apply at once: no batching, no padding.
  for seed in range(2):
    params = jax.tree_util.tree_map(lambda x: x[seed], states.params)
    logits = jax.jit(model.apply)({'params': params}, input_pipeline.normalize(
        test.images, mnist.mean, mnist.std))
    confusion = np.zeros((10, 10), np.int64)  # Rows true, columns predicted.
    np.add.at(confusion, (test.labels, np.asarray(jnp.argmax(logits, -1))), 1)
    references.append({'correct': int(jnp.sum(jnp.argmax(logits, -1) == test.labels)),
                       'loss': float(train.cross_entropy(logits, test.labels).mean()),
                       'confusion': confusion})
  assert references[0]['correct'] != references[1]['correct']  # Two different models.
  for num_devices, eval_batch_size in [(2, 198), (1, 2000), (2, 668)]:
    devices = jax.local_devices()[:num_devices]
    arrays = [parallel.put_on_devices(x, devices) for x in
              train.shard_for_eval(test, eval_batch_size, num_devices)]
    sums = train.parallel_evaluate(mnist.mean, mnist.std, devices)(states, *arrays)
    for seed, reference in enumerate(references):
      assert int(sums['count'][seed]) == 2000
      assert int(sums['correct'][seed]) == reference['correct']
      np.testing.assert_allclose(sums['loss'][seed] / 2000, reference['loss'], rtol=1e-4)
      np.testing.assert_array_equal(sums['confusion'][seed], reference['confusion'])


def test_a_run_reads_its_config_once_into_a_spec(smoke_config, tmp_path, monkeypatch):
  """config_lib.read turns the ConfigDict into a Spec once; nothing after it reads the
  ConfigDict: emptied right after, the run still trains what the config said."""
  read = config_lib.read

  def read_then_empty(config):
    spec = read(config)
    for key in list(config.keys()):
      del config[key]
    return spec

  monkeypatch.setattr(config_lib, 'read', read_then_empty)
  smoke_config.data.num_train = 512
  record = smoke_config.to_dict()
  results = train.train_and_evaluate(smoke_config, str(tmp_path / 'run'))
  assert not smoke_config.keys() and results['test_accuracy'] > 0.3
  assert workdir.read_json(str(tmp_path / 'run' / 'config.json')) == json.loads(json.dumps(record))


def test_training_real_mnist_learns_and_repeats_exactly(smoke_config, tmp_path):
  config = smoke_config
  config.num_epochs = 2
  config.log_every_steps = 4
  results = train.train_and_evaluate(config, str(tmp_path / 'a'))
  train.train_and_evaluate(config, str(tmp_path / 'b'))
  assert results['test_accuracy'] > 0.85  # chance is 0.10; 2 epochs on 2,048 images
  assert results['test_count'] == 10000 and results['num_devices'] == 2
  records = [workdir.read_jsonl(tmp_path / run / 'metrics.jsonl') for run in 'ab']
  train_records = [r for r in records[0] if 'train_loss' in r]
  assert [r['step'] for r in train_records] == list(range(4, 33, 4))
  assert train_records[-1]['train_loss'] < train_records[0]['train_loss'] / 3
  assert metrics_without_timings(tmp_path / 'a') == metrics_without_timings(tmp_path / 'b')
  with open(tmp_path / 'a' / 'config.json') as f:
    assert json.load(f) == json.loads(json.dumps(config.to_dict()))


@pytest.mark.parametrize('num_devices', [1, 2])
def test_what_auto_runs_on_a_gpu_trains_seeds_batchnorm_and_shifted_images(
    smoke_config, tmp_path, monkeypatch, capsys, num_devices):
  """The accelerator path, with JAX reporting a GPU (the arrays stay on the fake CPU
  devices): 'auto' picks the library ops, and two vmapped seeds of a BatchNorm model on
  shifted images learn, each its own way, on one device and on two."""
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  config = batchnorm_config(smoke_config)
  config.num_seeds, config.num_devices, config.data.augment = 2, num_devices, 'shift'
  config.data.num_train, config.batch_size, config.log_every_steps = 1024, 32, 8
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert "xla kernels (model.ops='auto')" in capsys.readouterr().out
  assert results['num_devices'] == num_devices and results['seeds'] == [0, 1]
  accuracies = results['test_accuracy_per_seed']
  assert min(accuracies) > 0.6 and accuracies[0] != accuracies[1]  # Chance is 0.1.
  train_losses = [r['train_loss'] for r in workdir.read_jsonl(tmp_path / 'run' / 'metrics.jsonl')
                  if 'train_loss' in r]
  assert train_losses[-1] < 0.75 * train_losses[0]


def test_bfloat16_trains_the_lesson_model_as_float32_does(smoke_config, tmp_path):
  """One epoch of the lesson's model on the library ops (8,192 digits): bfloat16 compute
  lands within 0.5 points of float32 test accuracy, from the same float32 parameters."""
  config = smoke_config
  config.model.ops, config.data.num_train, config.num_devices = 'xla', 8192, 1
  results = {}
  for dtype in ('float32', 'bfloat16'):
    config.model.dtype = dtype
    results[dtype] = train.train_and_evaluate(config, str(tmp_path / dtype))
  assert results['float32']['test_accuracy'] > 0.9
  assert abs(results['bfloat16']['test_accuracy'] - results['float32']['test_accuracy']) < 0.005
  assert results['bfloat16']['test_loss'] != results['float32']['test_loss']  # It computed.


@pytest.mark.parametrize('profile_steps,traced', [(5, 8), (100, 16)])
def test_profile_steps_writes_a_trace_of_whole_chunks_for_tensorboard(smoke_config, tmp_path,
                                                                      capsys, profile_steps,
                                                                      traced):
  """5 steps in chunks of 4 trace 8; more than the run's 16 steps trace all of them."""
  config = smoke_config
  config.data.num_train, config.log_every_steps = 512, 4
  config.profile_steps, config.batch_size = profile_steps, 32
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  [trace] = (tmp_path / 'run' / 'tensorboard' / 'plugins' / 'profile').glob('*/*.xplane.pb')
  assert trace.stat().st_size > 1000
  assert f'profile of {traced} training steps in' in capsys.readouterr().out


def test_label_smoothing_is_cross_entropy_against_smoothed_targets():
  logits = np.random.default_rng(0).normal(size=(6, 10)).astype(np.float32)
  labels = np.array([0, 3, 9, 3, 5, 1])
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  for smoothing in (0.0, 0.1, 0.5):
    targets = np.full((6, 10), smoothing / 10) + (1 - smoothing) * np.eye(10)[labels]
    np.testing.assert_allclose(train.cross_entropy(logits, labels, smoothing),
                               -(targets * log_p).sum(-1), rtol=1e-5)
  # No smoothing is the integer-label form, bit for bit: every earlier run's numbers stand.
  np.testing.assert_array_equal(
      train.cross_entropy(logits, labels),
      optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def test_a_run_trains_against_its_config_s_smoothed_targets(smoke_config, tmp_path):
  """No loss against targets smoothed by s falls below their entropy (Gibbs' inequality);
  the same run unsmoothed does: the config's smoothing reaches the compiled step."""
  smoothing, losses = 0.5, {}
  targets = np.full(10, smoothing / 10) + (1 - smoothing) * np.eye(10)[0]
  entropy = -(targets * np.log(targets)).sum()
  for s in (0.0, smoothing):
    smoke_config.label_smoothing = s
    train.train_and_evaluate(smoke_config, str(tmp_path / str(s)))
    records = workdir.read_jsonl(tmp_path / str(s) / 'metrics.jsonl')
    losses[s] = [r['train_loss'] for r in records if 'train_loss' in r]
  assert min(losses[smoothing]) >= entropy > max(losses[0.0])


def test_learning_rate_schedule_warmup_then_cosine(smoke_config):
  config = smoke_config
  config.schedule, config.warmup_epochs, config.num_epochs = 'cosine', 1.0, 3
  lr = optim.create_learning_rate_fn(config_lib.read(config), steps_per_epoch=10)
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(0.5e-3)
  assert float(lr(10)) == pytest.approx(1e-3)
  assert float(lr(20)) == pytest.approx(0.5e-3)  # halfway through the cosine part
  assert float(lr(30)) == pytest.approx(0.0, abs=1e-9)


BAD_CONFIGS = [
    ('model.filters', lambda c: setattr(c.model, 'filters', (0,)), '> 0'),
    ('model.filters', lambda c: setattr(c.model, 'filters', ('a',)), 'int values'),
    ('model.filters', lambda c: setattr(c.model, 'filters', (8, 16, 32)), 'num_blocks is 1'),
    ('learning_rate', lambda c: setattr(c, 'learning_rate', -1.0), '> 0'),
    ('optimizer', lambda c: setattr(c, 'optimizer', 'adamax'), 'one of'),
    ('model.pool', lambda c: setattr(c.model, 'pool', ('min',)), 'one of'),
    ('batch_size', lambda c: setattr(c, 'batch_size', 33), 'not divisible by the 2 devices'),
    ('num_devices', lambda c: setattr(c, 'num_devices', 3), 'only 2 local devices'),
    ('micro_batch_size', lambda c: setattr(c, 'micro_batch_size', 24),
     'does not divide the per-device batch of 64'),
    ('micro_batch_size', lambda c: (setattr(c, 'micro_batch_size', 16),
                                    setattr(c.model, 'norm', ('batch',))),
     'BatchNorm would normalise over slices of 16'),
    ('model.dropout', lambda c: setattr(c.model, 'dropout', 1.0), r'\[0, 1\)'),
    ('label_smoothing', lambda c: setattr(c, 'label_smoothing', 1.0), r'\[0, 1\)'),
    ('model.widht', lambda c: c.model.__setattr__('widht', 3), 'unknown config key'),
    ('model.kernel_size', lambda c: c.model.update(num_blocks=3, kernel_size=(9,),
                                                   padding=('VALID',)), '9x9 kernel'),
    ('model.pool_size', lambda c: c.model.update(num_blocks=5, kernel_size=(1,)),
     r"block 4's conv \(kernel 1, stride 1, SAME\) takes 1x1 to 1x1, which its 2x2 pooling"),
    ('model.stride', lambda c: c.model.update(stride=(30,)),
     r"block 0's conv \(kernel 3, stride 30, SAME\) takes 28x28 to 1x1"),
    ('checkpoint_every_steps', lambda c: c.update(checkpoint_every_steps=7, log_every_steps=5),
     'must be a multiple of log_every_steps > 0'),
    ('checkpoint_every_steps', lambda c: c.update(checkpoint_every_steps=5, log_every_steps=0),
     'must be a multiple of log_every_steps > 0'),
    ('data.num_train', lambda c: c.data.update(num_train=60001),
     'data.num_train=60001 but the training set holds 60000 images'),
]


@pytest.fixture(scope='module')
def unfinished_run(tmp_path_factory):
  """A workdir as a crash leaves it: config, metrics and a checkpoint, no results.json."""
  run_dir = tmp_path_factory.mktemp('unfinished') / 'run'
  train.train_and_evaluate(default.get_config('smoke'), str(run_dir))
  os.remove(run_dir / 'results.json')
  return run_dir


@pytest.mark.parametrize('key,change,message', BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_is_rejected_naming_the_key_before_anything_is_written(
    smoke_config, tmp_path, unfinished_run, key, change, message):
  change(smoke_config)
  for run_dir in (tmp_path / 'new', unfinished_run):
    before = fingerprint(run_dir) if run_dir.exists() else None
    with pytest.raises(config_lib.ConfigError, match=message) as error:
      train.train_and_evaluate(smoke_config, str(run_dir))
    assert key in str(error.value)
    if before is None:
      assert not run_dir.exists()
    else:
      assert fingerprint(run_dir) == before  # The earlier run's files are untouched.


def test_workdir_with_a_finished_run_is_never_overwritten(smoke_config, tmp_path):
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  (run_dir / 'results.json').write_text('{"test_accuracy": 0.99}')
  with pytest.raises(FileExistsError, match='results.json exists'):
    train.train_and_evaluate(smoke_config, str(run_dir))
  assert (run_dir / 'results.json').read_text() == '{"test_accuracy": 0.99}'
  assert sorted(os.listdir(run_dir)) == ['results.json']


def test_non_finite_loss_stops_with_the_step(smoke_config, tmp_path):
  smoke_config.learning_rate = 1e30
  smoke_config.optimizer = 'sgd'
  with pytest.raises(FloatingPointError, match=r'non-finite training loss at step \d+'):
    train.train_and_evaluate(smoke_config, str(tmp_path / 'run'))


def test_vmapped_seeds_match_each_seed_trained_alone(smoke_config, tmp_path):
  config = smoke_config
  config.data.num_train, config.num_seeds = 1024, 2
  together = train.train_and_evaluate(config, str(tmp_path / 'together'))
  config.num_seeds = 1
  for seed in (0, 1):
    config.seed = seed
    alone = train.train_and_evaluate(config, str(tmp_path / f'seed{seed}'))
    assert together['test_accuracy_per_seed'][seed] == pytest.approx(alone['test_accuracy'],
                                                                     abs=2e-3)
    assert together['test_loss_per_seed'][seed] == pytest.approx(alone['test_loss'], rel=2e-3)
  assert together['seeds'] == [0, 1]
  per_seed = together['test_accuracy_per_seed']
  assert per_seed[0] != per_seed[1]  # Different seeds: different inits, orders and masks.
  assert together['test_accuracy'] == pytest.approx(np.mean(per_seed))
  assert together['test_accuracy_std'] == pytest.approx(np.std(per_seed, ddof=1))


def test_the_host_reads_each_chunk_after_starting_the_next(smoke_config, tmp_path, monkeypatch):
  """Metrics are read one chunk behind: chunk k+1 is queued on the devices before the host
  waits for chunk k. A checkpoint reaches the writer after the records up to its step."""
  events = []

  def spy(owner, name, event):
    method = getattr(owner, name)

    def wrapper(*args, **kwargs):
      events.append(event(*args))
      return method(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)

  spy(train.Training, 'start_chunk', lambda self: ('start', self.step))
  spy(train.Training, 'handle_chunk', lambda self, step, *_: ('read', step))
  spy(train.metric_writer.MetricWriter, 'write', lambda self, record: ('write', record['step']))
  spy(train.checkpoint, 'save', lambda checkpoints, step, tree: ('save', step))
  config = smoke_config
  config.data.num_train, config.batch_size, config.num_epochs = 512, 32, 2
  config.log_every_steps, config.checkpoint_every_steps = 4, 8
  train.train_and_evaluate(config, str(tmp_path / 'run'))

  starts_and_reads = [e for e in events if e[0] in ('start', 'read')]
  expected = [('start', 0)]
  for step in range(4, 32, 4):
    expected += [('start', step), ('read', step - 4)]
  assert starts_and_reads == expected + [('read', 28)]
  saves = [e for e in events if e[0] == 'save']
  assert [step for _, step in saves] == [8, 16, 24, 32]
  for save in saves:  # Every train and test record up to the checkpoint's step is written.
    assert events.index(save) > max(i for i, e in enumerate(events)
                                     if e[0] == 'write' and e[1] == save[1])
  records = workdir.read_jsonl(tmp_path / 'run' / 'metrics.jsonl')
  assert [r['step'] for r in records if 'train_loss' in r] == list(range(4, 33, 4))
  assert [r['step'] for r in records if 'test_loss' in r] == [16, 32]


def test_group_norm_trains_and_allows_micro_batches(smoke_config, tmp_path):
  """Per-example statistics: unlike BatchNorm, micro-batches leave GroupNorm unchanged."""
  config = smoke_config
  config.model.update(norm=('group',), norm_groups=(4,))
  config.data.num_train, config.micro_batch_size = 1024, 16
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['test_accuracy'] > 0.6  # Chance is 0.1.


@pytest.mark.parametrize('config_name', ['fast', 'keras_convnet'])
def test_the_quickly_compiled_programs_give_the_bits_of_the_default_compile(config_name):
  """The keys, the initial state and an epoch's data order compile at LLVM -O1 on CPU
  (quick_options): the parameters and optimizer state (BatchNorm, dropout, two seeds),
  keys and permutations are bit for bit those of XLA's default options."""
  assert train.quick_options() == {'xla_backend_optimization_level': 1}
  config = importlib.import_module(f'configs.{config_name}').get_config()
  config.num_seeds = 2
  spec = config_lib.read(config)
  model = train.build_model(spec.model)
  learning_rate_fn = optim.create_learning_rate_fn(spec, 10)
  keys = train.seed_keys(spec.seed, spec.num_seeds)
  default_keys = jax.jit(train._seed_keys, static_argnums=1)(spec.seed, spec.num_seeds)
  quick = (train.create_train_states(keys[0], spec, model, (28, 28, 1), learning_rate_fn),
           train.epoch_permutations(keys[1], 3, 60000))
  default_options = (
      jax.jit(jax.vmap(lambda key: train.create_train_state(
          key, spec, model, (28, 28, 1), learning_rate_fn)))(default_keys[0]),
      jax.jit(train._epoch_permutations, static_argnums=2)(default_keys[1], 3, 60000))
  leaves = jax.tree_util.tree_leaves(quick)
  assert len(leaves) == len(jax.tree_util.tree_leaves(default_options)) > 10
  for a, b in zip(leaves, jax.tree_util.tree_leaves(default_options)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(keys, default_keys):
    np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))


def test_chunk_seconds_counts_from_the_last_earlier_work_that_ended_before_the_chunk():
  assert train.chunk_seconds(started_at=1.0, earlier=[], ended=3.0) == 2.0
  assert train.chunk_seconds(started_at=1.0, earlier=[2.0, 0.5], ended=3.0) == 1.0
  # An evaluation queued before the chunk but ending after it ran beside it.
  assert train.chunk_seconds(started_at=1.0, earlier=[1.5, 9.0], ended=3.0) == 1.5


def with_sleep(make, seconds: float):
  """A parallel_train_chunk / parallel_evaluate whose program sleeps `seconds` on the
  device (a host callback on its loss), then returns."""
  def made(*args, **kwargs):
    fn = make(*args, **kwargs)

    def sleep(loss):
      time.sleep(seconds)
      return loss

    def slow(*inputs):
      out = fn(*inputs)
      sums = out[-1] if isinstance(out, tuple) else out
      sums = dict(sums, loss=jax.pure_callback(
          sleep, jax.ShapeDtypeStruct(sums['loss'].shape, sums['loss'].dtype), sums['loss']))
      return (*out[:-1], sums) if isinstance(out, tuple) else sums
    return jax.jit(slow)
  return made


def test_a_chunk_beside_a_slow_evaluation_is_timed_by_its_own_steps(smoke_config, tmp_path,
                                                                    monkeypatch):
  """Each epoch's chunk sleeps 0.5 s on the device and each evaluation 2 s. The CPU client
  runs epoch 2's chunk beside epoch 1's evaluation, which the host reads first: each
  epoch still reports at least its chunk's 0.5 s and none of the evaluation's 2 s (it
  reported ~0 s when timed from the host's reads)."""
  monkeypatch.setattr(train, 'parallel_train_chunk',
                      with_sleep(train.parallel_train_chunk, 0.5))
  monkeypatch.setattr(train, 'parallel_evaluate', with_sleep(train.parallel_evaluate, 2.0))
  smoke_config.num_epochs, smoke_config.log_every_steps = 2, 0
  results = train.train_and_evaluate(smoke_config, str(tmp_path))
  records = [r for r in workdir.read_jsonl(tmp_path / 'metrics.jsonl') if 'images_per_s' in r]
  assert len(records) == 2
  for record in records:
    images = record['step'] // record['epoch'] * smoke_config.batch_size * smoke_config.num_seeds
    seconds = images / record['images_per_s']
    assert 0.5 <= seconds < 2.0, record
  assert 1.0 <= results['train_time_s'] < 4.0
