"""TrainState, train_step, eval_step and the loop that runs them: train_and_evaluate.

`train_step` and `eval_step` see one device's slice of a batch and average over
the axis `AXIS`; how they are parallelised is decided in `parallel.py`. The
dataset lives on the devices (one copy per device, shared by the runs of a process) and
the steps between two logging points run as one compiled `lax.scan`, so there is no host
round trip per step; the host reads each chunk's metrics after starting the next chunk
(`Training`), so the devices never wait for it.
"""

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import serialization
from flax.training import train_state
from jax import lax

from convnet import (checkpoint, config_lib, input_pipeline, metric_writer, models, ops, optim,
                     parallel, shapes)
from convnet import workdir as workdir_lib
from convnet.cpu import memory

AXIS = parallel.AXIS


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def build_model(model: config_lib.Model, axis_name: str | None = AXIS) -> models.ConvNet:
  return models.ConvNet(blocks=model.blocks, activation=model.activation, hidden=model.hidden,
                        dropout=model.dropout, num_classes=model.num_classes,
                        ops=ops.make(model.ops, model.layout, model.dtype), axis_name=axis_name)


def create_train_state(key: jax.Array, spec: config_lib.Spec, model: models.ConvNet, image_shape,
                       learning_rate_fn: optax.Schedule) -> TrainState:
  variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           tx=optim.create_optimizer(spec, learning_rate_fn),
                           batch_stats=variables.get('batch_stats', {}))


def cross_entropy(logits, labels, label_smoothing=0.0):
  """Per-example loss against targets of 1 - label_smoothing on the label plus
  label_smoothing spread evenly over all classes (optax.smooth_labels, as tf.keras and
  PyTorch smooth). Without smoothing, the integer-label form: the same bits as ever."""
  if isinstance(label_smoothing, (int, float)) and label_smoothing == 0:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  return optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, label_smoothing))


def train_step(state: TrainState, batch, rng: jax.Array, axis_name: str = AXIS,
               micro_batch_size: int = 0, label_smoothing=0.0):
  """One optimizer step on this device's slice of the global batch.

  Gradients, metrics and (through BatchNorm's axis_name) batch statistics are
  averaged over `axis_name`, so N devices take the same step as one device would
  on the whole batch. Dropout masks differ per step and per device.

  micro_batch_size > 0 runs forward and backward on slices of that many images,
  one after another, and sums their gradients: the same gradient (of the batch's
  mean loss) in pieces whose activations stay in the CPU cache (docs/performance.md).
  Each slice draws its own dropout masks.
  BatchNorm would see slice statistics, so config validation refuses the two together.
  """
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), lax.axis_index(axis_name))
  batch_size = len(batch['label'])
  size = micro_batch_size or batch_size
  if batch_size % size:
    raise ValueError(f'micro_batch_size={size} does not divide the per-device batch of '
                     f'{batch_size}')

  def gradient(images, labels, rng):
    """(grads, summed loss / batch_size, correct count), BatchNorm updates; of any slice."""
    def loss_fn(params):
      logits, updates = state.apply_fn(
          {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
          rngs={'dropout': rng}, mutable=['batch_stats'])
      loss = cross_entropy(logits, labels, label_smoothing)
      return loss.sum() / batch_size, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return (grads, loss, jnp.sum(jnp.argmax(logits, -1) == labels)), updates

  if size == batch_size:
    (grads, loss, correct), updates = gradient(batch['image'], batch['label'], rng)
  else:
    def add_slice(sums, i):
      piece = lambda x: lax.dynamic_slice_in_dim(x, i * size, size)
      slice_sums, _ = gradient(piece(batch['image']), piece(batch['label']),
                               jax.random.fold_in(rng, i))
      return jax.tree_util.tree_map(jnp.add, sums, slice_sums), None

    zeros = (jax.tree_util.tree_map(jnp.zeros_like, state.params), 0.0, 0)
    # Two slices per loop trip: they are independent, so XLA runs one's memory-bound
    # ops beside the other's matmuls.
    (grads, loss, correct), _ = lax.scan(add_slice, zeros, jnp.arange(batch_size // size),
                                         unroll=2)
    updates = {}
  grads = lax.pmean(grads, axis_name)
  state = state.apply_gradients(grads=grads, batch_stats=updates.get('batch_stats', {}))
  metrics = {'loss': loss, 'accuracy': correct / batch_size}
  return state, lax.pmean(metrics, axis_name)


def eval_step(state: TrainState, batch):
  """Summed loss, correct count and confusion matrix (true x predicted) over the real
  (mask=True) examples of a batch.

  Sums, not means, so a padded last batch and any number of devices add up exactly.
  """
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                          batch['image'], train=False)
  mask, predictions = batch['mask'], jnp.argmax(logits, -1)
  num_classes = logits.shape[-1]
  return {'loss': jnp.sum(cross_entropy(logits, batch['label']) * mask),
          'correct': jnp.sum((predictions == batch['label']) * mask),
          'count': jnp.sum(mask),
          'confusion': jnp.zeros((num_classes, num_classes), jnp.int32).at[
              batch['label'], predictions].add(mask.astype(jnp.int32))}


def quick_options() -> dict | None:
  """XLA options for a program a run calls once, or once an epoch (its keys, its initial
  state, an epoch's data order): on CPU, LLVM's -O1 compiles it several times faster
  than the default -O3, to the same bits (tested; -O0 changes them)."""
  return {'xla_backend_optimization_level': 1} if jax.default_backend() == 'cpu' else None


def seed_keys(seeds, num_seeds: int):
  """(init, data, dropout) keys, each with a leading axis of num_seeds per entry of `seeds`
  (an int, or a vmapped group's points' seeds): seed s's i-th is seed s + i."""
  # One program, not one per op.
  return jax.jit(_seed_keys, static_argnums=1, compiler_options=quick_options())(seeds,
                                                                                num_seeds)


def _seed_keys(seeds, num_seeds: int):
  members = (jnp.reshape(jnp.asarray(seeds), (-1, 1)) + jnp.arange(num_seeds)).ravel()
  keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s), 3))(members)
  return keys[:, 0], keys[:, 1], keys[:, 2]


def create_train_states(init_keys: jax.Array, spec: config_lib.Spec, model: models.ConvNet,
                        image_shape, learning_rate_fn: optax.Schedule) -> TrainState:
  """One TrainState per init key, stacked along a leading seed axis.

  Compiled as one program: run op by op, model.init compiles ~140 tiny programs. It is
  random bits only (the forward pass is dead code), and runs once (quick_options).
  """
  return jax.jit(jax.vmap(lambda key: create_train_state(key, spec, model, image_shape,
                                                         learning_rate_fn)),
                 compiler_options=quick_options())(init_keys)


