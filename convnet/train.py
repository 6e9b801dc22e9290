"""TrainState, train_step, eval_step and the loop that runs them: train_and_evaluate.

`train_step` and `eval_step` see one device's slice of a batch and average over
the axis `AXIS`; how they are parallelised is decided in `parallelize`, the one
place that calls `jax.pmap`. The dataset lives on the devices and a whole epoch
runs as one compiled `lax.scan`, so there is no host round trip per step.
"""

import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax import lax

from convnet import config_lib, input_pipeline, models

AXIS = 'batch'
OUTPUT_FILES = ('config.json', 'metrics.jsonl', 'results.json')


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def build_model(model_config, axis_name: str | None = AXIS) -> models.ConvNet:
  return models.ConvNet(**config_lib.model_args(model_config), axis_name=axis_name)


def create_learning_rate_fn(config, steps_per_epoch: int) -> optax.Schedule:
  """Constant, or cosine decay to 0 over the run; both after a linear warmup if set."""
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  total_steps = config.num_epochs * steps_per_epoch
  if config.schedule == 'constant':
    main = optax.constant_schedule(config.learning_rate)
  else:
    main = optax.cosine_decay_schedule(config.learning_rate, max(total_steps - warmup_steps, 1))
  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(0.0, config.learning_rate, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def create_optimizer(config, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  if config.optimizer == 'sgd':
    return optax.sgd(learning_rate_fn, momentum=config.momentum or None)
  if config.optimizer == 'adamw':
    return optax.adamw(learning_rate_fn, weight_decay=config.weight_decay)
  return optax.adam(learning_rate_fn)


def create_train_state(key: jax.Array, config, model: models.ConvNet, image_shape,
                       learning_rate_fn: optax.Schedule) -> TrainState:
  variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           tx=create_optimizer(config, learning_rate_fn),
                           batch_stats=variables.get('batch_stats', {}))


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, batch, rng: jax.Array, axis_name: str = AXIS):
  """One optimizer step on this device's slice of the global batch.

  Gradients, metrics and (through BatchNorm's axis_name) batch statistics are
  averaged over `axis_name`, so N devices take the same step as one device would
  on the whole batch. Dropout masks differ per step and per device.
  """
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), lax.axis_index(axis_name))

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        rngs={'dropout': rng}, mutable=['batch_stats'])
    return cross_entropy(logits, batch['label']).mean(), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = lax.pmean(grads, axis_name)
  state = state.apply_gradients(grads=grads, batch_stats=updates.get('batch_stats', {}))
  metrics = {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}
  return state, lax.pmean(metrics, axis_name)


def eval_step(state: TrainState, batch):
  """Summed loss and correct count over the real (mask=True) examples of a batch.

  Sums, not means, so a padded last batch and any number of devices add up exactly.
  """
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                          batch['image'], train=False)
  mask = batch['mask']
  sums = {'loss': jnp.sum(cross_entropy(logits, batch['label']) * mask),
          'correct': jnp.sum((jnp.argmax(logits, -1) == batch['label']) * mask),
          'count': jnp.sum(mask)}
  return sums


def make_train_epoch(steps_per_epoch: int, per_device_batch: int, mean: float, std: float):
  """A function running one epoch of train_step over the device-resident training set.

  The epoch's order comes from `input_pipeline.epoch_permutation`; global batch i
  is perm[i*B:(i+1)*B] whatever the number of devices, and device d takes its
  d-th slice of it. Per-step metrics come back as arrays of length steps_per_epoch.
  """

  def train_epoch(state, images, labels, data_key, dropout_key):
    num_devices = lax.psum(1, AXIS)
    perm = input_pipeline.epoch_permutation(data_key, state.step // steps_per_epoch,
                                            images.shape[0])
    offset = lax.axis_index(AXIS) * per_device_batch

    def body(state, i):
      idx = lax.dynamic_slice(perm, (i * per_device_batch * num_devices + offset,),
                              (per_device_batch,))
      batch = {'image': input_pipeline.normalize(images[idx], mean, std), 'label': labels[idx]}
      return train_step(state, batch, dropout_key)

    return lax.scan(body, state, jnp.arange(steps_per_epoch))

  return train_epoch


