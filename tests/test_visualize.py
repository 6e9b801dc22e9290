"""Figures, TensorBoard events, predict, the edge-filter demo and the Colab notebook."""

import fnmatch
import importlib.metadata
import io
import json
import os
import struct
import subprocess
import sys
import tomllib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

from conftest import REPO
from configs import default
from convnet import (config_lib, inference, input_pipeline, metric_writer, models, ops,
                     predict, train, visualize, workdir)
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


def test_every_figure_is_written_at_its_size(trained_run, monkeypatch):
  monkeypatch.setattr(train, 'load_data', lambda config: pytest.fail('training set loaded'))
  paths = visualize.visualize(str(trained_run))  # From the workdir and the test split alone.
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


def test_visualize_refuses_a_test_split_other_than_the_runs(trained_run, mnist, monkeypatch):
  fewer = {'test': input_pipeline.Split(mnist.test.images[:100], mnist.test.labels[:100])}
  monkeypatch.setattr(input_pipeline, 'load_splits', lambda *args, **kwargs: fewer)
  with pytest.raises(workdir.ConfigMismatchError, match=r'is not the one .* was evaluated on '
                                                        r'\(test count: 10000 -> 100; '):
    visualize.visualize(str(trained_run))


def test_feature_maps_follow_the_blocks_shapes(smoke_config, mnist):
  """Whole maps even from a model on the CPU kernels (which skip outputs nothing reads)."""
  smoke_config.model.update(num_blocks=2, filters=(4, 8), ops='cpu')
  model = train.build_model(config_lib.read(smoke_config).model, axis_name=None)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  maps = models.feature_maps(model, variables, mnist.test.images[:3] / 255.0)
  assert [(name, m.shape) for name, m in maps] == [
      ('block 0 conv', (3, 28, 28, 4)), ('block 0 pool', (3, 14, 14, 4)),
      ('block 1 conv', (3, 14, 14, 8)), ('block 1 pool', (3, 7, 7, 8))]
  conv = np.asarray(maps[0][1])  # The pooled map is the max of each 2x2 window of the conv map.
  np.testing.assert_allclose(maps[1][1], conv.reshape(3, 14, 2, 14, 2, 4).max(axis=(2, 4)))


def test_visualize_runs_the_trained_forward_pass_from_the_workdir_alone(trained_run, mnist,
                                                                       monkeypatch):
  """Logits as model.apply computes them with the run's own kernels; the feature maps from
  the same parameters; the training set never read (only data.json's statistics)."""
  monkeypatch.setattr(train, 'load_data', lambda config: pytest.fail('training set loaded'))
  trained = inference.Trained(str(trained_run))
  images = mnist.test.images[:50]
  model = train.build_model(trained.spec.model, axis_name=None)
  assert trained.model.ops == model.ops and model.ops.backend == 'cpu'
  # The statistics it normalised with: those of the 8,192 training images it trained on.
  mean, std = input_pipeline.pixel_mean_std(mnist.train.images[:8192])
  assert (trained.data['mean'], trained.data['std']) == (list(mean), list(std))
  x = (images / 255.0 - mean) / std
  np.testing.assert_allclose(trained.apply(images), model.apply(trained.variables, x),
                             rtol=1e-5, atol=1e-5)
  _, kept = trained.model.clone(ops=ops.Ops()).apply(trained.variables, x[:4],
                                                      mutable=['intermediates'])
  maps = trained.feature_maps(images[:4])
  assert len(maps) == 2 * len(kept['intermediates'])
  for name, fmap in maps:
    _, block, kind = name.split()
    np.testing.assert_allclose(fmap, kept['intermediates'][f'ConvBlock_{block}'][kind][0],
                               rtol=1e-5, atol=1e-5)


def test_confusion_matrix_counts():
  labels, predictions = np.array([0, 1, 1, 2, 2, 2]), np.array([0, 1, 2, 2, 2, 0])
  np.testing.assert_array_equal(visualize.confusion_matrix(labels, predictions, 3),
                                [[1, 0, 0], [0, 1, 1], [1, 0, 2]])


