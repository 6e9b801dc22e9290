"""Figures, TensorBoard events, predict, the edge-filter demo and the Colab notebook."""

import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from configs import default
from convnet import predict, train, visualize
from experiments import edge_filter


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  """A small model trained to ~95% (2 epochs on 8,192 images)."""
  run_dir = tmp_path_factory.mktemp('trained') / 'run'
  config = default.get_config('smoke')
  config.num_epochs, config.data.num_train = 2, 8192
  results = train.train_and_evaluate(config, str(run_dir))
  assert results['test_accuracy'] > 0.9
  return run_dir


def png_size(path):
  assert os.path.getsize(path) > 1000, path
  with Image.open(path) as image:
    assert len(np.unique(np.asarray(image.convert('L')))) > 10, f'{path} is blank'
    return image.size


def test_every_figure_is_written_at_its_size(trained_run):
  paths = visualize.visualize(str(trained_run))
  names = [os.path.basename(p) for p in paths]
  assert names == ['filters.png', 'feature_maps.png', 'confusion_matrix.png',
                   'misclassified.png', 'curves.png']
  assert all(os.path.dirname(p) == str(trained_run / 'figures') for p in paths)
  sizes = dict(zip(names, map(png_size, paths)))
  assert sizes['filters.png'] == (1280, 220)  # 32 filters: 2 rows of 16, 80x90 px each
  assert sizes['feature_maps.png'] == (1170, 440)  # 4 digits x (input + 2 maps x 6 channels)
  assert sizes['confusion_matrix.png'] == (650, 550)
  assert sizes['misclassified.png'] == (1040, 400)  # 16 mistakes, 2 rows of 8
  assert sizes['curves.png'] == (1200, 500)


def test_feature_maps_follow_the_blocks_shapes(smoke_config, mnist):
  smoke_config.model.update(num_blocks=2, filters=(4, 8))
  model = train.build_model(smoke_config.model, axis_name=None)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  _, state = model.apply(variables, mnist.test.images[:3] / 255.0, mutable=['intermediates'])
  maps = visualize.feature_maps(state['intermediates'])
  assert [(name, m.shape) for name, m in maps] == [
      ('block 0 conv', (3, 28, 28, 4)), ('block 0 pool', (3, 14, 14, 4)),
      ('block 1 conv', (3, 14, 14, 8)), ('block 1 pool', (3, 7, 7, 8))]
  conv = maps[0][1]  # The pooled map is the max of each 2x2 window of the conv map.
  np.testing.assert_allclose(maps[1][1], conv.reshape(3, 14, 2, 14, 2, 4).max(axis=(2, 4)))


def test_confusion_matrix_counts():
  labels, predictions = np.array([0, 1, 1, 2, 2, 2]), np.array([0, 1, 2, 2, 2, 0])
  np.testing.assert_array_equal(visualize.confusion_matrix(labels, predictions, 3),
                                [[1, 0, 0], [0, 1, 1], [1, 0, 2]])


def read_scalar_tags(directory):
  """Scalar tags in TensorBoard event files, read as TFRecords without TensorFlow."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  tags = {}
  for name in os.listdir(directory):
    data = (directory / name).read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        kind = 'image' if value.HasField('image') else 'scalar'
        tags.setdefault(value.tag, []).append((kind, event.step))
  return tags


def test_tensorboard_events_hold_the_scalars_and_filter_images(trained_run):
  tags = read_scalar_tags(trained_run / 'tensorboard')
  for tag in ('train/loss', 'train/accuracy', 'eval/loss', 'eval/accuracy', 'learning_rate',
              'images_per_s'):
    assert tag in tags, tag
  assert [step for _, step in tags['eval/accuracy']] == [64, 128]
  assert [step for _, step in tags['train/loss']] == [64, 128]  # log_every_steps=100 > epoch
  assert tags['filters/layer0'] == [('image', 128)]


def test_predict_reads_pngs_like_mnist(trained_run, mnist, tmp_path):
  paths, labels = [], []
  for i in range(3):
    digit = mnist.test.images[i, ..., 0]
    path = tmp_path / f'digit{i}.png'
    Image.fromarray(digit).save(path)
    paths.append(str(path))
    # The same digit drawn dark on light and twice as large: converted back like MNIST.
    big = tmp_path / f'digit{i}_big.png'
    Image.fromarray(255 - digit).resize((56, 56)).save(big)
    paths.append(str(big))
    labels += [int(mnist.test.labels[i])] * 2
  predictions = predict.predict(str(trained_run), paths)
  assert [label for _, label, _ in predictions] == labels
  assert all(0.5 < p <= 1 for _, _, p in predictions)
  (tmp_path / 'broken.png').write_bytes(b'not a png')
  done = subprocess.run([sys.executable, '-m', 'convnet.predict', '--workdir', str(trained_run),
                         paths[0], str(tmp_path / 'broken.png')], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1
  assert 'broken.png: not a readable image' in done.stderr and 'Traceback' not in done.stderr


def test_edge_filters_light_up_strokes_and_pool_2x2(mnist):
  ones = mnist.test.images[np.flatnonzero(mnist.test.labels == 1)[:20]]
  conv, pooled = edge_filter.edge_responses(ones)
  assert conv.shape == (20, 28, 28, 2) and pooled.shape == (20, 14, 14, 2)
  # A "1" is a vertical stroke: the vertical-line filter responds more; turned
  # sideways, the horizontal-line filter does.
  peak = lambda maps: maps.max(axis=(1, 2)).mean()
  assert peak(conv[..., 0]) > 1.5 * peak(conv[..., 1])
  sideways, _ = edge_filter.edge_responses(np.swapaxes(ones, 1, 2))
  assert peak(sideways[..., 1]) > 1.5 * peak(sideways[..., 0])
  np.testing.assert_allclose(pooled, conv.reshape(20, 14, 2, 14, 2, 2).max(axis=(2, 4)))
  # The conv is the lesson's multiply-add over each 3x3 window (NumPy, SAME padding).
  image = np.pad(ones[0, ..., 0] / 255.0, 1)
  expected = np.array([[np.sum(image[i:i + 3, j:j + 3] * edge_filter.VERTICAL)
                        for j in range(28)] for i in range(28)])
  np.testing.assert_allclose(conv[0, ..., 0], expected, atol=1e-5)


def test_colab_notebook_runs_top_to_bottom_on_cpu(tmp_path):
  import nbclient  # pylint: disable=import-outside-toplevel
  import nbformat  # pylint: disable=import-outside-toplevel
  notebook = nbformat.read(os.path.join(REPO, 'notebooks', 'colab_tpu.ipynb'), as_version=4)
  os.environ['CONVNET_NOTEBOOK_SMOKE'] = '1'
  os.environ['CONVNET_NOTEBOOK_WORKDIR'] = str(tmp_path)
  try:
    nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                            resources={'metadata': {'path': REPO}}).execute()
  finally:
    del os.environ['CONVNET_NOTEBOOK_SMOKE'], os.environ['CONVNET_NOTEBOOK_WORKDIR']
  outputs = '\n'.join(o.get('text', '') for cell in notebook.cells if cell.cell_type == 'code'
                      for o in cell.outputs)
  assert 'test_accuracy' in outputs and 'model.filters | model.kernel_size' in outputs
  assert (tmp_path / 'default' / 'figures' / 'feature_maps.png').exists()
  assert (tmp_path / 'sweep' / 'heatmap.png').exists()
