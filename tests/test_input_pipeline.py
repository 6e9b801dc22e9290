"""Data sources: the shipped MNIST files, IDX error cases, tfds (mocked, and prepared from the
shipped digits in both of its file formats), order and padding."""

import gzip
import hashlib
import json
import os
import socket
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as mnist_builder

from convnet import input_pipeline
from convnet import workdir as workdir_lib
from conftest import MNIST_DIR, REPO, main_command


def test_shipped_mnist_matches_published_checksums():
  with open(os.path.join(MNIST_DIR, 'SHA256SUMS.uncompressed')) as f:
    sums = dict(reversed(line.split()) for line in f if line.strip())
  assert len(sums) == 4
  for name, digest in sums.items():
    with gzip.open(os.path.join(MNIST_DIR, name + '.gz'), 'rb') as f:
      assert hashlib.sha256(f.read()).hexdigest() == digest, name


def test_mnist_shapes_labels_and_normalisation_constants(mnist):
  assert mnist.train.images.shape == (60000, 28, 28, 1)
  assert mnist.test.images.shape == (10000, 28, 28, 1)
  assert mnist.train.images.dtype == np.uint8 and mnist.train.labels.dtype == np.int32
  assert np.bincount(mnist.test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958,
                                                      1028, 974, 1009]
  # The widely quoted MNIST constants (torchvision's Normalize((0.1307,), (0.3081,))).
  assert mnist.mean == pytest.approx((0.1307,), abs=1e-4)
  assert mnist.std == pytest.approx((0.3081,), abs=1e-4)
  x = np.asarray(input_pipeline.normalize(mnist.train.images[:20000], mnist.mean, mnist.std))
  assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01


def write_idx(path, array, magic=None, truncate=0):
  header = magic if magic is not None else bytes([0, 0, 8, array.ndim])
  header += np.array(array.shape, '>u4').tobytes()
  data = header + array.astype(np.uint8).tobytes()
  with gzip.open(path, 'wb') as f:
    f.write(data[:len(data) - truncate])


def make_idx_dir(directory, n_train=6, n_test=4, labels=None):
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  for split, n in (('train', n_train), ('test', n_test)):
    images_file, labels_file = input_pipeline.IDX_FILES[split]
    write_idx(os.path.join(directory, images_file), rng.integers(0, 256, (n, 28, 28)))
    write_idx(os.path.join(directory, labels_file),
              labels if labels is not None else rng.integers(0, 10, n))
  return directory


def test_idx_directory_round_trip(tmp_path):
  data = input_pipeline.load_dataset('idx', make_idx_dir(tmp_path), 'x', 10)
  assert data.train.images.shape == (6, 28, 28, 1) and data.test.labels.shape == (4,)