def read_events(directory):
  """{tag: [(step, value)]} from every TensorBoard event file under directory, read as
  TFRecords without TensorFlow: a scalar's float, an image's decoded array, or the hparams
  plugin's data."""
  from tensorboardX.proto import event_pb2, plugin_hparams_pb2  # pylint: disable=C0415
  events = {}
  for path in sorted(directory.rglob('events.out.tfevents.*')):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        if value.HasField('image'):
          with Image.open(io.BytesIO(value.image.encoded_image_string)) as image:
            assert image.size == (value.image.width, value.image.height)
            content = np.asarray(image)
        elif value.metadata.plugin_data.plugin_name == 'hparams':
          content = plugin_hparams_pb2.HParamsPluginData.FromString(
              value.metadata.plugin_data.content)
        else:
          content = value.simple_value
        events.setdefault(value.tag, []).append((event.step, content))
  return events


def test_tensorboard_holds_scalars_filter_grids_end_images_and_hparams(trained_run, mnist):
  events = read_events(trained_run / 'tensorboard')
  for tag in ('train/loss', 'train/accuracy', 'eval/loss', 'eval/accuracy', 'learning_rate',
              'images_per_s'):
    assert tag in events, tag
  assert [step for step, _ in events['eval/accuracy']] == [64, 128]
  assert [step for step, _ in events['train/loss']] == [64, 128]  # log_every_steps=100 > epoch
  # 32 3x3 filters at each epoch: 2 rows of 16 cells of 24x24 pixels, 2-pixel gaps.
  assert [(step, grid.shape) for step, grid in events['filters/layer0']] == [
      (64, (50, 414, 3)), (128, (50, 414, 3))]
  # At the end: 4 test digits x 8 channels of each map, each map 56x56 pixels.
  trained = inference.Trained(str(trained_run))
  digits = mnist.test.images[[int(np.flatnonzero(mnist.test.labels == d)[0]) for d in range(4)]]
  for name, fmap in trained.feature_maps(digits):
    [(step, grid)] = events[f'feature_maps/{name.replace(" ", "_")}']
    assert (step, grid.shape) == (128, (230, 462, 3))
    last = fmap[3, :, :, 7]  # The last digit's 8th channel, scaled to its range.
    last = (last - last.min()) / (last.max() - last.min())
    factor = 56 // len(last)
    np.testing.assert_allclose(grid[-56:, -56:, 0] / 255, np.kron(last, np.ones((factor, factor))),
                               atol=1.5 / 255)
  # The confusion matrix: 10x10 cells of 24 pixels, the trained model's test predictions.
  [(step, image)] = events['eval/confusion_matrix']
  predictions = np.concatenate([np.asarray(trained.apply(mnist.test.images[i:i + 2000])).argmax(-1)
                                for i in range(0, 10000, 2000)])
  expected = metric_writer.heatmap(visualize.confusion_matrix(mnist.test.labels, predictions, 10))
  assert (step, image.shape) == (128, (249, 249, 3))
  np.testing.assert_allclose(image / 255, expected, atol=1.5 / 255)
  # The hparams plugin, in the run's own event file (one run in TensorBoard): the config
  # keys that change results at the start, the final metrics at the end.
  assert [p.parent for p in (trained_run / 'tensorboard').rglob('events.out.tfevents.*')] == [
      trained_run / 'tensorboard']
  [(_, start)] = events['_hparams_/session_start_info']
  hparams = start.session_start_info.hparams
  assert hparams['num_epochs'].number_value == 2
  assert hparams['model.pool'].string_value == 'max'  # A one-block tuple: its value.
  assert hparams['data.num_train'].number_value == 8192
  assert hparams['model.filters'].number_value == 32
  assert 'log_every_steps' not in hparams and 'progress' not in hparams
  assert metric_writer.hparam_values({'model': {'filters': (32, 64)}}) == {
      'model.filters': '[32, 64]'}
  results = json.loads((trained_run / 'results.json').read_text())
  assert events['hparams/test_accuracy'] == [(128, pytest.approx(results['test_accuracy']))]
  [(_, experiment)] = events['_hparams_/experiment']
  assert {m.name.tag for m in experiment.experiment.metric_infos} == {
      'hparams/test_accuracy', 'hparams/test_loss', 'hparams/train_images_per_s'}


