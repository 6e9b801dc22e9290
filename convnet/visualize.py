"""Pictures of what a trained network learned, from its workdir.

    python -m convnet.visualize --workdir runs/default

writes into runs/default/figures/: filters.png (every conv layer's filters),
feature_maps.png (a few test digits after each conv and each pooling: the
lesson's picture for the real model), confusion_matrix.png, misclassified.png
(the most confidently wrong test images) and curves.png (from metrics.jsonl).
Each figure is also a function taking arrays, for notebooks.
"""

import errno
import os
import sys

import jax
import numpy as np
from absl import app, flags, logging

from convnet import inference, input_pipeline, train
from convnet import workdir as workdir_lib


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int):
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (labels, predictions), 1)
  return matrix


def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save(fig, path: str) -> str:
  fig.savefig(path, dpi=100)
  _plt().close(fig)
  return path


def plot_filters(path: str, params) -> str:
  """Every conv layer's filters, one row of kernels per layer (mean over input channels)."""
  plt = _plt()
  kernels = [np.asarray(params[name]['kernel']) for name in
             sorted((n for n in params if n.startswith('ConvBlock')), key=lambda n: int(n[10:]))]
  columns = min(16, max(k.shape[-1] for k in kernels))
  rows = sum(-(-k.shape[-1] // columns) for k in kernels)
  fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.8, rows * 0.9 + 0.4),
                           squeeze=False)
  row = 0
  for layer, kernel in enumerate(kernels):
    kernel = kernel.mean(axis=2)  # [kh, kw, out]
    for f in range(kernel.shape[-1]):
      ax = axes[row + f // columns, f % columns]
      ax.imshow(kernel[:, :, f], cmap='bwr', vmin=-np.abs(kernel).max(),
                vmax=np.abs(kernel).max())
      if f == 0:
        ax.set_title(f'layer {layer}: {kernel.shape[0]}x{kernel.shape[1]} x {kernel.shape[-1]}',
                     fontsize=8, loc='left')
    row += -(-kernel.shape[-1] // columns)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  return _save(fig, path)


def plot_feature_maps(path: str, images: np.ndarray, maps, channels: int = 6) -> str:
  """Per digit: the input, then `channels` channels of every conv and pooling output."""
  plt = _plt()
  columns = 1 + len(maps) * channels
  width = 0.9 if channels > 1 else 1.2  # Room for a title over every column.
  fig, axes = plt.subplots(len(images), columns, figsize=(columns * width, len(images) * 1.1),
                           squeeze=False)
  for n, image in enumerate(images):
    axes[n, 0].imshow(image if image.shape[-1] == 3 else image[..., 0], cmap='gray')
    axes[n, 0].set_title(f'input {image.shape[0]}x{image.shape[1]}' if n == 0 else '', fontsize=7)
    for m, (name, fmap) in enumerate(maps):
      for c in range(min(channels, fmap.shape[-1])):
        ax = axes[n, 1 + m * channels + c]
        ax.imshow(fmap[n, :, :, c], cmap='viridis')
        if n == 0 and c == 0:
          ax.set_title(f'{name} {fmap.shape[1]}x{fmap.shape[2]}', fontsize=7, loc='left')
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  return _save(fig, path)


def plot_confusion_matrix(path: str, matrix: np.ndarray) -> str:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 5.5))
  image = ax.imshow(np.log1p(matrix), cmap='Blues')
  for (i, j), count in np.ndenumerate(matrix):
    ax.text(j, i, str(count), ha='center', va='center', fontsize=7,
            color='white' if count > matrix.max() / 4 else 'black')
  ax.set_xticks(range(len(matrix)))
  ax.set_yticks(range(len(matrix)))
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  accuracy = np.trace(matrix) / matrix.sum()
  ax.set_title(f'test confusion matrix ({matrix.sum()} images, {100 * accuracy:.2f}% correct)')
  fig.colorbar(image, ax=ax, label='log(1 + count)')
  fig.tight_layout()
  return _save(fig, path)