# Each a single program: run op by op, every leaf's shape compiles its own.
device_copy = jax.jit(functools.partial(jax.tree_util.tree_map, jnp.copy))
first_seed = jax.jit(functools.partial(jax.tree_util.tree_map, lambda x: x[0]))


@functools.partial(jax.jit, static_argnums=1)
def first_seeds(tree, num_seeds: int):
  """Each point's first seed, stacked: every num_seeds-th member."""
  return jax.tree_util.tree_map(lambda x: x[::num_seeds], tree)


def epoch_permutations(data_keys: jax.Array, epoch: int, num_examples: int) -> jax.Array:
  """[seeds, num_examples]: each seed's order of the training set in `epoch`."""
  return jax.jit(_epoch_permutations, static_argnums=2, compiler_options=quick_options())(
      data_keys, epoch, num_examples)


def _epoch_permutations(data_keys: jax.Array, epoch: int, num_examples: int) -> jax.Array:
  return jax.vmap(input_pipeline.epoch_permutation, in_axes=(0, None, None))(
      data_keys, epoch, num_examples)


AUGMENT_STREAM = 0x617567  # Folded into a seed's dropout key: augmentation's own stream.

# Config keys that change no shape and no code path: the points of a sweep that differ
# only in these train as the members of one vmapped program (train_together), as seeds do.
VMAPPED_KEYS = ('seed', 'learning_rate', 'schedule', 'warmup_epochs', 'weight_decay',
                'label_smoothing', 'model.dropout', 'data.augment_pixels')


def program_key(spec: config_lib.Spec) -> dict:
  """spec's config without VMAPPED_KEYS: specs with equal keys can train as one program."""
  return {k: v for k, v in config_lib.flatten(spec.record).items() if k not in VMAPPED_KEYS}


def member_values(specs: list[config_lib.Spec], steps_per_epoch: int) -> dict[str, np.ndarray]:
  """{key: [members, ...]} for each of VMAPPED_KEYS whose values differ between specs (one
  per point, same program_key), each point's value once per seed; the learning rate as
  its schedule's value at every step, so that schedule and warmup vary with it. Values
  the specs share stay constants of the program: one spec compiles as it would alone."""
  def differ(*keys):
    return len({tuple(config_lib.get(s, k) for k in keys) for s in specs}) > 1

  values = {}
  if differ('learning_rate', 'schedule', 'warmup_epochs'):
    steps = jnp.arange(specs[0].num_epochs * steps_per_epoch)
    values['learning_rate'] = [  # A constant schedule gives one value for all steps.
        jnp.broadcast_to(optim.create_learning_rate_fn(s, steps_per_epoch)(steps), steps.shape)
        for s in specs]
  for key in ('weight_decay', 'label_smoothing', 'model.dropout', 'data.augment_pixels'):
    if differ(key):
      values[key] = [config_lib.get(s, key) for s in specs]
  return {k: np.repeat(np.asarray(v), specs[0].num_seeds, axis=0) for k, v in values.items()}


def member_state(spec: config_lib.Spec, steps_per_epoch: int) -> Callable:
  """(state, values) -> the state with the optimizer and model of one member's values (a
  member's row of member_values, traced), for a step; without values, the state itself."""

  def vary(state: TrainState, values: dict) -> TrainState:
    if not values:
      return state
    member = config_lib.replace(spec, {k: v for k, v in values.items() if k != 'learning_rate'})
    # A varying learning rate comes as the member's schedule: its value at each step.
    learning_rate_fn = (values['learning_rate'].__getitem__ if 'learning_rate' in values
                        else optim.create_learning_rate_fn(member, steps_per_epoch))
    return state.replace(tx=optim.create_optimizer(member, learning_rate_fn),
                         apply_fn=build_model(member.model).apply)

  return vary


def make_train_chunk(num_steps: int, steps_per_epoch: int, per_device_batch: int, mean, std,
                     micro_batch_size: int = 0, augment: tuple[str, int] = ('none', 0),
                     vary: Callable = lambda state, values: state, label_smoothing: float = 0.0):
  """A function running num_steps of train_step for every seed, over device-resident data.

  Global batch j of an epoch is perm[j*B:(j+1)*B] whatever the number of devices,
  and device d takes its d-th slice of it; the chunk starts at the batch
  `state.step` points to, so chunks of any length give the same data order.
  Members (seeds; in a vmapped sweep group, each point's seeds) are a vmapped leading
  axis of state, perm, dropout_key and values (member_values), whose row `vary`
  (member_state) makes each member's optimizer and model from. `augment` (kind,
  pixels) moves the batch's images on the device, keyed by seed, step and device, so a
  resumed run draws the same moves; a member's own data.augment_pixels (at most
  `pixels`) moves them by as much.
  """

  def chunk(state, images, labels, perm, dropout_key, values):
    num_devices = lax.psum(1, AXIS)
    first = ((state.step % steps_per_epoch) * num_devices + lax.axis_index(AXIS)) * per_device_batch

    def body(state, i):
      idx = lax.dynamic_slice(perm, (first + i * per_device_batch * num_devices,),
                              (per_device_batch,))
      key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
          dropout_key, AUGMENT_STREAM), state.step), lax.axis_index(AXIS))
      kind, pixels = augment
      moved = input_pipeline.augment(images[idx], key, kind,
                                     values.get('data.augment_pixels', pixels), pad=pixels)
      batch = {'image': input_pipeline.normalize(moved, mean, std), 'label': labels[idx]}
      new, metrics = train_step(
          vary(state, values), batch, dropout_key, micro_batch_size=micro_batch_size,
          label_smoothing=values.get('label_smoothing', label_smoothing))
      return new.replace(tx=state.tx, apply_fn=state.apply_fn), metrics

    return lax.scan(body, state, jnp.arange(num_steps))

  return jax.vmap(chunk, in_axes=(0, None, None, 0, 0, 0))


def make_evaluate(mean, std):
  """A function summing eval_step over this device's [steps, batch, ...] test shard, per seed."""

  def evaluate(state, images, labels, mask):
    def sums_of(batch):
      image, label, m = batch
      return eval_step(state, {'image': input_pipeline.normalize(image, mean, std),
                               'label': label, 'mask': m})

    def body(sums, batch):
      return jax.tree_util.tree_map(jnp.add, sums, sums_of(batch)), None

    first = jax.tree_util.tree_map(lambda x: x[0], (images, labels, mask))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   jax.eval_shape(sums_of, first))
    sums, _ = lax.scan(body, zeros, (images, labels, mask))
    return lax.psum(sums, AXIS)

  return jax.vmap(evaluate, in_axes=(0, None, None, None))


