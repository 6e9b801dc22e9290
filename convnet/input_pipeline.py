"""Data sources and batching.

Two sources behind `load_dataset`: a directory of MNIST-format IDX files (MNIST,
Fashion-MNIST, KMNIST, ...) and tfds (`tfds.data_source`, no TensorFlow needed; TFRecord
through `tfds.load` where TensorFlow is importable). Both give uint8 images [N, H, W, C]
and int32 labels [N]; the whole dataset fits in device memory, so batching, shuffling and
normalisation happen on the device (see train.py), from the functions here.
"""

import glob
import gzip
import importlib.util
import json
import logging
import math
import os
import socket
import stat
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

IDX_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
_IDX_UINT8 = 0x08
SHIPPED_MNIST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             'data', 'mnist')
TFDS_HOST = ('storage.googleapis.com', 443)  # Where tfds downloads prepared data from.
# tfds's notice as it probes a data dir without the dataset: load_tfds_split's error says so.
logging.getLogger('absl').addFilter(
    lambda record: 'has no dataset_info.json' not in record.getMessage())


class DataError(ValueError):
  """A data file or directory that cannot be used; the message names it."""


class Split(NamedTuple):
  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N]


class Dataset(NamedTuple):
  train: Split
  test: Split
  mean: tuple[float, ...]  # per channel, of the training images scaled to [0, 1]
  std: tuple[float, ...]


def check_path(path: str, kind: str) -> None:
  """DataError naming `path` if it is missing, unreachable for lack of permission, or not
  a `kind` ('file' or 'directory')."""
  try:
    is_dir = stat.S_ISDIR(os.stat(path).st_mode)
  except FileNotFoundError:
    raise DataError(f'{path}: {kind} not found') from None
  except PermissionError:
    raise DataError(f'{path}: permission denied (check the permissions of its directories)') \
        from None
  if is_dir != (kind == 'directory'):
    raise DataError(f'{path}: not a {kind}')
  if not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
    raise DataError(f'{path}: permission denied (cannot read this {kind})')


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file holding unsigned bytes, gzipped or not (whatever its name says)."""
  check_path(path, 'file')
  try:
    with open(path, 'rb') as f:
      gzipped = f.read(2) == b'\x1f\x8b'
    with (gzip.open if gzipped else open)(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError) as e:  # gzip raises these for truncated/corrupt files.
    raise DataError(f'{path}: cannot be read ({e})') from e
  if len(data) < 4 or data[0:2] != b'\0\0' or data[2] != _IDX_UINT8:
    raise DataError(f'{path}: not an IDX file of unsigned bytes '
                    f'(magic number {data[:4].hex() or "missing"}, expected 000008xx)')
  ndim = data[3]
  header = 4 + 4 * ndim
  dims = tuple(int(d) for d in np.frombuffer(data[4:header], dtype='>u4'))
  expected = math.prod(dims) if len(dims) == ndim else -1  # Exact, however large.
  if len(data) - header != expected:
    raise DataError(f'{path}: truncated or padded: header says shape {dims} '
                    f'({expected} bytes) but {len(data) - header} bytes follow it')
  return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def idx_path(directory: str, name: str) -> str:
  """The IDX file `name` (*.gz) in directory, or the same name without .gz (gunzipped)."""
  path = os.path.join(directory, name)
  unzipped = path.removesuffix('.gz')
  if not os.path.lexists(path) and os.path.lexists(unzipped):
    return unzipped
  if not os.path.lexists(path):
    raise DataError(f'{path}: file not found (nor {os.path.basename(unzipped)}, gunzipped)')
  return path


def load_idx_split(directory: str, split: str) -> Split:
  images_file, labels_file = (idx_path(directory, f) for f in IDX_FILES[split])
  images, labels = read_idx(images_file), read_idx(labels_file)
  if images.ndim != 3:
    raise DataError(f'{images_file}: expected 3 dimensions [N, H, W], got shape {images.shape}')
  if labels.ndim != 1:
    raise DataError(f'{labels_file}: expected 1 dimension [N], got shape {labels.shape}')
  if len(images) != len(labels):
    raise DataError(f'{images_file} has {len(images)} images but {labels_file} has '
                    f'{len(labels)} labels')
  return Split(images[..., None], labels.astype(np.int32))


def data_dir(source: str, directory: str) -> str | None:
  """data.dir as the loaders take it: '~' and $VARS expanded; '' is the source's default,
  the MNIST files shipped in data/mnist for 'idx' and tfds's own data dir (None) for 'tfds'."""
  directory = os.path.expandvars(os.path.expanduser(directory))
  if directory:
    return directory
  return SHIPPED_MNIST if source == 'idx' else None


def check_reachable(host: tuple[str, int], timeout: float = 15.0) -> str | None:
  """Why `host` cannot be reached within `timeout` seconds (DNS included), or None."""
  outcome = ['no answer within %d s' % timeout]

  def connect():
    try:
      socket.create_connection(host, timeout=timeout).close()
      outcome[0] = None
    except OSError as e:
      outcome[0] = str(e)

  thread = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout.
  thread.start()
  thread.join(timeout)
  return outcome[0]