def plot_misclassified(path: str, images, labels, probabilities, count: int = 16) -> str:
  """The `count` wrong predictions the model was most confident in."""
  plt = _plt()
  predictions = probabilities.argmax(-1)
  wrong = np.flatnonzero(predictions != labels)
  wrong = wrong[np.argsort(-probabilities[wrong, predictions[wrong]])][:count]
  columns = 8
  rows = max(1, -(-len(wrong) // columns))
  fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.3, rows * 2.0), squeeze=False)
  for ax, i in zip(axes.flat, wrong):
    ax.imshow(images[i] if images.shape[-1] == 3 else images[i, ..., 0], cmap='gray')
    ax.set_title(f'true {labels[i]}, said {predictions[i]}\n'
                 f'p={probabilities[i, predictions[i]]:.2f}', fontsize=7)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(f'most confident mistakes ({len(np.flatnonzero(predictions != labels))} in all)',
               fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def plot_curves(path: str, runs: list[tuple[str, list[dict]]]) -> str:
  """Train loss by step and test accuracy by epoch, one line per (label, metrics records)."""
  plt = _plt()
  fig, (loss_ax, accuracy_ax) = plt.subplots(1, 2, figsize=(12, 5))
  for label, records in runs:
    steps = [r for r in records if 'train_loss' in r]
    tests = [r for r in records if 'test_accuracy' in r]
    line, = loss_ax.plot([r['step'] for r in steps], [r['train_loss'] for r in steps],
                         label=label, linewidth=1,  # Markers, so a short run shows its points.
                         marker='o' if len(steps) < 50 else None, markersize=3)
    accuracy_ax.plot([r['epoch'] for r in tests], [100 * r['test_accuracy'] for r in tests],
                     'o-', color=line.get_color(), linewidth=1, markersize=3)
  loss_ax.set(xlabel='step', ylabel='train loss', yscale='log', title='training loss')
  accuracy_ax.set(xlabel='epoch', ylabel='test accuracy %', title='test accuracy')
  accuracy_ax.xaxis.get_major_locator().set_params(integer=True)
  for ax in (loss_ax, accuracy_ax):
    ax.grid(True, alpha=0.3)
  if len(runs) > 1:
    loss_ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  return _save(fig, path)


def visualize(workdir: str, num_digits: int = 4, out: str | None = None) -> list[str]:
  """Writes every figure of the run in workdir into `out` (default workdir/figures);
  returns the paths. Reads the run's files and its test split; never the training set,
  and never writes into workdir when `out` is elsewhere (a read-only run)."""
  trained = inference.Trained(workdir)
  spec = trained.spec
  test = input_pipeline.load_splits(spec.data.source, spec.data.dir, spec.data.name,
                                    spec.model.num_classes, spec.data.download,
                                    splits=('test',))['test']
  diff = workdir_lib.data_diff({'test': trained.data['test']}, {'test': workdir_lib.fingerprint(
      test)}) if 'test' in trained.data else []
  if diff:  # Figures of another test set would be captioned as this run's.
    where = input_pipeline.data_dir(spec.data.source, spec.data.dir) or 'tfds'
    raise workdir_lib.ConfigMismatchError(
        f'the test split in {where} is not the one {workdir} was evaluated on ('
        + '; '.join(diff) + ')')
  out = out or os.path.join(workdir, 'figures')
  try:
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
      raise PermissionError(errno.EACCES, 'Permission denied')
  except OSError as e:
    raise PermissionError(f'cannot write the figures into {out} ({e.strerror}): give '
                          f'--out DIR') from None
  logits = np.concatenate([np.asarray(trained.apply(test.images[i:i + 1000]))
                           for i in range(0, len(test.labels), 1000)])
  probabilities = np.asarray(jax.nn.softmax(logits))
  digits = test.images[[int(np.flatnonzero(test.labels == d)[0]) for d in range(num_digits)]]
  return [
      plot_filters(os.path.join(out, 'filters.png'), trained.variables['params']),
      plot_feature_maps(os.path.join(out, 'feature_maps.png'), digits,
                        trained.feature_maps(digits)),
      plot_confusion_matrix(os.path.join(out, 'confusion_matrix.png'), confusion_matrix(
          test.labels, probabilities.argmax(-1), spec.model.num_classes)),
      plot_misclassified(os.path.join(out, 'misclassified.png'), test.images, test.labels,
                         probabilities),
      plot_curves(os.path.join(out, 'curves.png'), [(os.path.basename(workdir), (
          workdir_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))))]),
  ]


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO.
  try:
    paths = visualize(flags.FLAGS.workdir, out=flags.FLAGS.out or None)
  except (FileNotFoundError, *train.USER_ERRORS) as e:
    sys.exit(f'error: {e}')
  print('wrote ' + ', '.join(paths))


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'The workdir of a run (python -m convnet.main --workdir).')
  flags.DEFINE_string('out', '', 'Where to write the figures (default: WORKDIR/figures).')
  flags.mark_flag_as_required('workdir')
  app.run(main)