def make_evaluate(mean: float, std: float):
  """A function summing eval_step over this device's [steps, batch, ...] test shard."""

  def evaluate(state, images, labels, mask):
    def body(sums, batch):
      image, label, m = batch
      step_sums = eval_step(state, {'image': input_pipeline.normalize(image, mean, std),
                                    'label': label, 'mask': m})
      return jax.tree_util.tree_map(jnp.add, sums, step_sums), None

    zeros = {'loss': 0.0, 'correct': 0, 'count': 0}
    zeros = jax.tree_util.tree_map(jnp.asarray, zeros)
    sums, _ = lax.scan(body, zeros, (images, labels, mask))
    return lax.psum(sums, AXIS)

  return evaluate


def parallelize(fn: Callable, devices, in_axes) -> Callable:
  """The one place that applies jax.pmap: state in and out unreplicated, data sharded."""
  return jax.pmap(fn, axis_name=AXIS, in_axes=in_axes, out_axes=None, devices=devices)


def parallel_train_epoch(steps_per_epoch: int, batch_size: int, mean: float, std: float,
                         devices) -> Callable:
  """(state, images, labels, data_key, dropout_key) -> (state, per-step metrics)."""
  epoch = make_train_epoch(steps_per_epoch, batch_size // len(devices), mean, std)
  return parallelize(epoch, devices, in_axes=(None, 0, 0, None, None))


def parallel_evaluate(mean: float, std: float, devices) -> Callable:
  """(state, images, labels, mask), each from shard_for_eval -> summed test metrics."""
  return parallelize(make_evaluate(mean, std), devices, in_axes=(None, 0, 0, 0))


def put_on_devices(x: np.ndarray, devices) -> jax.Array:
  """Places x, shaped [len(devices), ...], with row d on device d."""
  mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
  return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS)))


def replicate(x: np.ndarray, devices) -> jax.Array:
  """One copy of x on every device (the training set: each device gathers its own batch)."""
  return put_on_devices(np.broadcast_to(x, (len(devices), *x.shape)), devices)