def test_gunzipped_idx_files_read_as_the_gzipped_ones(tmp_path):
  """`gunzip *.gz` (files without .gz), or a gunzipped file kept under its .gz name."""
  expected = input_pipeline.load_dataset('idx', make_idx_dir(tmp_path / 'gz'), 'x', 10)
  directory = make_idx_dir(tmp_path / 'mixed')
  for name, keep_name in (('train-images-idx3-ubyte.gz', False), ('t10k-labels-idx1-ubyte.gz', True)):
    path = os.path.join(directory, name)
    with gzip.open(path, 'rb') as f:
      raw = f.read()
    os.remove(path)
    with open(path if keep_name else path.removesuffix('.gz'), 'wb') as f:
      f.write(raw)
  data = input_pipeline.load_dataset('idx', directory, 'x', 10)
  for got, want in zip(jax.tree_util.tree_leaves(data), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(got, want)
  os.remove(os.path.join(directory, 'train-images-idx3-ubyte'))
  with pytest.raises(input_pipeline.DataError, match=r'train-images-idx3-ubyte.gz: file not found '
                                                      r'\(nor train-images-idx3-ubyte, gunzipped\)'):
    input_pipeline.load_dataset('idx', directory, 'x', 10)


def test_wrong_magic_number_names_the_file(tmp_path):
  directory = make_idx_dir(tmp_path)
  path = os.path.join(directory, 'train-images-idx3-ubyte.gz')
  write_idx(path, np.zeros((6, 28, 28)), magic=bytes([0, 0, 0x0D, 3]))  # float IDX
  with pytest.raises(input_pipeline.DataError, match='train-images-idx3-ubyte.gz.*magic'):
    input_pipeline.load_dataset('idx', directory, 'x', 10)


def test_truncated_file_names_the_file(tmp_path):
  directory = make_idx_dir(tmp_path)
  path = os.path.join(directory, 't10k-images-idx3-ubyte.gz')
  write_idx(path, np.zeros((4, 28, 28)), truncate=100)
  with pytest.raises(input_pipeline.DataError, match='t10k-images-idx3-ubyte.gz.*truncated'):
    input_pipeline.load_dataset('idx', directory, 'x', 10)


def test_truncated_gzip_stream_names_the_file(tmp_path):
  directory = make_idx_dir(tmp_path)
  path = os.path.join(directory, 'train-labels-idx1-ubyte.gz')
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(input_pipeline.DataError, match='train-labels-idx1-ubyte.gz.*cannot be read'):
    input_pipeline.load_dataset('idx', directory, 'x', 10)


def test_image_label_count_mismatch_names_both_files(tmp_path):
  directory = make_idx_dir(tmp_path)
  write_idx(os.path.join(directory, 'train-labels-idx1-ubyte.gz'), np.zeros(5))
  with pytest.raises(input_pipeline.DataError,
                     match='train-images-idx3-ubyte.gz has 6 images but .*train-labels'):
    input_pipeline.load_dataset('idx', directory, 'x', 10)


def test_label_outside_class_range_names_file_and_key(tmp_path):
  directory = make_idx_dir(tmp_path, labels=np.array([1, 2, 3, 12, 0, 0]), n_test=6)
  with pytest.raises(input_pipeline.DataError,
                     match=r'train-labels-idx1-ubyte.gz: label 12 at index 3.*model.num_classes'):
    input_pipeline.load_dataset('idx', directory, 'x', 10)


def test_missing_directory_and_missing_file(tmp_path):
  with pytest.raises(input_pipeline.DataError, match='nowhere: directory not found'):
    input_pipeline.load_dataset('idx', str(tmp_path / 'nowhere'), 'x', 10)
  directory = make_idx_dir(tmp_path / 'd')
  os.remove(os.path.join(directory, 't10k-labels-idx1-ubyte.gz'))
  with pytest.raises(input_pipeline.DataError, match='t10k-labels-idx1-ubyte.gz: file not found'):
    input_pipeline.load_dataset('idx', directory, 'x', 10)


def test_permission_problems_are_not_reported_as_missing_files(tmp_path, monkeypatch):
  """Root reads everything, so the kernel's answers are stood in for: a file in a
  directory without search permission (stat fails) and an unreadable file."""
  directory = os.fspath(make_idx_dir(tmp_path / 'd'))
  hidden = os.path.join(directory, 'train-images-idx3-ubyte.gz')
  real_stat, real_access = os.stat, os.access

  def stat(path, *args, **kwargs):
    if os.fspath(path) == hidden:
      raise PermissionError(13, 'Permission denied', path)
    return real_stat(path, *args, **kwargs)

  monkeypatch.setattr(os, 'stat', stat)
  with pytest.raises(input_pipeline.DataError,
                     match='train-images-idx3-ubyte.gz: permission denied .*directories'):
    input_pipeline.load_dataset('idx', directory, 'x', 10)
  monkeypatch.setattr(os, 'stat', real_stat)
  monkeypatch.setattr(os, 'access', lambda path, mode: os.fspath(path) != directory
                      and real_access(path, mode))
  with pytest.raises(input_pipeline.DataError,
                     match=r'/d: permission denied \(cannot read this directory\) \(config key'):
    input_pipeline.load_dataset('idx', directory, 'x', 10)
  monkeypatch.setattr(os, 'access', real_access)
  with pytest.raises(input_pipeline.DataError, match='train-images-idx3-ubyte.gz: not a directory'):
    input_pipeline.load_dataset('idx', hidden, 'x', 10)


def test_huge_idx_dimensions_report_exact_byte_counts(tmp_path):
  path = str(tmp_path / 'huge.gz')
  with gzip.open(path, 'wb') as f:  # Header: 3 dims of 2^32 - 1, then 10 bytes.
    f.write(bytes([0, 0, 8, 3]) + np.array([2**32 - 1] * 3, '>u4').tobytes() + bytes(10))
  with pytest.raises(input_pipeline.DataError, match=r'header says shape \(4294967295, '
                     r'4294967295, 4294967295\) \(79228162458924105385300197375 bytes\) but 10 '
                     r'bytes follow it'):
    input_pipeline.read_idx(path)


@pytest.mark.parametrize('name', ['mnist', 'fashion_mnist'])
def test_tfds_data_source_path(name):
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    data = input_pipeline.load_dataset('tfds', '', name, 10)
  assert data.train.images.shape == (12, 28, 28, 1) and data.train.images.dtype == np.uint8
  assert data.test.labels.shape == (12,) and data.test.labels.max() < 10


def test_tfds_without_prepared_data_is_a_clear_error_not_a_download(tmp_path):
  with pytest.raises(input_pipeline.DataError, match=f"tfds dataset 'mnist' in {tmp_path}: not "
                                                     f"prepared there .*data.download=True"):
    input_pipeline.load_dataset('tfds', str(tmp_path), 'mnist', 10, download=False)


def test_tfds_features_are_checked_against_the_config():
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(input_pipeline.DataError, match=(
        r"^tfds dataset 'imdb_reviews' in .*: has features \['label', 'text'\] but no "
        r"\['image'\]; data.source='tfds' reads image classification datasets$")):
      input_pipeline.load_dataset('tfds', '', 'imdb_reviews', 2)
    # Too many classes is no label out of range, but still not what the data says.
    with pytest.raises(input_pipeline.DataError, match=(
        r"^tfds dataset 'cifar10' in .*: its labels have 10 classes but model.num_classes=100 "
        r"\(config key model.num_classes\)$")):
      input_pipeline.load_dataset('tfds', '', 'cifar10', 100)
    with pytest.raises(input_pipeline.DataError, match=(
        r"^tfds dataset 'oxford_flowers102' in .*, split 'train': its images come in \d shapes "
        r"\(\(\d+, \d+, 3\), .*\) but a batch needs one; use a variant .* one image size")):
      input_pipeline.load_dataset('tfds', '', 'oxford_flowers102', 102)


PREPARED = {'train': 512, 'test': 256}  # How many shipped digits tfds prepares per split.


class ShippedDigits(mnist_builder.MNIST, skip_registration=True):
  """tfds's own `mnist` builder, fed the first shipped digits instead of a download."""
  name = 'mnist'

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in PREPARED}

  def _generate_examples(self, split):
    data = input_pipeline.load_idx_split(MNIST_DIR, split)
    for i in range(PREPARED[split]):
      yield i, {'image': data.images[i], 'label': int(data.labels[i])}