def test_filter_grid_cells_gaps_and_shared_scale():
  kernel = np.zeros((2, 2, 1, 3), np.float32)
  kernel[0, 0, 0, 0], kernel[1, 1, 0, 2] = 0.5, -2.0  # Filter 2 sets the scale for all.
  grid = metric_writer.filter_grid(kernel, cell=4)
  assert grid.shape == (4, 3 * 4 + 2 * 2, 3)  # 3 cells of 4x4 pixels (2x upscale), gaps.
  np.testing.assert_allclose(grid[:2, :2], [[[1, 0.75, 0.75]] * 2] * 2)  # 0.5 / 2: light red
  np.testing.assert_allclose(grid[2:, 14:], [[[0, 0, 1]] * 2] * 2)  # -2 / 2: full blue
  np.testing.assert_allclose(grid[:, 4:6], 0.3)  # A gap
  np.testing.assert_allclose(grid[:, 6:10], 1.0)  # An all-zero filter is white
  rgb = metric_writer.filter_grid(np.ones((3, 3, 3, 2)), rgb=True)
  np.testing.assert_allclose(rgb[:24, :24], 1.0)  # Three input channels as colours.


def drawing(digit: np.ndarray, seed: int) -> np.ndarray:
  """An MNIST digit as a person's drawing: dark ink on white, 5x larger, off-centre on a
  bigger canvas."""
  rng = np.random.default_rng(seed)
  big = np.asarray(Image.fromarray(digit).resize((140, 140), Image.Resampling.BILINEAR))
  canvas = np.full((220, 260), 255, np.uint8)
  top, left = rng.integers(0, 80), rng.integers(0, 120)
  canvas[top:top + 140, left:left + 140] = 255 - big
  return canvas


def ink_box(image: np.ndarray) -> tuple[int, int]:
  rows, cols = np.nonzero(image > 0.2 * image.max())
  return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def test_mnist_preprocessing_crops_fits_20x20_and_centres_by_mass(mnist):
  """Each step against a NumPy reference, on real digits drawn dark on white off-centre."""
  for i in range(10):
    digit = mnist.test.images[i, ..., 0]
    ink = predict.ink_on_black(Image.fromarray(drawing(digit, i)))
    assert np.median(ink[0]) == 0 and ink.max() >= 250  # Inverted: ink bright, paper black.
    out = predict.mnist_like(ink)
    assert out.shape == (28, 28) and out.dtype == np.uint8
    height, width = ink_box(out.astype(float))
    assert max(height, width) in (19, 20, 21) and min(height, width) <= 21  # Fits 20x20.
    want_h, want_w = ink_box(digit.astype(float))
    assert abs(height / width - want_h / want_w) < 0.2 * (want_h / want_w)  # Aspect kept.
    mass = out.astype(float)
    com = [(mass.sum(axis=1 - a) @ np.arange(28)) / mass.sum() for a in (0, 1)]
    assert np.allclose(com, 13.5, atol=0.75), com  # Centre of mass at the centre.


def save_variants(digit: np.ndarray, directory, i: int) -> dict[str, str]:
  """{kind: path} of the digit as an RGB drawing, as RGBA with the ink only in alpha, and
  as a JPEG stored sideways with an EXIF orientation that puts it upright."""
  paper = drawing(digit, i)
  paths = {kind: str(directory / f'{i}_{kind}') for kind in ('rgb.png', 'alpha.png', 'exif.jpg')}
  Image.fromarray(paper).convert('RGB').save(paths['rgb.png'])
  rgba = np.zeros(paper.shape + (4,), np.uint8)
  rgba[..., 3] = 255 - paper  # Black ink, transparent paper.
  Image.fromarray(rgba, 'RGBA').save(paths['alpha.png'])
  exif = Image.Exif()
  exif[0x0112] = 6  # "Rotate 90 CW to display": stored turned 90 degrees counter-clockwise.
  Image.fromarray(paper).rotate(90, expand=True).save(paths['exif.jpg'], quality=95,
                                                      exif=exif.tobytes())
  return paths


