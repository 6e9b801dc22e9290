"""Where a run's numbers go: metrics.jsonl, TensorBoard events, a progress bar.

metrics.jsonl stays the machine-readable record (sweep tables are built from it);
TensorBoard events (tensorboardX, no TensorFlow needed) go to workdir/tensorboard,
so `tensorboard --logdir runs` shows them; the tqdm bar shows the current epoch on
a terminal and stays silent otherwise.
"""

import os
import sys

import numpy as np

from convnet import workdir as workdir_lib

TRAIN_SCALARS = {'train_loss': 'train/loss', 'train_accuracy': 'train/accuracy',
                 'learning_rate': 'learning_rate', 'images_per_s': 'images_per_s'}
TEST_SCALARS = {'test_loss': 'eval/loss', 'test_accuracy': 'eval/accuracy'}


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
      print(text, flush=True)

  def end_epoch(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None

  def filters(self, params, step: int) -> None:
    """The first conv layer's filters as TensorBoard images (mean over input channels)."""
    if not self.enabled:
      return
    kernel = np.asarray(params['ConvBlock_0']['kernel']).mean(axis=2)  # [kh, kw, out]
    scale = np.abs(kernel).max() or 1.0
    images = (kernel.transpose(2, 0, 1)[:, None] / scale + 1) / 2  # [out, 1, kh, kw] in [0, 1]
    self.summary.add_images('filters/layer0', images, step, dataformats='NCHW')

  def close(self) -> None:
    self.end_epoch()
    if self._summary is not None:
      self._summary.close()
