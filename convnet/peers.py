"""The same ConvNet in tf.keras and PyTorch, for side-by-side speed (convnet.benchmark).

Optional: `pip install -e ".[bench]"` brings tensorflow-cpu and a CPU build of torch.
Only what those frameworks express the same way is built (conv blocks without
normalisation, max/avg pooling, ReLU, dense layers, dropout); anything else, or a
framework that is not installed, is reported as skipped with the reason.
"""

import importlib.util
import os
import time

import numpy as np

from convnet import input_pipeline, shapes


# The shapes.Block fields the peers build, with the values they build (None: any); a
# block setting another field away from its default is not built (Block.unhandled), so a
# new option is never left out of a peer's model.
HANDLES = dict(filters=None, kernel_size=None, stride=None, dilation=None, padding=None,
               norm=('none',), norm_groups=None, pool=('max', 'avg', 'none'), pool_size=None,
               pool_stride=None)


def _unsupported(spec) -> str:
  """Why the peers cannot build spec's model (a config_lib.Spec), or ''."""
  for block in spec.model.blocks:
    field = block.unhandled(HANDLES)
    if field:
      return f'peers do not build model.{field}'
  if spec.model.activation != 'relu' or spec.optimizer != 'adam':
    return 'peers are built with ReLU and Adam only'
  if spec.label_smoothing:
    return 'peers train without label smoothing'
  return ''


def _inputs(data, num_images: int):
  """The first num_images training images normalised as the trainer does (float32), and
  their labels."""
  images = np.array(input_pipeline.normalize(data.train.images[:num_images], data.mean,
                                              data.std))
  return images, data.train.labels[:num_images].astype(np.int64)


def keras_model(spec):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  layers = [tf.keras.Input((28, 28, 1))]
  for block in spec.model.blocks:
    layers.append(tf.keras.layers.Conv2D(block.filters, block.kernel_size, block.stride,
                                         block.padding.lower(), activation='relu',
                                         dilation_rate=block.dilation))
    if block.pool != 'none':
      pool = (tf.keras.layers.MaxPooling2D if block.pool == 'max'
              else tf.keras.layers.AveragePooling2D)
      layers.append(pool(block.pool_size, block.pool_stride))
  layers.append(tf.keras.layers.Flatten())
  for width in spec.model.hidden:
    layers += [tf.keras.layers.Dropout(spec.model.dropout),
               tf.keras.layers.Dense(width, activation='relu')]
  layers += [tf.keras.layers.Dropout(spec.model.dropout),
             tf.keras.layers.Dense(spec.model.num_classes)]
  model = tf.keras.Sequential(layers)
  model.compile(optimizer=tf.keras.optimizers.Adam(spec.learning_rate),
                loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return model


def keras_trainer(spec, data, steps: int):
  """tf.keras `fit` over steps batches per call (images/s), after one warm-up epoch.

  Timed from fit's first step to its last, as the trainer's compiled chunk is: fit's
  set-up and teardown are left out. Its teardown of tf.data's autotuning sometimes
  waits until a fixed time after fit began, whatever the training took, which made a
  whole call's time two-valued (docs/performance.md).
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  class Steps(tf.keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
      self.start = time.perf_counter()

    def on_train_end(self, logs=None):
      self.seconds = time.perf_counter() - self.start

  model, timer = keras_model(spec), Steps()
  x, y = _inputs(data, steps * spec.batch_size)
  model.fit(x, y, batch_size=spec.batch_size, epochs=1, verbose=0)

  def repeat() -> float:
    model.fit(x, y, batch_size=spec.batch_size, epochs=1, verbose=0, callbacks=[timer])
    return len(y) / timer.seconds
  return repeat


def torch_model(spec):
  import torch  # pylint: disable=import-outside-toplevel
  blocks = spec.model.blocks
  layers, channels = [], 1
  for block in blocks:
    k, stride, padding = block.kernel_size, block.stride, block.padding
    if padding == 'SAME' and stride != 1:
      raise ValueError('SAME padding with stride > 1')
    layers += [torch.nn.Conv2d(channels, block.filters, k, stride,
                               padding='same' if padding == 'SAME' else 0,
                               dilation=block.dilation), torch.nn.ReLU()]
    if block.pool != 'none':
      pool = torch.nn.MaxPool2d if block.pool == 'max' else torch.nn.AvgPool2d
      layers.append(pool(block.pool_size, block.pool_stride))
    channels = block.filters
  size, _, channels = shapes.feature_shapes(blocks, (28, 28, 1))[-1]
  layers.append(torch.nn.Flatten())
  width = channels * size * size
  for hidden in spec.model.hidden:
    layers += [torch.nn.Dropout(spec.model.dropout), torch.nn.Linear(width, hidden),
               torch.nn.ReLU()]
    width = hidden
  layers += [torch.nn.Dropout(spec.model.dropout),
             torch.nn.Linear(width, spec.model.num_classes)]
  return torch.nn.Sequential(*layers)


def torch_device(jax_backend: str, cuda_available: bool) -> str:
  """Where PyTorch trains: on the GPU when JAX trains on one and PyTorch sees it, so the
  two are timed on the same device; else on every CPU core."""
  return 'cuda' if jax_backend == 'gpu' and cuda_available else 'cpu'


def torch_trainer(spec, data, steps: int):
  """A plain PyTorch loop (eager, NCHW) over steps batches per call (images/s), after one
  warm-up epoch, on the device torch_device picks."""
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count())
  device = torch_device(jax.default_backend(), torch.cuda.is_available())
  model = torch_model(spec).to(device)
  optimizer = torch.optim.Adam(model.parameters(), lr=spec.learning_rate)
  x, y = _inputs(data, steps * spec.batch_size)
  x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)
  y = torch.from_numpy(y).to(device)
  loss_fn = torch.nn.CrossEntropyLoss()

  def epoch():
    order = torch.randperm(len(y), device=device)
    for i in range(steps):
      idx = order[i * spec.batch_size:(i + 1) * spec.batch_size]
      optimizer.zero_grad()
      loss_fn(model(x[idx]), y[idx]).backward()
      optimizer.step()

  def finish():  # A GPU queues the steps: a timing ends when they are done.
    if device == 'cuda':
      torch.cuda.synchronize()

  model.train()
  epoch()  # Warm-up.
  finish()

  def repeat() -> float:
    start = time.perf_counter()
    epoch()
    finish()
    return len(y) / (time.perf_counter() - start)
  return repeat


NAMES = ('tf.keras', 'pytorch')
_MODULES = {'tf.keras': 'tensorflow', 'pytorch': 'torch'}
_TRAINERS = {'tf.keras': keras_trainer, 'pytorch': torch_trainer}


def trainers(spec, data, steps: int) -> tuple[dict, dict]:
  """({peer: a function that times one repeat}, {peer: why it is skipped})."""
  reason = _unsupported(spec)
  if reason:
    return {}, {name: reason for name in NAMES}
  runs, skipped = {}, {}
  for name in NAMES:
    if importlib.util.find_spec(_MODULES[name]) is None:
      skipped[name] = f'{_MODULES[name]} not installed (pip install -e ".[bench]")'
    else:
      runs[name] = _TRAINERS[name](spec, data, steps)
  return runs, skipped