def prepared_formats(name: str, directory: str) -> list[str]:
  """The file formats of the prepared versions of tfds dataset `name` ('mnist',
  'emnist/letters', 'mnist:3.0.1') under directory."""
  formats = []
  dataset, _, version = name.partition(':')
  pattern = os.path.join(directory, *dataset.split('/'), version or '*', 'dataset_info.json')
  for info in sorted(glob.glob(pattern)):
    try:
      with open(info) as f:
        formats.append(json.load(f).get('fileFormat', 'tfrecord').lower())
    except (OSError, ValueError):
      formats.append('unreadable')
  return formats


def tensorflow_importable() -> bool:
  """Whether TensorFlow can be imported (as on Colab): tfds.load needs it, data_source not."""
  return importlib.util.find_spec('tensorflow') is not None


def check_features(where: str, info, num_classes: int) -> None:
  """A tfds dataset's declared features: an 'image' and a 'label' of model.num_classes."""
  features = sorted(info.features.keys())
  missing = sorted({'image', 'label'} - set(features))
  if missing:
    raise DataError(f"{where}: has features {features} but no {missing}; data.source='tfds' "
                    f"reads image classification datasets")
  declared = getattr(info.features['label'], 'num_classes', None)
  if declared is not None and declared != num_classes:
    raise DataError(f'{where}: its labels have {declared} classes but model.num_classes='
                    f'{num_classes} (config key model.num_classes)')


def as_split(images, labels) -> Split:
  images = np.asarray(images, np.uint8)
  return Split(images[..., None] if images.ndim == 3 else images, np.asarray(labels, np.int32))


def load_tfds_split(name: str, split: str, directory: str | None, download: bool,
                    num_classes: int) -> Split:
  """Reads a whole split: through `tfds.data_source` (random access, no TensorFlow), or,
  for data prepared as TFRecord (what `tfds.load` writes), through `tfds.load` when
  TensorFlow is importable.

  With download, tfds's servers must answer first (offline, tfds retries DNS for
  minutes); a dataset that does not open is explained from what is prepared on disk."""
  import tensorflow_datasets as tfds  # Imported here: the IDX path never needs it.
  where = f'tfds dataset {name!r} in {directory or tfds.core.constants.DATA_DIR}'
  if download:
    problem = check_reachable(TFDS_HOST)
    if problem:
      raise DataError(f'{where}: data.download=True but {TFDS_HOST[0]} cannot be reached '
                      f'({problem}); prepare it where there is a network and set data.dir to '
                      f'that data dir')
  try:
    source = tfds.data_source(name, split=split, data_dir=directory, download=download)
  except Exception as e:  # tfds raises many types for a missing or unprepared dataset.
    formats = set(prepared_formats(name, directory or tfds.core.constants.DATA_DIR))
    if not formats and download:
      raise DataError(f'{where}: data.download=True, but downloading and preparing it '
                      f'failed: {e}') from e
    if not formats:
      raise DataError(f'{where}: not prepared there (config key data.dir); set '
                      f'data.download=True to download and prepare it, or data.dir to the '
                      f'tfds data dir holding it') from e
    if 'tfrecord' in formats and tensorflow_importable():
      return load_tfrecord_split(tfds, where, name, split, directory, num_classes)
    if not {'array_record', 'parquet'} & formats:
      raise DataError(f'{where}: prepared only as {", ".join(sorted(formats))}; TFRecord is '
                      f'read through TensorFlow, which is not importable here: install '
                      f'tensorflow, or prepare it with `tfds build {name} '
                      f'--file_format=array_record`') from e
    raise DataError(f'{where}, split {split!r}, cannot be opened: {e}') from e
  check_features(where, source.dataset_info, num_classes)
  records = [source[i] for i in range(len(source))]
  shapes = sorted({np.shape(r['image']) for r in records})
  if len(shapes) > 1:
    raise DataError(f'{where}, split {split!r}: its images come in {len(shapes)} shapes '
                    f'({shapes[0]}, {shapes[1]}, ...) but a batch needs one; use a variant of '
                    f'the dataset with one image size (such as imagenet_resized/32x32)')
  return as_split([r['image'] for r in records], [r['label'] for r in records])