def parallel_train_chunk(num_steps: int, steps_per_epoch: int, batch_size: int, mean, std,
                         devices, how: str = 'pmap', micro_batch_size: int = 0,
                         augment: tuple[str, int] = ('none', 0),
                         vary: Callable = lambda state, values: state,
                         label_smoothing: float = 0.0) -> Callable:
  """(states, images, labels, perms, dropout_keys, values) -> (states, per-step metrics
  [members, steps]); values: member_values' (empty but for a vmapped sweep group).

  The states passed in are donated: their buffers hold the new states.
  """
  chunk = make_train_chunk(num_steps, steps_per_epoch, batch_size // len(devices), mean, std,
                           micro_batch_size=micro_batch_size, augment=augment, vary=vary,
                           label_smoothing=label_smoothing)
  return parallel.parallelize(chunk, devices, in_axes=(None, 0, 0, None, None, None), how=how,
                              donate_argnums=(0,))


def parallel_evaluate(mean, std, devices, how: str = 'pmap') -> Callable:
  """(state, images, labels, mask), each from shard_for_eval -> summed test metrics."""
  return parallel.parallelize(make_evaluate(mean, std), devices, in_axes=(None, 0, 0, 0),
                              how=how)


def shard_for_eval(split: input_pipeline.Split, batch_size: int, num_devices: int):
  """Test split -> [devices, steps, per_device_batch, ...] arrays, padded and masked."""
  padded, mask = input_pipeline.pad_to_multiple(split, batch_size)

  def layout(x):
    x = x.reshape(-1, num_devices, batch_size // num_devices, *x.shape[1:])
    return np.swapaxes(x, 0, 1)

  return layout(padded.images), layout(padded.labels), layout(mask)


def training_flops_per_image(model_spec: config_lib.Model, state: TrainState, image_shape) -> float:
  """XLA's FLOP count of one forward and backward pass, per image (one seed's state).

  Counted on the lowered program: compiling it only for the count would add a compile
  to every run's start-up. Without dropout: its random bits are integer hashing, not
  the model's arithmetic, and XLA counts them only when they are written out
  (cpu/dropout.py). Convolutions counted as im2col computes them, directly: Winograd's
  fewer multiplications (cpu/winograd.py) are speed, not less of the model's work.
  """
  model = build_model(model_spec, axis_name=None)
  model = model.clone(dropout=0.0, ops=dataclasses.replace(model.ops, winograd=False))
  batch = 8

  def loss(params, images, labels):
    logits, _ = model.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                            train=True, rngs={'dropout': jax.random.key(0)},
                            mutable=['batch_stats'])
    return cross_entropy(logits, labels).mean()

  lowered = jax.jit(jax.value_and_grad(loss)).lower(
      state.params, jnp.zeros((batch, *image_shape)), jnp.zeros((batch,), jnp.int32))
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops']) / batch