@pytest.fixture(scope='module')
def prepared_mnist(tmp_path_factory) -> dict[str, str]:
  """{file format: tfds data dir} holding those digits, as `tfds.load` (TFRecord) and as
  `tfds build --file_format=array_record` prepare them (both need TensorFlow to write)."""
  dirs = {}
  for file_format in ('tfrecord', 'array_record'):
    dirs[file_format] = str(tmp_path_factory.mktemp(file_format))
    ShippedDigits(data_dir=dirs[file_format], file_format=file_format).download_and_prepare()
  return dirs


def sorted_examples(split: input_pipeline.Split) -> np.ndarray:
  """A split's (label, pixels) rows in sorted order: tfds shuffles examples as it writes."""
  rows = np.concatenate([split.labels[:, None], split.images.reshape(len(split.labels), -1)], 1)
  return rows[np.lexsort(rows.T[::-1])]


def test_tfds_reads_tfrecord_through_tensorflow_and_array_record_without(prepared_mnist, mnist,
                                                                          monkeypatch):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  loads, hidden = [], []
  real_load = tfds.load
  monkeypatch.setattr(tfds, 'load', lambda *a, **k: loads.append(k['data_dir']) or
                      real_load(*a, **k))
  monkeypatch.setattr(tf.config, 'set_visible_devices', lambda *a: hidden.append(a))
  read = {file_format: input_pipeline.load_splits('tfds', directory, 'mnist', 10)
          for file_format, directory in prepared_mnist.items()}
  assert loads == [prepared_mnist['tfrecord']] * 2  # data_source reads array_record itself.
  assert hidden == [([], 'GPU')] * 2  # TensorFlow keeps its hands off JAX's GPU memory.
  for split, count in PREPARED.items():
    tfrecord, array_record = read['tfrecord'][split], read['array_record'][split]
    assert tfrecord.images.shape == (count, 28, 28, 1) and tfrecord.images.dtype == np.uint8
    assert tfrecord.labels.dtype == np.int32
    np.testing.assert_array_equal(tfrecord.images, array_record.images)  # Same order on disk.
    np.testing.assert_array_equal(tfrecord.labels, array_record.labels)
    shipped = getattr(mnist, split)
    np.testing.assert_array_equal(sorted_examples(tfrecord), sorted_examples(
        input_pipeline.Split(shipped.images[:count], shipped.labels[:count])))