def test_predict_reads_drawings_as_well_as_the_digits_themselves(trained_run, mnist, tmp_path):
  count = 30
  digits, labels = mnist.test.images[:count], mnist.test.labels[:count]
  direct = np.asarray(inference.Trained(str(trained_run)).apply(digits)).argmax(-1)
  direct_right = np.mean(direct == labels)
  (tmp_path / 'drawings').mkdir()
  variants = [save_variants(digits[i, ..., 0], tmp_path / 'drawings', i) for i in range(count)]
  for kind in ('rgb.png', 'alpha.png', 'exif.jpg'):
    results = predict.predict(str(trained_run), [v[kind] for v in variants])
    right = np.mean([r['label'] for r in results] == labels)
    assert right >= direct_right - 0.1, (kind, right, direct_right)
  assert results[0]['top3'][0] == [results[0]['label'], results[0]['probability']]
  assert len(results[0]['top3']) == 3
  # A plain resize reads these drawings far worse: the preprocessing is what helps.
  resized = predict.predict(str(trained_run), [v['rgb.png'] for v in variants], 'resize')
  assert np.mean([r['label'] for r in resized] == labels) < direct_right - 0.2


def test_predict_command_reads_directories_and_names_bad_files(trained_run, mnist, tmp_path):
  drawings = tmp_path / 'drawings'
  drawings.mkdir()
  save_variants(mnist.test.images[0, ..., 0], drawings, 0)
  command = [sys.executable, '-m', 'convnet.predict', '--workdir', str(trained_run)]
  done = subprocess.run(command + ['--json', str(drawings)], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  rows = json.loads(done.stdout)
  assert [os.path.basename(r['path']) for r in rows] == ['0_alpha.png', '0_exif.jpg',
                                                          '0_rgb.png']
  assert 'orbax' not in done.stderr.lower() and 'INFO' not in done.stderr
  assert predict.table(rows).splitlines()[0].split() == ['path', 'label', 'probability',
                                                          'top', '3']
  (tmp_path / 'broken.png').write_bytes(b'not a png')
  done = subprocess.run(command + [str(drawings / '0_rgb.png'), str(tmp_path / 'broken.png')],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 1 and 'broken.png: not a readable image' in done.stderr
  assert 'Traceback' not in done.stderr and len(done.stderr.strip().splitlines()) == 1
  Image.new('L', (8000, 7000)).save(tmp_path / 'huge.png')
  Image.new('L', (40, 40), 255).save(tmp_path / 'blank.png')
  for name, message in [('huge.png', 'huge.png: 8000x7000 pixels is more than'),
                        ('blank.png', 'blank.png: no ink found'),
                        ('missing.png', 'missing.png: file not found')]:
    with pytest.raises(predict.ImageError, match=message):
      predict.predict(str(trained_run), [str(drawings / '0_rgb.png'), str(tmp_path / name)])


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


@pytest.mark.parametrize('name,image_shape,augment', [('cifar10', (32, 32, 3), 'crop_flip'),
                                                       ('fashion_mnist', (28, 28, 1), 'shift')])
def test_tfds_datasets_of_any_size_and_colour_flow_through_everything(smoke_config, tmp_path,
                                                                      name, image_shape,
                                                                      augment):
  """CIFAR-10's and Fashion-MNIST's shapes (mocked tfds) with augmentation: trained, the
  same logits from both kernel backends, per-channel statistics, figures and predict."""
  smoke_config.data.update(source='tfds', name=name, dir=str(tmp_path / 'tfds'),
                           num_train=0, augment=augment, augment_pixels=4)
  smoke_config.update(batch_size=32, eval_batch_size=32)
  run_dir = tmp_path / 'run'
  with tfds.testing.mock_data(num_examples=128, policy=tfds.testing.MockPolicy.USE_CODE):
    results = train.train_and_evaluate(smoke_config, str(run_dir))
    splits = input_pipeline.load_splits('tfds', '', name, 10)
    paths = visualize.visualize(str(run_dir))
  test = splits['test']
  assert results['test_count'] == 128
  data = json.loads((run_dir / 'data.json').read_text())
  assert data['image_shape'] == list(image_shape)
  pixels = splits['train'].images.reshape(-1, image_shape[-1]) / 255  # One row per pixel.
  np.testing.assert_allclose(data['mean'], pixels.mean(axis=0), rtol=1e-9)
  np.testing.assert_allclose(data['std'], pixels.std(axis=0), rtol=1e-9)
  trained = inference.Trained(str(run_dir))
  assert trained.model.ops.backend == 'cpu'
  xla = trained.model.clone(ops=ops.make('xla'))
  np.testing.assert_allclose(trained.apply(test.images[:16]),
                             xla.apply(trained.variables, trained.normalize(test.images[:16])),
                             rtol=1e-4, atol=1e-4)
  h = image_shape[0]
  assert [m.shape for _, m in trained.feature_maps(test.images[:2])] == [
      (2, h, h, 32), (2, h // 2, h // 2, 32)]
  assert all(png_size(path) for path in paths)
  Image.fromarray(test.images[0].squeeze()).resize((100, 80)).save(tmp_path / 'photo.png')
  [row] = predict.predict(str(run_dir), [str(tmp_path / 'photo.png')])  # Its default steps.
  assert 0 <= row['label'] < 10 and len(row['top3']) == 3


def colab_notebook():
  """notebooks/colab_tpu.ipynb as nbformat reads it."""
  import nbformat  # pylint: disable=import-outside-toplevel
  return nbformat.read(os.path.join(REPO, 'notebooks', 'colab_tpu.ipynb'), as_version=4)


def test_colab_notebook_text_has_no_placeholder_and_keeps_the_runtimes_jax():
  notebook = colab_notebook()
  code = '\n'.join(cell.source for cell in notebook.cells if cell.cell_type == 'code')
  assert 'YOUR-' not in code and 'example.com' not in code
  assert "REPO = ''  # @param" in code  # A form field; empty means the clone it runs in.
  for pin in ('jax[cpu]', 'jax==', 'jaxlib=='):
    assert pin not in code, pin
  assert "'tpu': 'jax[tpu]', 'gpu': 'jax[cuda12]'" in code
  assert "'-c', '/tmp/keep_runtime.txt'" in code
  assert 'download=True' in code.split('if USE_TFDS:')[1]  # Only where tfds is asked for.
  assert code.count('download=True') == 1


def colab_freeze(runtime: str) -> list[str]:
  """What `pip freeze` prints on Colab's cpu, gpu or tpu runtime, for the packages convnet
  and the notebook touch (tests/colab/: jax, flax, TensorFlow, torch, ...)."""
  with open(os.path.join(REPO, 'tests', 'colab', f'{runtime}.txt')) as f:
    return [line.strip() for line in f if line.strip() and not line.startswith('#')]


def run_install_cell(*, freeze, environ=None, devices=(), nvidia=False, backend='cpu',
                     pip_installed=False):
  """Executes the notebook's install cell on a faked runtime whose `pip freeze` prints the
  lines `freeze`: (pip commands, constraints file text, printed lines). Nothing is
  installed; what the cell would run is recorded."""
  notebook = colab_notebook()
  [cell] = [c for c in notebook.cells if c.get('id') == 'cell-02']
  pips, written, printed = [], {}, []

  def run(command, **kwargs):
    if command[0] == 'nvidia-smi':
      if not nvidia:
        raise FileNotFoundError('nvidia-smi')
      return subprocess.CompletedProcess(command, 0, 'GPU 0: Tesla T4', '')
    if command[1] == '-c':  # What backend the runtime's jax finds.
      return subprocess.CompletedProcess(command, 0, backend + '\n', '')
    if command[3] == 'freeze':
      return subprocess.CompletedProcess(command, 0, '\n'.join(freeze) + '\n', '')
    pips.append(command[3:])
    return subprocess.CompletedProcess(command, 0, '', '')

  def version(name):
    if name == 'convnet' and pip_installed:
      return '0.1.0'
    raise importlib.metadata.PackageNotFoundError(name)

  class File(io.StringIO):
    def __init__(self, path, mode):
      super().__init__()
      self.path = path

    def __exit__(self, *exc):
      written[self.path] = self.getvalue()

  fake = types.SimpleNamespace
  namespace = {
      'os': fake(environ=environ or {}),
      'glob': fake(glob=lambda pattern: [d for d in devices if fnmatch.fnmatch(d, pattern)]),
      'subprocess': fake(run=run),
      'sys': fake(executable='/usr/bin/python3'),
      'importlib': fake(metadata=fake(
          version=version, PackageNotFoundError=importlib.metadata.PackageNotFoundError)),
      'open': File, 'print': lambda *a: printed.append(' '.join(map(str, a))),
      'ROOT': '/content/convnet'}
  exec(cell.source, namespace)  # pylint: disable=exec-used
  return pips, written.get('/tmp/keep_runtime.txt'), printed


@pytest.mark.parametrize('runtime, fakes, jax_install', [
    ('tpu', dict(environ={'TPU_ACCELERATOR_TYPE': 'v5litepod-1'}, backend='cpu'), 'jax[tpu]'),
    ('tpu', dict(devices=['/dev/vfio/0', '/dev/vfio/vfio'], backend='tpu'), None),
    ('tpu', dict(devices=['/dev/accel0'], backend='cpu'), 'jax[tpu]'),
    ('gpu', dict(nvidia=True, backend='gpu'), None),
    ('gpu', dict(nvidia=True, backend='cpu'), 'jax[cuda12]'),
    ('cpu', dict(devices=['/dev/vfio/vfio']), None),  # The control node alone is no TPU.
])
def test_colab_install_cell_keeps_or_installs_the_accelerator_jax(runtime, fakes, jax_install):
  freeze = colab_freeze(runtime)
  pips, constraints, printed = run_install_cell(freeze=freeze, **fakes)
  assert printed == [f'runtime: {runtime}']
  expected = [['install', '-q', '-U', jax_install]] if jax_install else []
  expected.append(['install', '-q', '-e', '/content/convnet', '-c', '/tmp/keep_runtime.txt'])
  assert pips == expected
  # Every package the runtime has stays at its version (jax and its accelerator build,
  # numpy under TensorFlow and torch); a wheel URL is no constraint pip takes.
  pinned = constraints.split('\n')
  assert pinned == [line for line in freeze if ' @ ' not in line]
  assert 'jax==0.7.2' in pinned and 'flax==0.11.2' in pinned and 'numpy==2.1.3' in pinned
  assert {'gpu': 'jax-cuda12-plugin==0.7.2', 'tpu': 'libtpu==0.0.21.1',
          'cpu': 'tensorflow==2.20.0'}[runtime] in pinned


@pytest.mark.parametrize('runtime', ['cpu', 'gpu', 'tpu'])
def test_colab_runtimes_meet_every_requirement_so_the_install_replaces_nothing(runtime):
  """Each dependency of convnet that a Colab runtime has, it has in a version pyproject
  accepts, so installing under the cell's pins adds packages and replaces none."""
  freeze = dict(line.split('==') for line in colab_freeze(runtime) if '==' in line)
  freeze = {canonicalize_name(name): version for name, version in freeze.items()}
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    requirements = [Requirement(r) for r in tomllib.load(f)['project']['dependencies']]
  present = [r for r in requirements if canonicalize_name(r.name) in freeze]
  assert {'jax', 'flax', 'optax', 'numpy', 'absl-py', 'orbax-checkpoint'} <= {
      canonicalize_name(r.name) for r in present}
  for requirement in present:
    version = freeze[canonicalize_name(requirement.name)]
    assert requirement.specifier.contains(version), f'{runtime}: {requirement}, Colab {version}'


def test_colab_install_cell_installs_nothing_once_convnet_is_installed():
  assert run_install_cell(freeze=colab_freeze('gpu'), nvidia=True, pip_installed=True) == (
      [], None, ['runtime: gpu'])


def test_colab_notebook_runs_top_to_bottom_on_cpu(tmp_path):
  import nbclient  # pylint: disable=import-outside-toplevel
  notebook = colab_notebook()
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
  assert f'convnet from {REPO}' in outputs and 'kernels: cpu' in outputs
  assert 'cpu kernels; configs/default.py:smoke: 1 epoch(s) of 2,048 digits' in outputs
  [run_dir] = tmp_path.glob('default-*')  # A new directory per run of the cell.
  assert (run_dir / 'figures' / 'feature_maps.png').exists()
  assert (tmp_path / 'sweep' / 'heatmap.png').exists()