def load_tfrecord_split(tfds, where: str, name: str, split: str, directory: str | None,
                        num_classes: int) -> Split:
  """A TFRecord-prepared split, read whole through `tfds.load` and TensorFlow."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:  # As flax's examples do: TensorFlow would otherwise reserve GPU memory JAX needs.
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TensorFlow already ran in this process: too late to hide them.
    pass
  try:
    batch, info = tfds.load(name, split=split, data_dir=directory, download=False,
                            batch_size=-1, with_info=True)
  except Exception as e:
    raise DataError(f'{where}, split {split!r}, prepared as tfrecord, cannot be read by '
                    f'tfds.load: {e}') from e
  check_features(where, info, num_classes)
  batch = tfds.as_numpy(batch)
  return as_split(batch['image'], batch['label'])


def load_splits(source: str, directory: str, name: str, num_classes: int,
                download: bool = False, splits=('train', 'test')) -> dict[str, Split]:
  """{split: Split} from 'idx' files or 'tfds', with every label checked."""
  directory = data_dir(source, directory)
  if source == 'idx':
    try:
      check_path(directory, 'directory')
    except DataError as e:
      raise DataError(f'{e} (config key data.dir)') from None
    loaded = {s: load_idx_split(directory, s) for s in splits}
    where = {s: idx_path(directory, IDX_FILES[s][1]) for s in splits}
  elif source == 'tfds':
    loaded = {s: load_tfds_split(name, s, directory, download, num_classes) for s in splits}
    where = {s: f'tfds {name}/{s}' for s in splits}
  else:
    raise DataError(f"data.source must be 'idx' or 'tfds', got {source!r}")
  for split_name, split in loaded.items():
    if len(split.labels) == 0:
      raise DataError(f'{where[split_name]}: split is empty')
    bad = (split.labels < 0) | (split.labels >= num_classes)
    if bad.any():
      i = int(np.argmax(bad))
      raise DataError(f'{where[split_name]}: label {split.labels[i]} at index {i} is outside '
                      f'[0, {num_classes}) (config key model.num_classes)')
  return loaded


def load_dataset(source: str, directory: str, name: str, num_classes: int,
                 download: bool = False) -> Dataset:
  """Loads train and test splits from 'idx' files or 'tfds', and checks the labels."""
  splits = load_splits(source, directory, name, num_classes, download)
  if splits['train'].images.shape[1:] != splits['test'].images.shape[1:]:
    raise DataError(f'train images are {splits["train"].images.shape[1:]} but test images '
                    f'are {splits["test"].images.shape[1:]}')
  mean, std = pixel_mean_std(splits['train'].images)
  return Dataset(splits['train'], splits['test'], mean, std)


def pixel_mean_std(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of [n, h, w, c] images scaled to [0, 1], from a histogram
  of the 256 uint8 values per channel: exact, and far faster than converting to float."""
  if images.dtype != np.uint8:
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(map(float, pixels.mean(axis=0))), tuple(map(float, pixels.std(axis=0)))
  means, stds = [], []
  values = np.arange(256) / 255.0
  # bincount widens its input to int64: in chunks of ~1M pixels, that copy stays in cache.
  rows = max(1, 2**20 // int(np.prod(images.shape[1:])))
  for c in range(images.shape[-1]):
    counts = np.zeros(256)
    for i in range(0, len(images), rows):
      counts += np.bincount(images[i:i + rows, ..., c].ravel(), minlength=256)
    mean = counts @ values / counts.sum()
    means.append(float(mean))
    stds.append(float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum())))
  return tuple(means), tuple(stds)


def normalize(images, mean, std):
  """uint8 [..., c] images -> float32 with the training set's per-channel mean 0 and std 1
  (runs on device); mean and std: one value per channel, or one for all."""
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


AUGMENTATIONS = ('none', 'shift', 'crop_flip')


def augment(images, key: jax.Array, kind: str, pixels, pad: int | None = None):
  """uint8 [b, h, w, c] images, each moved at random (on the device, inside the step).

  'shift': translated by up to `pixels` in each direction, the border filled with 0
  (MNIST's background); 'crop_flip': the same (pad with zeros and crop, the CIFAR
  standard) plus a horizontal flip of half the images; 'none' returns them as they are.
  `pixels` may be traced (the members of a vmapped sweep group move by their own), with
  `pad` >= every member's pixels: the same moves as pixels alone would make.
  """
  pad = pixels if pad is None else pad
  if kind == 'none' or (kind == 'shift' and not pad):
    return images
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  shift_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(shift_key, (b, 2), 0, 2 * pixels + 1) + (pad - pixels)
  moved = jax.vmap(lambda image, o: lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c)))(
      padded, offsets)
  if kind == 'crop_flip':
    flip = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1, 1))
    moved = jnp.where(flip, moved[:, :, ::-1], moved)
  return moved


def epoch_permutation(key: jax.Array, epoch, num_examples: int) -> jax.Array:
  """The order of the training set in `epoch`: a pure function of the seed and the epoch."""
  return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)


def pad_to_multiple(split: Split, multiple: int) -> tuple[Split, np.ndarray]:
  """Pads a split to a multiple of `multiple` examples; the mask marks the real ones."""
  n = len(split.labels)
  pad = -n % multiple
  mask = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
  images = np.concatenate([split.images, np.zeros((pad,) + split.images.shape[1:], np.uint8)])
  labels = np.concatenate([split.labels, np.zeros(pad, np.int32)])
  return Split(images, labels), mask