def chunk_end(step: int, steps_per_epoch: int, log_every: int) -> int:
  """Where the chunk starting at `step` stops: the next logging point or the epoch's end.

  Both count from the epoch's start, so at most two chunk lengths are compiled, and
  a run resumed from any checkpoint runs exactly the chunks it would have run.
  """
  epoch_start = step - step % steps_per_epoch
  end = epoch_start + steps_per_epoch
  if log_every:
    end = min(end, epoch_start + ((step - epoch_start) // log_every + 1) * log_every)
  return end


def seed_summary(record: dict, name: str, per_seed) -> dict:
  """record[name] = the mean over seeds, plus record[name + '_per_seed'] when there are several."""
  per_seed = [float(v) for v in np.ravel(per_seed)]
  record[name] = float(np.mean(per_seed))
  if len(per_seed) > 1:
    record[name + '_per_seed'] = per_seed
  return record


class Interrupted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint was saved and rerunning resumes."""


# The CLIs' exit code after SIGTERM/SIGINT (EX_TEMPFAIL, "try again later"): a
# checkpoint was saved and rerunning the same command resumes.
EXIT_INTERRUPTED = 75


# Errors caused by the user's config, data or workdir: the CLIs print them in one line.
USER_ERRORS = (config_lib.ConfigError, input_pipeline.DataError, workdir_lib.ConfigMismatchError,
               workdir_lib.RecordError, checkpoint.CheckpointError, FloatingPointError,
               FileExistsError, PermissionError, workdir_lib.LockedError, parallel.SetupError,
               workdir_lib.WorkdirError, MemoryError)


@contextlib.contextmanager
def stop_requests(shared: list | None = None):
  """Turns SIGTERM/SIGINT into a request (a list that gets the signal's name).

  The loop checks it between chunks, saves and stops. A second signal acts as usual.
  Outside the main thread (where Python cannot install handlers) nothing changes. A
  `shared` list, one the caller's own stop_requests() fills (a sweep training points in
  threads), is used as it is.
  """
  requested = [] if shared is None else shared
  if shared is not None or threading.current_thread() is not threading.main_thread():
    yield requested
    return
  previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

  def handler(signum, frame):
    requested.append(signal.Signals(signum).name)
    signal.signal(signum, previous[signum])

  for sig in previous:
    signal.signal(sig, handler)
  try:
    yield requested
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


def done_at(tree) -> concurrent.futures.Future:
  """The time tree's arrays are ready, taken by a thread of its own: a host that reads
  results in order would see it late when other work ends first."""
  future = concurrent.futures.Future()

  def wait():
    try:
      jax.block_until_ready(tree)
      future.set_result(time.time())
    except Exception as e:  # pylint: disable=broad-except  # The host's own read raises it too.
      future.set_exception(e)

  threading.Thread(target=wait, daemon=True).start()
  return future


def chunk_seconds(started_at: float, earlier: list[float], ended: float) -> float:
  """A chunk's time: from its start, or from the end of the work queued before it, to its
  end. Earlier work that ended after it ran beside it (the CPU client may run a chunk
  before the evaluation queued ahead of it) and does not count."""
  return ended - max([started_at] + [t for t in earlier if t <= ended])


def checkpoint_tree(state: TrainState, keys, times: dict) -> dict:
  """What a checkpoint holds: the train state, the RNG keys and the time spent so far."""
  return {'state': serialization.to_state_dict(state),
          'rng': jax.random.key_data(jnp.stack(keys)),
          'times': {k: jnp.asarray(v, jnp.float32) for k, v in times.items()}}


def restore_checkpoint(checkpoints, state: TrainState, keys, read_only: bool = False):
  """(state, keys, times, step) from the latest intact checkpoint, or None if there is none.

  `state` and `keys` are the fresh ones: the restore is checked against their structure.
  """
  if not checkpoints.all_steps():  # A new run; building the target compiles small programs.
    return None
  restored = checkpoint.restore_latest(
      checkpoints, checkpoint_tree(state, keys, {'train_s': 0.0, 'wall_s': 0.0}), read_only)
  if restored is None:
    return None
  tree, step = restored
  return (serialization.from_state_dict(state, tree['state']),
          tuple(jax.random.wrap_key_data(tree['rng'])),
          {k: float(v) for k, v in tree['times'].items()}, step)


def load_data(spec: config_lib.Spec) -> input_pipeline.Dataset:
  data = input_pipeline.load_dataset(spec.data.source, spec.data.dir, spec.data.name,
                                     spec.model.num_classes, spec.data.download)
  if spec.data.num_train > len(data.train.labels):
    raise config_lib.ConfigError(f'data.num_train={spec.data.num_train} but the training set '
                                 f'holds {len(data.train.labels)} images')
  if spec.data.num_train:  # The statistics too are of the images the run trains on.
    train_split = input_pipeline.Split(*(x[:spec.data.num_train] for x in data.train))
    mean, std = input_pipeline.pixel_mean_std(train_split.images)
    data = data._replace(train=train_split, mean=mean, std=std)
  return data


class Run(NamedTuple):
  """What a config builds before any step: shared by training, the benchmark, visualize
  and predict, so each of them runs the same model on the same state."""
  model: models.ConvNet
  learning_rate_fn: optax.Schedule
  state: TrainState  # One per seed, stacked on a leading axis.
  data_keys: jax.Array  # The epochs' data order, per seed.
  dropout_keys: jax.Array


def init_run(spec: config_lib.Spec, image_shape, steps_per_epoch: int,
             axis_name: str | None = AXIS, seeds: tuple[int, ...] | None = None) -> Run:
  """The model, schedule, fresh per-seed train states and keys of `spec` (of each of
  `seeds` in turn, for a vmapped sweep group: its points' seeds)."""
  model = build_model(spec.model, axis_name)
  init_keys, data_keys, dropout_keys = seed_keys(spec.seed if seeds is None else seeds,
                                                 spec.num_seeds)
  learning_rate_fn = optim.create_learning_rate_fn(spec, steps_per_epoch)
  state = create_train_states(init_keys, spec, model, image_shape, learning_rate_fn)
  return Run(model, learning_rate_fn, state, data_keys, dropout_keys)


def validate(config: ml_collections.ConfigDict) -> config_lib.Spec:
  """The config read into a Spec, validated against this process's devices and processes."""
  spec = config_lib.validate(config, jax.local_device_count() if jax.process_count() == 1
                             else jax.device_count())
  if spec.parallel == 'jit' and jax.process_count() > 1:
    raise config_lib.ConfigError("parallel='jit' runs in one process; use parallel='pmap' with "
                                 'jax.distributed')
  return spec


def check_data(spec: config_lib.Spec, data: input_pipeline.Dataset) -> int:
  """Checks the model's shapes and the batch size against the data; returns steps per epoch."""
  config_lib.check_shapes(spec.model.blocks, data.train.images.shape[1:])
  steps_per_epoch = len(data.train.labels) // spec.batch_size
  if steps_per_epoch == 0:
    raise config_lib.ConfigError(f'batch_size={spec.batch_size} is larger than the '
                                 f'{len(data.train.labels)} training images')
  return steps_per_epoch


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False, devices: list | None = None,
                       stop_requested: list | None = None) -> dict:
  """Trains and evaluates the model the config describes; writes everything to workdir.

  Returns the contents of results.json. Every check (config, data, shapes,
  workdir) happens before anything is compiled or written. A workdir holding an
  unfinished run of the same config resumes from its latest checkpoint. `devices`
  (config.num_devices of them; default: the first ones) and `stop_requested` (see
  stop_requests) let a sweep train several points at once, each on its own devices.
  """
  return train_together([(config, workdir)], allow_config_change=allow_config_change,
                        devices=devices, stop_requested=stop_requested)[0]


def train_together(runs: list[tuple[ml_collections.ConfigDict, str]], *,
                   allow_config_change: bool = False, devices: list | None = None,
                   stop_requested: list | None = None,
                   prefixes: list[str] | None = None) -> list[dict]:
  """train_and_evaluate for (config, workdir) runs whose configs differ only in
  VMAPPED_KEYS, as the members of one vmapped program: each run's seeds are a slice of
  its leading axis, with that run's values (member_values), and each run writes its own
  workdir as it would alone. `prefixes` start each run's lines (default: several runs'
  workdir names; a sweep names its points).
  """
  run_start = time.time()
  with stop_requests(stop_requested) as stop_requested:
    specs = [validate(config) for config, _ in runs]
    shared = program_key(specs[0])
    for spec, (_, workdir) in zip(specs[1:], runs[1:]):
      own = program_key(spec)
      diff = [f'{k}: {shared.get(k)!r} -> {own.get(k)!r}' for k in sorted(set(shared) | set(own))
              if shared.get(k) != own.get(k)]
      if diff:
        raise config_lib.ConfigError(f'{workdir} cannot train in one program with '
                                     f'{runs[0][1]}: {"; ".join(diff)}')
    if jax.default_backend() == 'cpu':
      memory.keep_freed_memory()
    devices, local_devices = run_devices(specs[0], devices)
    data = load_data(specs[0])
    steps_per_epoch = check_data(specs[0], data)
    results = train_in_workdirs(
        specs=specs, workdirs=[workdir for _, workdir in runs],
        prefixes=prefixes or [f'[{os.path.basename(os.path.normpath(workdir))}] '
                              if len(runs) > 1 else None for _, workdir in runs],
        data=data, devices=devices,
        local_devices=local_devices, steps_per_epoch=steps_per_epoch,
        allow_config_change=allow_config_change, stop_requested=stop_requested,
        run_start=run_start)
  if parallel.is_writer() and not metric_writer.in_labelled_lines():  # A sweep says its own.
    for (_, workdir), result in zip(runs, results):
      metric_writer.print_line(summary_line(result, workdir))
  return results


@dataclasses.dataclass
class Point:
  """One workdir's share of a Training: its spec, records and writers, the slice of the
  vmapped axis its seeds are, and the times and test results it reports."""
  spec: config_lib.Spec
  workdir: str
  records: dict  # What workdir_lib.start writes once the run has started.
  checkpoints: checkpoint.Manager
  out: metric_writer.MetricWriter
  members: slice
  prefix: str | None  # Its lines' (a sweep's point), else the thread's.
  learning_rate_fn: optax.Schedule  # Jitted: op by op, each of its ops compiles a program.
  train_time: float = 0.0  # Including the time spent before a resume.
  earlier_wall_time: float = 0.0  # Spent before a resume.
  test: dict | None = None  # The last test record, and seed 0's confusion matrix.
  confusion: np.ndarray | None = None

  def log(self, text: str) -> None:
    if parallel.is_writer():
      metric_writer.print_line(text, prefix=self.prefix)


def train_in_workdirs(*, specs: list[config_lib.Spec], workdirs: list[str],
                      prefixes: list[str | None], data: input_pipeline.Dataset, devices: list,
                      local_devices: list, steps_per_epoch: int, allow_config_change: bool,
                      stop_requested: list, run_start: float) -> list[dict]:
  """Claims each workdir, then trains (resuming what they hold) and finishes the runs."""
  writer = parallel.is_writer()
  data_record = workdir_lib.data_record(data, specs[0], len(devices))
  num_seeds = specs[0].num_seeds
  with contextlib.ExitStack() as stack:
    points = []
    for i, (spec, workdir, prefix) in enumerate(zip(specs, workdirs, prefixes)):
      stack.enter_context(workdir_lib.claim(workdir, enabled=writer))
      records = workdir_lib.prepare(workdir, spec.record, data_record, allow_config_change)
      checkpoints = stack.enter_context(checkpoint.manager(workdir, spec.keep_checkpoints))
      out = stack.enter_context(contextlib.closing(metric_writer.MetricWriter(
          workdir, writer, spec.progress and len(specs) == 1)))  # Bars of several garble.
      points.append(Point(spec=spec, workdir=workdir, records=records, checkpoints=checkpoints,
                          out=out, members=slice(i * num_seeds, (i + 1) * num_seeds),
                          prefix=prefix,
                          learning_rate_fn=jax.jit(optim.create_learning_rate_fn(
                              spec, steps_per_epoch))))
    arrays = stack.enter_context(on_devices(data, data_record, specs[0].eval_batch_size,
                                            devices, local_devices))
    try:
      training = Training(points=points, data=data, arrays=arrays, devices=devices,
                          local_devices=local_devices, steps_per_epoch=steps_per_epoch,
                          stop_requested=stop_requested, run_start=run_start)
      training.train()
      return training.finish()
    except (MemoryError, jax.errors.JaxRuntimeError) as e:
      # XLA's own error, not any RESOURCE_EXHAUSTED: a full disk is that to orbax too.
      if not isinstance(e, MemoryError) and 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      raise OutOfMemory(out_of_memory_advice(specs[0], devices, points[0].checkpoints,
                                             len(points))) from e


class OutOfMemory(MemoryError):
  """A device (or the host) ran out of memory; the message names the settings to lower."""


def out_of_memory_advice(spec: config_lib.Spec, devices: list, checkpoints,
                         num_points: int = 1) -> str:
  """What ran out, the settings that size it, and what is on disk (of the first point)."""
  try:
    checkpoint.finish(checkpoints)
    kept = checkpoints.all_steps()
  except checkpoint.CheckpointError:
    kept = []
  seeds = f' x num_seeds={spec.num_seeds}' if spec.num_seeds > 1 else ''
  seeds += f' x {num_points} sweep points in one program' if num_points > 1 else ''
  slices = (f'micro_batch_size={spec.micro_batch_size}' if spec.micro_batch_size else
            'micro_batch_size (0: each device computes its whole share at once)')
  disk = (f'the last checkpoint (step {max(kept)}) is kept in {checkpoints.directory}: '
          f'--allow_config_change resumes from it' if kept else 'no checkpoint was written')
  return (f'out of memory on {devices[0].device_kind}: batch_size={spec.batch_size} over '
          f'{len(devices)} device(s){seeds}, {slices}; lower batch_size or set a smaller '
          f'micro_batch_size (e.g. 32: slices of each device\'s batch, one after another); '
          f'{disk}')


def run_devices(spec: config_lib.Spec, devices: list | None) -> tuple[list, list]:
  """(the devices the run trains on, this process's among them): `devices` as given (one
  process), else the first spec.num_devices (all of every process's with jax.distributed)."""
  if devices is None:
    return parallel.participating_devices(spec.num_devices)
  if len(devices) != spec.num_devices or jax.process_count() > 1:
    raise ValueError(f'{len(devices)} devices given for num_devices={spec.num_devices}; '
                     f'devices are given in one process only')
  return list(devices), list(devices)


class DeviceData(NamedTuple):
  train_images: jax.Array  # The whole training set on every device: each gathers its batches.
  train_labels: jax.Array
  test: list  # images, labels, mask: [devices, steps, per_device_batch, ...] (shard_for_eval).


def on_devices(data: input_pipeline.Dataset, data_record: dict, eval_batch_size: int, devices,
               local_devices):
  """The dataset placed on this process's devices, once: sweep points training at once on
  the same devices share one copy (parallel.shared), known by data_record's fingerprints."""
  key = ('dataset', data_record['train']['sha256'], data_record['test']['sha256'],
         eval_batch_size, tuple(devices))

  def place():
    test = shard_for_eval(data.test, eval_batch_size, len(devices))
    return DeviceData(*(parallel.replicate(x, local_devices) for x in data.train),
                      [parallel.put_on_devices(parallel.local_rows(x, devices, local_devices),
                                               local_devices) for x in test])

  return parallel.shared(key, place)


class Training:
  """The runs of one program between chunks (its Points: one, or a vmapped sweep group's),
  and the loop that trains them.

  The host reads a chunk's results one chunk behind: it starts chunk k+1 (after the
  evaluation and the checkpoint copy that follow chunk k) before it waits for chunk k's
  metrics, so the device has work queued while the host logs, checks for divergence and
  hands checkpoints to the writer thread. Each chunk's results are handled in order
  (`handle_chunk`, `handle_epoch_end`, `handle_checkpoint`): a checkpoint reaches the
  writer only after the records up to its step are written.
  """

  def __init__(self, *, points: list[Point], data: input_pipeline.Dataset, arrays: DeviceData,
               devices: list, local_devices: list, steps_per_epoch: int, stop_requested: list,
               run_start: float):
    self.points, self.data, self.arrays = points, data, arrays
    self.spec = spec = points[0].spec  # All but VMAPPED_KEYS: what the points share.
    self.devices, self.local_devices = devices, local_devices
    self.steps_per_epoch, self.stop_requested = steps_per_epoch, stop_requested
    self.run_start, self.writer = run_start, parallel.is_writer()
    self.log = metric_writer.print_line if self.writer else lambda text: None
    self.started = False  # The points' records are written (mark_started).
    image_shape = data.train.images.shape[1:]
    run = init_run(spec, image_shape, steps_per_epoch, seeds=[p.spec.seed for p in points])
    self.model = run.model
    seed0 = first_seed(run.state)
    self.num_params = models.count_params(seed0.params)
    self.flops_per_image = training_flops_per_image(spec.model, seed0, image_shape)
    state, data_keys, dropout_keys = self.restore(run)
    self.step = self.saved = self.checkpointed = self.resumed_at = int(state.step[0])
    if not metric_writer.in_labelled_lines():  # A sweep's table has these.
      self.log(f'{self.num_params:,} parameters, {self.flops_per_image / 1e6:.1f} MFLOP per '
               f'training image; {self.model.ops.backend} kernels (model.ops='
               f'{spec.model.ops!r}); feature maps '
               f'{shapes.feature_shapes(self.model.blocks, image_shape)}; {spec.num_seeds} '
               f'seed(s); {len(devices)} x {devices[0].device_kind} in {jax.process_count()} '
               f'process(es)')
    # The state and keys live on every device, as the parallel functions return them, so
    # each compiled function sees one sharding whether the state is new or restored.
    self.state, self.data_keys, self.dropout_keys, self.values = jax.device_put(
        (state, data_keys, dropout_keys,
         member_values([p.spec for p in points], steps_per_epoch)),
        parallel.replicated(local_devices))
    start = time.time()
    self.evaluate = parallel.compile_now(
        parallel_evaluate(data.mean, data.std, devices, spec.parallel), self.state,
        *arrays.test)
    self.compile_time = time.time() - start
    self.chunks, self.perms, self.shown_epoch = {}, None, None
    self.epoch_metrics, self.epoch_time = [], 0.0
    self.dispatched = []  # When the work queued since the last chunk's start was done.
    self.profile = Profile(spec.profile_steps if self.writer else 0,
                           os.path.join(points[0].workdir, 'tensorboard'))

  def share(self, tree, point: Point):
    """point's members of a tree whose leading axis is the members'."""
    if len(self.points) == 1:
      return tree
    return jax.tree_util.tree_map(lambda x: x[point.members], tree)

  def restore(self, run: Run) -> tuple:
    """(state, data keys, dropout keys): every point's from its latest checkpoint (all of one
    step), or the fresh ones of `run` where none holds a checkpoint."""
    restored = [restore_checkpoint(p.checkpoints, self.share(run.state, p),
                                   self.share((run.data_keys, run.dropout_keys), p))
                for p in self.points]
    if not any(restored):
      return run.state, run.data_keys, run.dropout_keys
    steps = {p.workdir: r[3] if r else 0 for p, r in zip(self.points, restored)}
    if len(set(steps.values())) > 1:
      raise checkpoint.CheckpointError(
          f'points at different steps cannot train in one program: {steps}; train them '
          f'one by one (convnet.sweep --vmap_points=1)')
    for point, (_, _, times, step) in zip(self.points, restored):
      point.train_time, point.earlier_wall_time = times['train_s'], times['wall_s']
      point.log(f'resuming {point.workdir} from its checkpoint at step {step}')
    state, (data_keys, dropout_keys) = jax.tree_util.tree_map(
        lambda *xs: jnp.concatenate(xs) if len(xs) > 1 else xs[0],
        *[(r[0], r[1]) for r in restored])
    return state, data_keys, dropout_keys

  def train(self) -> None:
    """Every chunk up to num_epochs, or up to a SIGTERM/SIGINT (then saved; Interrupted)."""
    total_steps = self.spec.num_epochs * self.steps_per_epoch
    pending = []
    while self.step < total_steps and not self.stop_requested:
      started = self.start_chunk()
      self.handle(pending)  # Waits for the chunk before the one just started.
      pending = started
    self.handle(pending)
    if self.stop_requested and not self.started:  # No chunk ran: nothing written.
      raise Interrupted(f'{self.stop_requested[0]} before training started: '
                        f'{", ".join(p.workdir for p in self.points)} is as it was; rerun the '
                        f'same command to start')
    if self.stop_requested:
      if self.checkpointed != self.step:
        self.handle_checkpoint(self.step, self.snapshot())
      for point in self.points:
        checkpoint.finish(point.checkpoints)
      raise Interrupted(f'{self.stop_requested[0]} at step {self.step}: checkpoint saved in '
                        f'{", ".join(str(p.checkpoints.directory) for p in self.points)}; rerun '
                        f'the same command to resume')

  def start_chunk(self) -> list:
    """Starts the steps up to the next logging point or epoch end, then the evaluation and
    checkpoint copy due after them; returns their handlers, to run once the next has started."""
    step, spec = self.step, self.spec
    if self.perms is None or step % self.steps_per_epoch == 0:
      self.perms = jax.device_put(
          epoch_permutations(self.data_keys, step // self.steps_per_epoch,
                             len(self.data.train.labels)),
          parallel.replicated(self.local_devices))
      self.dispatched.append(done_at(self.perms))
    end = chunk_end(step, self.steps_per_epoch, spec.log_every_steps)
    args = (self.state, self.arrays.train_images, self.arrays.train_labels, self.perms,
            self.dropout_keys, self.values)
    train_chunk = self.compiled_chunk(end - step, args)
    self.profile.start()  # After the compile: the trace holds steps only.
    started_at = time.time()
    self.state, metrics = train_chunk(*args)
    self.step, earlier, self.dispatched = end, self.dispatched, [done_at(metrics)]
    handlers = [(self.handle_chunk, (step, end, metrics, started_at, earlier,
                                     self.dispatched[0]))]
    if end % self.steps_per_epoch == 0:
      sums, params = self.evaluate(self.state, *self.arrays.test), self.first_params()
      self.dispatched.append(done_at((sums, params)))
      handlers.append((self.handle_epoch_end, (end, sums, params)))
    if end % self.steps_per_epoch == 0 or (spec.checkpoint_every_steps and
                                           end - self.saved >= spec.checkpoint_every_steps):
      snapshot = self.snapshot()
      self.dispatched.append(done_at(snapshot))
      handlers.append((self.handle_checkpoint, (end, snapshot)))
      self.saved = end
    return handlers

  def compiled_chunk(self, num_steps: int, args) -> Callable:
    """The compiled program running num_steps training steps (two lengths at most)."""
    if num_steps not in self.chunks:
      start = time.time()
      if not metric_writer.in_labelled_lines():
        self.points[0].out.note(f'compiling the training step ({num_steps} steps per call)...')
      spec = self.spec
      pixels = max(p.spec.data.augment_pixels for p in self.points)
      self.chunks[num_steps] = parallel.compile_now(parallel_train_chunk(
          num_steps, self.steps_per_epoch, spec.batch_size, self.data.mean, self.data.std,
          self.devices, how=spec.parallel, micro_batch_size=spec.micro_batch_size,
          augment=(spec.data.augment, pixels),
          vary=member_state(spec, self.steps_per_epoch),
          label_smoothing=spec.label_smoothing), *args)
      self.compile_time += time.time() - start
    return self.chunks[num_steps]

  def snapshot(self):
    """A device copy of what a checkpoint holds: the next chunk may reuse the state's buffers."""
    return device_copy((self.state, self.data_keys, self.dropout_keys))

  def first_params(self):
    """Each point's first seed's parameters, stacked (seed 0's, for one point)."""
    return first_seeds(self.state.params, self.spec.num_seeds)

  @staticmethod
  def handle(handlers: list) -> None:
    for handler, args in handlers:
      handler(*args)

  def handle_chunk(self, step: int, end: int, metrics, started_at: float,
                   earlier: list[concurrent.futures.Future],
                   finished: concurrent.futures.Future) -> None:
    """A chunk's metrics: checked for divergence, written to each point's metrics.jsonl."""
    spec = self.spec
    metrics = jax.device_get(metrics)  # [members, steps]. Waits for the chunk.
    chunk_time = chunk_seconds(started_at, [f.result() for f in earlier], finished.result())
    self.profile.ran(end - step, self.log)
    self.epoch_time += chunk_time
    epoch = step // self.steps_per_epoch
    for point in self.points:
      point.train_time += chunk_time
      problem = divergence(metrics['loss'][point.members], step, spec.divergence_factor,
                           spec.model.num_classes)
      if problem:
        for p in self.points:  # The advice names the last checkpoint: it is whole.
          checkpoint.finish(p.checkpoints)
        where = f'{point.workdir}: ' if len(self.points) > 1 else ''
        raise FloatingPointError(f'{where}{problem} (epoch {epoch + 1}); ' + divergence_advice(
            self.checkpointed, started=self.started, learning_rate=point.spec.learning_rate))
    if epoch != self.shown_epoch:
      for point in self.points:
        point.out.start_epoch(epoch + 1, spec.num_epochs, self.steps_per_epoch,
                              epoch * self.steps_per_epoch, step)
      self.shown_epoch = epoch
    self.epoch_metrics.append(metrics)
    self.mark_started()
    for point in self.points:
      record = {'step': end, 'epoch': epoch + 1,
                'learning_rate': float(point.learning_rate_fn(end - 1)),
                'images_per_s': (end - step) * spec.batch_size * spec.num_seeds / chunk_time}
      seed_summary(record, 'train_loss', metrics['loss'][point.members].mean(axis=1))
      seed_summary(record, 'train_accuracy', metrics['accuracy'][point.members].mean(axis=1))
      point.out.write(record)

  def mark_started(self) -> None:
    """The runs have started: their records are written now, so that a start that fails (a
    refused checkpoint, a model too large to compile) leaves the workdirs as they were."""
    if self.writer and not self.started:
      for point in self.points:
        workdir_lib.start(point.workdir, point.records)
        workdir_lib.keep_records_up_to(point.out.metrics_path, self.resumed_at)
    self.started = True

  def handle_epoch_end(self, step: int, sums, params) -> None:
    """The test metrics, filters and summary line of the epoch ending at `step`."""
    self.test_records(step, sums)
    params = jax.device_get(params)
    losses = np.concatenate([m['loss'] for m in self.epoch_metrics], axis=1)
    accuracies = np.concatenate([m['accuracy'] for m in self.epoch_metrics], axis=1)
    for i, point in enumerate(self.points):
      point.out.write(point.test)
      point.out.filters(jax.tree_util.tree_map(lambda x: x[i], params), step)
      point.out.end_epoch()
      loss = losses[point.members]
      point.log(f'epoch {step // self.steps_per_epoch}/{self.spec.num_epochs}: train loss '
                f'{loss.mean():.4f} accuracy {accuracies[point.members].mean():.4f} | test '
                f'loss {point.test["test_loss"]:.4f} accuracy '
                f'{point.test["test_accuracy"]:.4f} | '
                f'{loss.size * self.spec.batch_size / self.epoch_time:,.0f} images/s'
                f'{seeds_counted(self.spec.num_seeds)}, {self.epoch_time:.1f}s')
    self.epoch_metrics, self.epoch_time = [], 0.0

  def test_records(self, step: int, sums) -> None:
    """Each point's test record of the state at `step` and its seed 0's confusion matrix,
    from evaluate's sums."""
    sums = jax.device_get(sums)
    for point in self.points:
      own = jax.tree_util.tree_map(lambda x: x[point.members], sums)
      record = {'step': step, 'epoch': step // self.steps_per_epoch,
                'test_count': int(own['count'][0]),
                'time_s': point.earlier_wall_time + time.time() - self.run_start,  # Since start.
                'train_time_s': point.train_time}  # Of which training steps.
      seed_summary(record, 'test_loss', own['loss'] / own['count'])
      seed_summary(record, 'test_accuracy', own['correct'] / own['count'])
      point.test, point.confusion = record, own['confusion'][0]  # The figures show seed 0.

  def handle_checkpoint(self, step: int, snapshot) -> None:
    """Hands each point's checkpoint of `step` to the writer thread (checkpoint.save)."""
    state, data_keys, dropout_keys = snapshot
    for point in self.points if self.writer else []:
      checkpoint.save(point.checkpoints, step, checkpoint_tree(
          self.share(state, point), self.share((data_keys, dropout_keys), point),
          {'train_s': point.train_time,
           'wall_s': point.earlier_wall_time + time.time() - self.run_start}))
    self.checkpointed = step

  def finish(self) -> list[dict]:
    """After the last chunk: the last checkpoints on disk, the figures, then results.json."""
    self.profile.stop(self.log)  # A run shorter than profile_steps.
    for point in self.points:  # The last checkpoint is on disk before results.json.
      checkpoint.finish(point.checkpoints)
    self.mark_started()  # A run resumed from its last checkpoint trains no step.
    if self.points[0].test is None or self.points[0].test['step'] != self.step:
      self.test_records(self.step, self.evaluate(self.state, *self.arrays.test))
    results = [self.results(point) for point in self.points]
    if self.writer:
      labels = self.data.test.labels
      examples = input_pipeline.normalize(
          jnp.asarray(self.data.test.images[[int(np.flatnonzero(labels == label)[0])
                                             for label in np.unique(labels)[:4]]]),
          self.data.mean, self.data.std)
      firsts = first_seeds(self.state, self.spec.num_seeds)
      for i, (point, result) in enumerate(zip(self.points, results)):
        seed0 = jax.tree_util.tree_map(lambda x: x[i], firsts)
        point.out.end_of_run(
            self.step, maps=models.feature_maps(
                self.model, {'params': seed0.params, 'batch_stats': seed0.batch_stats},
                examples),
            confusion=np.asarray(point.confusion), hparams=point.spec.record,
            metrics={k: result[k] for k in FINAL_METRICS if k in result})
        workdir_lib.write_json(os.path.join(point.workdir, 'results.json'), result)  # Done.
    return results

  def results(self, point: Point) -> dict:
    spec = point.spec
    results = {**{k: v for k, v in point.test.items() if k.startswith('test_')},  # Last epoch's.
               'num_seeds': spec.num_seeds,
               'seeds': [spec.seed + i for i in range(spec.num_seeds)],
               'num_params': self.num_params, 'flops_per_image': self.flops_per_image,
               'num_epochs': spec.num_epochs, 'train_time_s': point.train_time,
               'compile_time_s': self.compile_time,
               'train_images_per_s': spec.num_epochs * self.steps_per_epoch * spec.batch_size
                                     * spec.num_seeds / max(point.train_time, 1e-9),
               'wall_time_s': point.earlier_wall_time + time.time() - self.run_start,
               'num_devices': len(self.devices), 'device_kind': self.devices[0].device_kind,
               'kernels': self.model.ops.backend}
    if 'test_accuracy_per_seed' in point.test:
      results['test_accuracy_std'] = float(np.std(point.test['test_accuracy_per_seed'], ddof=1))
    if len(self.points) > 1:
      results['vmapped_with'] = len(self.points) - 1  # Points in its program besides itself.
    return results


class Profile:
  """A jax.profiler trace of the first `steps` training steps a process runs, in whole
  compiled chunks, for TensorBoard's Profile tab (`directory`/plugins/profile)."""

  def __init__(self, steps: int, directory: str):
    self.left, self.directory, self.traced, self.tracing = steps, directory, 0, False

  def start(self) -> None:
    """Before a chunk runs: starts the trace if steps are left to trace and none ran yet."""
    if self.left and not self.traced and not self.tracing:
      jax.profiler.start_trace(self.directory)
      self.tracing = True

  def ran(self, num_steps: int, log) -> None:
    """After a chunk ran (and was waited for): ends the trace once it holds enough steps."""
    if self.tracing:
      self.traced += num_steps
      self.left = max(self.left - num_steps, 0)
      if not self.left:
        self.stop(log)

  def stop(self, log) -> None:
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False
      log(f'profile of {self.traced} training steps in {self.directory}/plugins/profile: '
          f"TensorBoard's Profile tab")


def divergence(losses: np.ndarray, step: int, factor: float, num_classes: int) -> str | None:
  """What is wrong with a chunk's training losses [seeds, steps] that began after `step`,
  or None. Diverged means non-finite, or above `factor` times ln(num_classes): the loss of
  a uniform guess, which a learning run leaves behind within its first steps."""
  limit = factor * np.log(num_classes) if factor else np.inf
  bad = ~np.isfinite(losses) | (losses > limit)
  if not bad.any():
    return None
  first = int(np.argmax(bad.any(axis=0)))
  loss = float(losses[:, first][bad[:, first]][0])
  if not np.isfinite(loss):
    return f'non-finite training loss at step {step + first + 1}'
  return (f'training diverged: loss {loss:.4g} at step {step + first + 1} is above '
          f'divergence_factor={factor} x ln({num_classes}) = {limit:.4g}')


def divergence_advice(last_saved: int, started: bool, learning_rate: float) -> str:
  """What to do after a diverged run, given what it left on disk."""
  lower = f'rerun with a lower learning_rate (now {learning_rate})'
  if last_saved:
    return (f'the last good checkpoint (step {last_saved}) is kept: {lower} and '
            f'--allow_config_change to resume from it, or in a new --workdir')
  if not started:  # The workdir is as it was before the run.
    return f'nothing was written: {lower}'
  return (f'no checkpoint was written: {lower} and --allow_config_change to start over in '
          f'this workdir, or in a new --workdir')


FINAL_METRICS = ('test_accuracy', 'test_loss', 'test_accuracy_std', 'train_images_per_s')


def summary_line(results: dict, workdir: str | None = None) -> str:
  """The run's last line: its result, its time, and where everything is in `workdir`
  (without one, as a sweep says it: result and time only)."""
  accuracy = f'{100 * results["test_accuracy"]:.2f}%'
  if 'test_accuracy_std' in results:
    accuracy += f' ± {100 * results["test_accuracy_std"]:.2f} over {results["num_seeds"]} seeds'
  minutes, seconds = divmod(round(results['wall_time_s']), 60)
  line = f'test accuracy {accuracy} in {minutes} min {seconds} s'
  if workdir is None:
    return line
  return (f'done: {line}; results {os.path.join(workdir, "results.json")}; TensorBoard: '
          f'{venv_command("tensorboard")} --logdir {os.path.join(workdir, "tensorboard")}; '
          f'figures: {venv_command("python")} -m convnet.visualize --workdir {workdir}')


def seeds_counted(num_seeds: int) -> str:
  """Said after an images/s figure: with several seeds it counts every seed's images."""
  return f' (all {num_seeds} seeds)' if num_seeds > 1 else ''


def venv_command(name: str) -> str:
  """`name` as the user can type it: this Python's own (its venv's) unless `name` already
  finds it on PATH."""
  path = os.path.join(os.path.dirname(sys.executable), name)
  return name if not os.path.exists(path) or shutil.which(name) == path else path
