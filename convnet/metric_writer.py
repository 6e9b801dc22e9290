"""Where a run's numbers go: metrics.jsonl, TensorBoard events, a progress bar.

metrics.jsonl stays the machine-readable record (sweep tables are built from it);
TensorBoard events (tensorboardX, no TensorFlow needed) go to workdir/tensorboard,
so `tensorboard --logdir runs` shows them: scalars, every conv layer's filters at each
epoch, and at the end a few test images' feature maps, the confusion matrix and the
hparams plugin's record (the flattened config and the final metrics) in
workdir/tensorboard/hparams. The images are built with NumPy here (upscaled cells with
gaps), so writing them costs no plotting. The tqdm bar shows the current epoch on a
terminal and stays silent otherwise.
"""

import contextlib
import importlib
import json
import os
import sys
import threading

import numpy as np

from convnet import config_lib
from convnet import workdir as workdir_lib

TRAIN_SCALARS = {'train_loss': 'train/loss', 'train_accuracy': 'train/accuracy',
                 'learning_rate': 'learning_rate', 'images_per_s': 'images_per_s'}
TEST_SCALARS = {'test_loss': 'eval/loss', 'test_accuracy': 'eval/accuracy'}


_THREAD = threading.local()  # .prefix: what this thread's lines start with (a sweep point's).


def print_line(text: str, prefix: str | None = None) -> None:
  """One line to stdout in one write: lines of points training at once (a sweep's
  threads) never run into each other, as print's separate newline lets them; each starts
  with `prefix`, by default its thread's `line_prefix`."""
  prefix = getattr(_THREAD, 'prefix', '') if prefix is None else prefix
  sys.stdout.write(prefix + text + '\n')
  sys.stdout.flush()


@contextlib.contextmanager
def line_prefix(prefix: str):
  """This thread's lines start with `prefix` inside the block (a sweep names its point)."""
  _THREAD.prefix = prefix
  try:
    yield
  finally:
    _THREAD.prefix = ''


def in_labelled_lines() -> bool:
  """Whether this thread's lines carry a prefix: a run inside a sweep, which says less."""
  return bool(getattr(_THREAD, 'prefix', ''))


