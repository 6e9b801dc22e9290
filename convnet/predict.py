"""Classify PNG (or any PIL-readable) images of digits with a trained run.

    python -m convnet.predict --workdir runs/default digit.png [more.png ...]

Each image is converted like MNIST: grey, white digit on black (inverted if its
background is light), resized to the training images' size. Prints one line per
image: path, label, probability.
"""

import os
import sys

import jax
import numpy as np
from absl import app, flags

from convnet import train, visualize
from convnet import workdir as workdir_lib


class ImageError(ValueError):
  """An image that cannot be read; the message names the file."""


def load_image(path: str, size: tuple[int, int] = (28, 28)) -> np.ndarray:
  """uint8 [h, w, 1], white on black like MNIST."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
  try:
    with Image.open(path) as image:
      grey = image.convert('L')
      if grey.size != (size[1], size[0]):
        grey = grey.resize((size[1], size[0]), Image.Resampling.LANCZOS)
      pixels = np.asarray(grey, np.uint8)
  except FileNotFoundError as e:
    raise ImageError(f'{path}: file not found') from e
  except (UnidentifiedImageError, OSError) as e:
    raise ImageError(f'{path}: not a readable image ({e})') from e
  if pixels.mean() > 127:  # A dark digit on a light background.
    pixels = 255 - pixels
  return pixels[..., None]


def predict(workdir: str, paths: list[str]) -> list[tuple[str, int, float]]:
  """[(path, label, probability)] for each image, from the run's latest checkpoint."""
  config = visualize.config_from_dict(workdir_lib.read_json(os.path.join(workdir,
                                                                          'config.json')))
  data = train.load_data(config)  # The normalisation constants of the training set.
  size = data.train.images.shape[1:3]
  images = np.stack([load_image(path, size) for path in paths])  # All read before any work.
  trained = visualize.Trained(workdir, data.train.images.shape[1:])
  probabilities = np.asarray(jax.nn.softmax(trained.apply(images, data.mean, data.std)))
  labels = probabilities.argmax(-1)
  return [(path, int(label), float(p[label])) for path, label, p in
          zip(paths, labels, probabilities)]


def main(argv):
  if len(argv) < 2:
    sys.exit('error: give one or more image files after the flags')
  if not os.path.exists(os.path.join(flags.FLAGS.workdir, 'config.json')):
    sys.exit(f'error: {flags.FLAGS.workdir}/config.json not found: not a run\'s workdir')
  try:
    for path, label, probability in predict(flags.FLAGS.workdir, argv[1:]):
      print(f'{path}\t{label}\t{probability:.4f}')
  except (ImageError, *train.USER_ERRORS) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'The workdir of a trained run.')
  flags.mark_flag_as_required('workdir')
  app.run(main)