def test_tfrecord_without_tensorflow_names_the_format_and_the_ways_out(prepared_mnist,
                                                                        monkeypatch):
  monkeypatch.setattr(input_pipeline, 'tensorflow_importable', lambda: False)
  monkeypatch.setattr(tfds, 'load', lambda *a, **k: pytest.fail('tfds.load was called'))
  with pytest.raises(input_pipeline.DataError, match=(
      f"^tfds dataset 'mnist' in {prepared_mnist['tfrecord']}: prepared only as tfrecord; "
      r"TFRecord is read through TensorFlow, which is not importable here: install "
      r"tensorflow, or prepare it with `tfds build mnist --file_format=array_record`$")):
    input_pipeline.load_dataset('tfds', prepared_mnist['tfrecord'], 'mnist', 10)
  with pytest.raises(input_pipeline.DataError, match=r"'mnist:3.0.1' in .*: prepared only as "
                                                     r"tfrecord;"):  # A version in the name.
    input_pipeline.load_dataset('tfds', prepared_mnist['tfrecord'], 'mnist:3.0.1', 10)


def test_main_trains_on_a_tfrecord_prepared_dataset(prepared_mnist, tmp_path):
  """What `tfds.load('mnist')` leaves in ~/tensorflow_datasets, trained on from the CLI."""
  workdir = tmp_path / 'run'
  done = subprocess.run(main_command(workdir, '--config.data.source=tfds',
                                     f'--config.data.dir={prepared_mnist["tfrecord"]}',
                                     '--config.data.num_train=0', '--config.num_epochs=3',
                                     '--config.progress=False'),
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  assert 'done: test accuracy' in done.stdout + done.stderr
  splits = input_pipeline.load_splits('tfds', prepared_mnist['array_record'], 'mnist', 10)
  recorded = json.loads((workdir / 'data.json').read_text())
  for split in PREPARED:  # It trained and tested on exactly the prepared digits.
    assert recorded[split] == workdir_lib.fingerprint(splits[split])
  assert json.loads((workdir / 'results.json').read_text())['test_accuracy'] > 0.5  # Chance: 0.1


def test_tfds_download_that_fails_says_so(tmp_path, monkeypatch):
  monkeypatch.setattr(input_pipeline, 'check_reachable', lambda host: None)  # "Online".

  def failing(*args, **kwargs):
    raise ModuleNotFoundError("No module named 'tensorflow'")  # What encoding images needs.

  monkeypatch.setattr(tfds, 'data_source', failing)
  with pytest.raises(input_pipeline.DataError, match=(
      f"^tfds dataset 'mnist' in {tmp_path}: data.download=True, but downloading and "
      f"preparing it failed: No module named 'tensorflow'$")):
    input_pipeline.load_dataset('tfds', str(tmp_path), 'mnist', 10, download=True)


def test_tfds_download_offline_fails_fast_naming_the_host(tmp_path, monkeypatch):
  attempts = []

  def offline(address, timeout=None):
    attempts.append((address, timeout))
    raise socket.gaierror(-3, 'Temporary failure in name resolution')

  monkeypatch.setattr(socket, 'create_connection', offline)
  monkeypatch.setattr(tfds, 'data_source', lambda *a, **k: pytest.fail('tfds was called'))
  with pytest.raises(input_pipeline.DataError, match=r'data.download=True but '
                     r'storage.googleapis.com cannot be reached \(.*name resolution\)'):
    input_pipeline.load_dataset('tfds', str(tmp_path), 'mnist', 10, download=True)
  assert attempts == [(('storage.googleapis.com', 443), 15.0)]


def test_data_dir_expands_and_defaults_per_source(monkeypatch):
  monkeypatch.setenv('HOME', '/home/someone')
  monkeypatch.setenv('DATA', '/mnt/data')
  assert input_pipeline.data_dir('tfds', '~/tensorflow_datasets') == (
      '/home/someone/tensorflow_datasets')
  assert input_pipeline.data_dir('idx', '$DATA/fashion') == '/mnt/data/fashion'
  assert input_pipeline.data_dir('tfds', '') is None  # tfds's own data dir
  assert input_pipeline.data_dir('idx', '') == MNIST_DIR  # The shipped files.


def test_epoch_permutation_is_a_seeded_permutation():
  key = jax.random.key(3)
  first = np.asarray(input_pipeline.epoch_permutation(key, 0, 1000))
  assert sorted(first.tolist()) == list(range(1000))
  np.testing.assert_array_equal(first, input_pipeline.epoch_permutation(jax.random.key(3), 0, 1000))
  assert not np.array_equal(first, input_pipeline.epoch_permutation(key, 1, 1000))


def test_pad_to_multiple_masks_the_padding(mnist):
  split = input_pipeline.Split(mnist.test.images[:10], mnist.test.labels[:10])
  padded, mask = input_pipeline.pad_to_multiple(split, 4)
  assert len(padded.labels) == 12 and mask.tolist() == [True] * 10 + [False] * 2
  np.testing.assert_array_equal(padded.images[:10], split.images)


def test_pixel_mean_std_from_the_histogram_equals_numpy_on_the_pixels(mnist):
  pixels = mnist.train.images.astype(np.float64) / 255.0
  assert abs(mnist.mean[0] - pixels.mean()) < 1e-12 and abs(mnist.std[0] - pixels.std()) < 1e-12
  assert 0.13 < mnist.mean[0] < 0.131 and 0.308 < mnist.std[0] < 0.309  # MNIST's known values
  rgb = np.random.default_rng(0).integers(0, 256, (50, 8, 8, 3)).astype(np.uint8)
  rgb[..., 2] //= 4  # Per channel: the blue channel is darker.
  mean, std = input_pipeline.pixel_mean_std(rgb)
  reference = rgb.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(mean, reference.mean(axis=0), atol=1e-12)
  np.testing.assert_allclose(std, reference.std(axis=0), atol=1e-12)
  mean, std = input_pipeline.pixel_mean_std(np.array([[[0], [255]]], np.int32))  # not uint8
  assert (mean, std) == ((0.5,), (0.5,))


@pytest.mark.parametrize('kind', ['shift', 'crop_flip'])
def test_augment_moves_each_image_within_its_range(mnist, kind):
  images = mnist.train.images[:64]
  moved = np.asarray(input_pipeline.augment(jnp.asarray(images), jax.random.key(0), kind, 2))
  assert moved.shape == images.shape and moved.dtype == np.uint8
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))  # NumPy reference: zero border.
  flips = (False, True) if kind == 'crop_flip' else (False,)
  offsets, flipped = set(), 0
  for image, out in zip(padded, moved):
    matches = [(dy, dx, flip) for dy in range(5) for dx in range(5) for flip in flips
               if np.array_equal(out, image[dy:dy + 28, dx:dx + 28][:, ::-1] if flip
                                 else image[dy:dy + 28, dx:dx + 28])]
    assert matches, 'an image that is no move of its input'
    offsets.add(matches[0][:2])
    flipped += all(flip for _, _, flip in matches)
  assert len(offsets) > 10  # Moves drawn per image, not one for the batch.
  if kind == 'crop_flip':
    assert 10 < flipped < 54
  np.testing.assert_array_equal(  # Keyed: the same key draws the same moves.
      input_pipeline.augment(jnp.asarray(images), jax.random.key(0), kind, 2), moved)
  assert input_pipeline.augment(images, jax.random.key(0), 'none', 2) is images


def test_augment_with_traced_pixels_moves_as_those_pixels_do(mnist):
  """Members of a vmapped sweep group move their images by their own data.augment_pixels
  (traced) inside one padding (`pad`, the group's largest): the moves the member's own
  pixels make alone, and no move at 0."""
  images = jnp.asarray(mnist.train.images[:64])
  key = jax.random.key(3)
  moved = jax.jit(jax.vmap(lambda pixels: input_pipeline.augment(
      images, key, 'crop_flip', pixels, pad=3)))(jnp.array([0, 1, 3]))
  for pixels, ours in zip([1, 3], moved[1:]):
    np.testing.assert_array_equal(ours, input_pipeline.augment(images, key, 'crop_flip', pixels))
  flips = np.asarray(moved[0]) != np.asarray(images)
  np.testing.assert_array_equal(  # Pixels 0: only the flips, as crop_flip with 0 pixels.
      moved[0], input_pipeline.augment(images, key, 'crop_flip', 0))
  assert flips.any()