def shard_for_eval(split: input_pipeline.Split, batch_size: int, num_devices: int):
  """Test split -> [devices, steps, per_device_batch, ...] arrays, padded and masked."""
  padded, mask = input_pipeline.pad_to_multiple(split, batch_size)

  def layout(x):
    x = x.reshape(-1, num_devices, batch_size // num_devices, *x.shape[1:])
    return np.swapaxes(x, 0, 1)

  return layout(padded.images), layout(padded.labels), layout(mask)


def prepare_workdir(workdir: str) -> None:
  """Creates workdir; refuses one that already holds a run, so nothing is overwritten."""
  os.makedirs(workdir, exist_ok=True)
  for name in OUTPUT_FILES:
    if os.path.exists(os.path.join(workdir, name)):
      raise FileExistsError(f'{os.path.join(workdir, name)} exists: {workdir} already holds a '
                            f'run; choose a new --workdir')
  if not os.access(workdir, os.W_OK):
    raise PermissionError(f'{workdir}: workdir is not writable')


def write_json(path: str, data: dict) -> None:
  """Writes via a temporary file and rename, so a crash never leaves half a file."""
  with open(path + '.tmp', 'w') as f:
    json.dump(data, f, indent=2)
  os.replace(path + '.tmp', path)


def append_jsonl(path: str, record: dict) -> None:
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')


def log_records(metrics: dict, first_step: int, log_every: int) -> list[dict]:
  """Per-step train metrics -> one record per logging interval (or per epoch if 0)."""
  steps = len(metrics['loss'])
  every = log_every or steps
  records = []
  for start in range(0, steps, every):
    stop = min(start + every, steps)
    records.append({'step': first_step + stop,
                    'train_loss': float(np.mean(metrics['loss'][start:stop])),
                    'train_accuracy': float(np.mean(metrics['accuracy'][start:stop]))})
  return records


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates the model the config describes; writes everything to workdir.

  Returns the contents of results.json. Every check (config, data, shapes,
  workdir) happens before anything is compiled or written.
  """
  config_lib.validate(config, jax.local_device_count())
  devices = jax.local_devices()[:config.num_devices or None]
  num_devices = len(devices)
  data = input_pipeline.load_dataset(config.data.source, config.data.dir, config.data.name,
                                     config.model.num_classes, config.data.download)
  if config.data.num_train:
    data = data._replace(train=input_pipeline.Split(*(x[:config.data.num_train]
                                                      for x in data.train)))
  image_shape = data.train.images.shape[1:]
  model = build_model(config.model)
  config_lib.check_shapes(model, image_shape)
  steps_per_epoch = len(data.train.labels) // config.batch_size
  if steps_per_epoch == 0:
    raise config_lib.ConfigError(f'batch_size={config.batch_size} is larger than the '
                                 f'{len(data.train.labels)} training images')
  prepare_workdir(workdir)
  write_json(os.path.join(workdir, 'config.json'), config.to_dict())

  init_key, data_key, dropout_key = jax.random.split(jax.random.key(config.seed), 3)
  learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch)
  state = create_train_state(init_key, config, model, image_shape, learning_rate_fn)
  num_params = models.count_params(state.params)
  print(f'{num_params:,} parameters; feature maps '
        f'{models.feature_shapes(model, image_shape)}; {num_devices} x {devices[0].device_kind}',
        flush=True)

  train_images, train_labels = (replicate(x, devices) for x in data.train)
  test_arrays = [put_on_devices(x, devices) for x in
                 shard_for_eval(data.test, config.eval_batch_size, num_devices)]
  train_epoch = parallel_train_epoch(steps_per_epoch, config.batch_size, data.mean, data.std,
                                     devices)
  evaluate = parallel_evaluate(data.mean, data.std, devices)
  start = time.time()
  train_epoch = train_epoch.lower(state, train_images, train_labels, data_key,
                                  dropout_key).compile()
  evaluate = evaluate.lower(state, *test_arrays).compile()
  compile_time = time.time() - start

  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  train_time = 0.0
  for epoch in range(1, config.num_epochs + 1):
    first_step = int(state.step)
    start = time.time()
    state, metrics = train_epoch(state, train_images, train_labels, data_key, dropout_key)
    metrics = jax.device_get(metrics)  # Blocks: one host sync per epoch.
    epoch_time = time.time() - start
    train_time += epoch_time
    if not np.all(np.isfinite(metrics['loss'])):
      bad_step = first_step + int(np.argmin(np.isfinite(metrics['loss']))) + 1
      raise FloatingPointError(f'non-finite training loss at step {bad_step} (epoch {epoch}); '
                               f'try a lower learning_rate (now {config.learning_rate})')
    images_per_s = steps_per_epoch * config.batch_size / epoch_time
    for record in log_records(metrics, first_step, config.log_every_steps):
      record.update(epoch=epoch, learning_rate=float(learning_rate_fn(record['step'] - 1)),
                    images_per_s=images_per_s)
      append_jsonl(metrics_path, record)
    sums = jax.device_get(evaluate(state, *test_arrays))
    test = {'step': int(state.step), 'epoch': epoch,
            'test_loss': float(sums['loss'] / sums['count']),
            'test_accuracy': float(sums['correct'] / sums['count']),
            'test_count': int(sums['count'])}
    append_jsonl(metrics_path, test)
    print(f'epoch {epoch}/{config.num_epochs}: train loss {np.mean(metrics["loss"]):.4f} '
          f'accuracy {np.mean(metrics["accuracy"]):.4f} | test loss {test["test_loss"]:.4f} '
          f'accuracy {test["test_accuracy"]:.4f} | {images_per_s:,.0f} images/s, '
          f'{epoch_time:.1f}s', flush=True)

  results = {'test_accuracy': test['test_accuracy'], 'test_loss': test['test_loss'],
             'test_count': test['test_count'], 'num_params': num_params,
             'num_epochs': config.num_epochs, 'train_time_s': train_time,
             'compile_time_s': compile_time,
             'train_images_per_s': config.num_epochs * steps_per_epoch * config.batch_size
                                   / train_time,
             'num_devices': num_devices, 'device_kind': devices[0].device_kind}
  write_json(os.path.join(workdir, 'results.json'), results)
  return results