class MetricWriter:
  """Writes records to every sink; a disabled writer (processes other than 0) does nothing."""

  def __init__(self, workdir: str, enabled: bool = True, progress: bool = True):
    self.enabled = enabled
    self.metrics_path = os.path.join(workdir, 'metrics.jsonl')
    self.progress = progress and enabled and sys.stderr.isatty()
    self.bar = None
    self.epoch_start = 0
    self.tensorboard_dir = os.path.join(workdir, 'tensorboard')
    self._summary = None  # Opened at the first record, so a run that fails early writes none.
    if enabled:  # Its import takes a while: done meanwhile, while the step compiles.
      threading.Thread(target=importlib.import_module, args=('tensorboardX',), daemon=True).start()

  @property
  def summary(self):
    if self._summary is None:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._summary = SummaryWriter(self.tensorboard_dir)
    return self._summary

  def start_epoch(self, epoch: int, num_epochs: int, steps: int, epoch_start: int,
                  step: int) -> None:
    """A bar over the epoch's `steps` steps (from epoch_start), at `step` already."""
    self.epoch_start = epoch_start
    if self.progress:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self.bar = tqdm(total=steps, initial=step - epoch_start, desc=f'epoch {epoch}/{num_epochs}',
                      unit='step', leave=False, dynamic_ncols=True)

  def write(self, record: dict) -> None:
    """One train or test record: appended to metrics.jsonl, scalars to TensorBoard."""
    if not self.enabled:
      return
    workdir_lib.append_jsonl(self.metrics_path, record)
    for key, tag in {**TRAIN_SCALARS, **TEST_SCALARS}.items():
      if key in record:
        self.summary.add_scalar(tag, record[key], record['step'])
    if self.bar is not None and 'train_loss' in record:
      self.bar.update(record['step'] - self.epoch_start - self.bar.n)
      self.bar.set_postfix(loss=f'{record["train_loss"]:.4f}',
                           accuracy=f'{record["train_accuracy"]:.4f}',
                           images_per_s=f'{record["images_per_s"]:,.0f}')

  def note(self, text: str) -> None:
    """A line for the person watching (above the bar on a terminal)."""
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(text)
    else:
      print_line(text)

  def end_epoch(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None

  def filters(self, params, step: int) -> None:
    """Every conv layer's filters, one grid image per layer."""
    if not self.enabled:
      return
    for i in range(sum(name.startswith('ConvBlock_') for name in params)):
      self.summary.add_image(f'filters/layer{i}', filter_grid(
          np.asarray(params[f'ConvBlock_{i}']['kernel']), rgb=i == 0), step, dataformats='HWC')

  def end_of_run(self, step: int, maps, confusion: np.ndarray, hparams: dict,
                 metrics: dict) -> None:
    """Feature maps of a few test images, the test confusion matrix, and the run's
    config (`hparams`, flattened) with its final metrics for TensorBoard's HParams view."""
    if not self.enabled:
      return
    for name, fmap in maps:
      self.summary.add_image(f'feature_maps/{name.replace(" ", "_")}', map_grid(fmap), step,
                             dataformats='HW')
    self.summary.add_image('eval/confusion_matrix', heatmap(confusion), step, dataformats='HWC')
    # Into the run's own event file (tensorboardX's add_hparams would make a second run).
    from tensorboardX import summary  # pylint: disable=import-outside-toplevel
    metrics = {f'hparams/{k}': v for k, v in metrics.items()}
    for part in summary.hparams(hparam_values(hparams), metrics):
      self.summary.file_writer.add_summary(part)
    for tag, value in metrics.items():
      self.summary.add_scalar(tag, value, step)

  def close(self) -> None:
    self.end_epoch()
    if self._summary is not None:
      self._summary.close()


# Keys that change how a run is written or watched, not what it computes: left out of
# TensorBoard's HParams table (workdir.RESUMABLE_CHANGES minus the kernels and dtype).
NOT_HPARAMS = tuple(k for k in workdir_lib.RESUMABLE_CHANGES
                    if k not in ('model.ops', 'model.layout', 'model.dtype')) + ('eval_batch_size',)


def hparam_values(config: dict) -> dict:
  """The flattened config as the HParams plugin takes it (a bool, number or string per
  key): a one-block tuple as its value, a longer one as a JSON list such as [32, 64]."""
  values = {}
  for key, value in config_lib.flatten(config).items():
    if key in NOT_HPARAMS:
      continue
    if isinstance(value, (tuple, list)):
      value = value[0] if len(value) == 1 else json.dumps(list(value))
    values[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
  return values


def upscale(images: np.ndarray, cell: int) -> np.ndarray:
  """[n, h, w, ...] -> each image repeated to at least `cell` pixels on its longer side."""
  factor = max(1, -(-cell // max(images.shape[1:3])))
  return images.repeat(factor, axis=1).repeat(factor, axis=2)


def tile(images: np.ndarray, columns: int, gap: int = 2, background: float = 0.3) -> np.ndarray:
  """[n, h, w, ...] -> one [rows * (h + gap) - gap, columns * (w + gap) - gap, ...] image."""
  n, h, w = images.shape[:3]
  rows = -(-n // columns)
  grid = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, *images.shape[3:]),
                 background, np.float32)
  for i, image in enumerate(images):
    r, c = divmod(i, columns)
    grid[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = image
  return grid


def diverging(values: np.ndarray) -> np.ndarray:
  """Values in [-1, 1] -> RGB in [0, 1]: blue for negative, white for 0, red for positive."""
  v = np.clip(values, -1, 1)[..., None]
  red, blue = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])
  return np.where(v >= 0, 1 - v * (1 - red), 1 + v * (1 - blue)).astype(np.float32)


def filter_grid(kernel: np.ndarray, rgb: bool = False, cell: int = 24) -> np.ndarray:
  """A conv kernel [kh, kw, in, out] as one [H, W, 3] image: a cell per filter, gaps
  between cells, one colour scale shared by all filters of the layer. Three input
  channels with `rgb` show as colours (mid-grey is 0); otherwise the mean over input
  channels, blue negative and red positive."""
  scale = np.abs(kernel).max() or 1.0
  filters = np.moveaxis(kernel, -1, 0) / scale  # [out, kh, kw, in] in [-1, 1]
  if rgb and kernel.shape[2] == 3:
    images = (filters + 1) / 2
  else:
    images = diverging(filters.mean(axis=-1))
  return tile(upscale(images, cell), columns=min(16, len(images)))


def map_grid(fmap: np.ndarray, channels: int = 8, cell: int = 48) -> np.ndarray:
  """Feature maps [n, h, w, c] as one grey image: a row per image, its first `channels`
  channels across, each scaled to its own range (a map's pattern, not its size, shows)."""
  maps = np.moveaxis(np.asarray(fmap, np.float32)[..., :channels], -1, 1)  # [n, c, h, w]
  low = maps.min(axis=(2, 3), keepdims=True)
  span = maps.max(axis=(2, 3), keepdims=True) - low
  maps = (maps - low) / np.where(span > 0, span, 1)
  columns = maps.shape[1]
  return tile(upscale(maps.reshape(-1, *maps.shape[2:]), cell), columns=columns)


def heatmap(matrix: np.ndarray, cell: int = 24) -> np.ndarray:
  """A count matrix (rows true, columns predicted) as an [H, W, 3] image, white at 0 to
  dark blue at the largest count on a log scale, so a few mistakes stay visible."""
  shade = np.log1p(matrix) / (np.log1p(matrix.max()) or 1.0)
  blue = np.array([0.03, 0.19, 0.42])
  cells = 1 - shade[..., None] * (1 - blue)  # [rows, columns, 3]
  return tile(upscale(cells.reshape(-1, 1, 1, 3), cell), columns=matrix.shape[1], gap=1,
              background=0.8)

