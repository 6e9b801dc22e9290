"""Classify images (any format PIL reads) with a trained run, from its workdir alone.

    python -m convnet.predict --workdir runs/default digit.png drawings/ [--json]

--preprocess=mnist (the default for a 28x28 one-channel model) prepares an image the
way MNIST's digits were prepared: upright by its EXIF orientation; transparent pixels
read as background; ink told from background by the border's brightness, white ink on
black; cropped to the ink, fitted into 20x20 keeping its aspect ratio, and placed in
28x28 with its centre of mass at the centre. --preprocess=resize (the default for other
models) resizes the whole image to the model's input. Prints a table of path, label,
probability and the top 3, or JSON with --json.
"""

import json
import os
import sys

import jax
import numpy as np
from absl import app, flags, logging

from convnet import inference, train

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')
PREPROCESSING = ('mnist', 'resize')
MAX_PIXELS = 50_000_000  # Larger images are refused before they are decoded.


class ImageError(ValueError):
  """An image that cannot be read or used; the message names the file."""


def read_image(path: str):
  """The image at path, upright (EXIF), fully decoded; ImageError naming the file otherwise."""
  from PIL import Image, ImageOps, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
  reasons = {FileNotFoundError: 'file not found', IsADirectoryError: 'is a directory',
             PermissionError: 'permission denied'}
  try:
    image = Image.open(path)  # Reads the header only.
  except tuple(reasons) as e:
    raise ImageError(f'{path}: {reasons[type(e)]}') from e
  except Image.DecompressionBombError as e:
    raise ImageError(f'{path}: too large to decode safely ({e})') from e
  except (UnidentifiedImageError, OSError) as e:
    raise ImageError(f'{path}: not a readable image ({e})') from e
  with image:
    if image.width * image.height > MAX_PIXELS:
      raise ImageError(f'{path}: {image.width}x{image.height} pixels is more than the '
                       f'{MAX_PIXELS:,} this command reads')
    if image.width * image.height == 0:
      raise ImageError(f'{path}: the image is empty (0 pixels)')
    try:
      return ImageOps.exif_transpose(image).copy()  # Decodes the pixels.
    except (OSError, ValueError) as e:
      raise ImageError(f'{path}: not a readable image ({e})') from e


def border(pixels: np.ndarray) -> np.ndarray:
  """The outermost rows and columns: where a drawing's background shows."""
  return np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])


def ink_on_black(image) -> np.ndarray:
  """float [h, w] in [0, 255]: grey levels with the background dark and the ink bright.

  Transparent pixels are background: the image is laid on a background that contrasts
  with its opaque pixels. The background's brightness is the border's median, so a
  dark digit on a light page is inverted whatever the share of ink.
  """
  rgba = np.asarray(image.convert('RGBA'), np.float64)
  grey = rgba[..., :3] @ np.array([0.299, 0.587, 0.114])
  alpha = rgba[..., 3] / 255.0
  if alpha.min() < 1.0:
    ink = (grey * alpha).sum() / max(alpha.sum(), 1e-9)
    grey = grey * alpha + (255.0 if ink < 128 else 0.0) * (1.0 - alpha)
  return 255.0 - grey if np.median(border(grey)) > 127 else grey


def mnist_like(ink: np.ndarray, path: str = 'image') -> np.ndarray:
  """uint8 [28, 28]: the ink's bounding box fitted into 20x20 (aspect kept), placed in
  28x28 by its centre of mass, as MNIST's digits were."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  ink = np.clip(ink - np.median(border(ink)), 0, None)
  if ink.max() <= 0:
    raise ImageError(f'{path}: no ink found (a blank image)')
  rows, cols = np.nonzero(ink > 0.2 * ink.max())
  ink = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
  scale = 20.0 / max(ink.shape)
  size = (max(1, round(ink.shape[1] * scale)), max(1, round(ink.shape[0] * scale)))
  fitted = np.asarray(Image.fromarray(ink.astype(np.float32), mode='F').resize(
      size, Image.Resampling.LANCZOS), np.float64).clip(0, None)
  fitted *= 255.0 / max(fitted.max(), 1e-9)
  total = fitted.sum()
  com_row = (fitted.sum(axis=1) @ np.arange(fitted.shape[0])) / total
  com_col = (fitted.sum(axis=0) @ np.arange(fitted.shape[1])) / total
  top = int(np.clip(round(13.5 - com_row), 0, 28 - fitted.shape[0]))
  left = int(np.clip(round(13.5 - com_col), 0, 28 - fitted.shape[1]))
  out = np.zeros((28, 28))
  out[top:top + fitted.shape[0], left:left + fitted.shape[1]] = fitted
  return np.round(out).astype(np.uint8)


def load_image(path: str, image_shape, preprocess: str = 'mnist') -> np.ndarray:
  """uint8 [h, w, c] for a model whose inputs are image_shape (h, w, c)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  image = read_image(path)
  h, w, channels = image_shape
  if preprocess == 'mnist':
    return mnist_like(ink_on_black(image), path)[..., None]
  converted = image.convert('L' if channels == 1 else 'RGB')
  pixels = np.asarray(converted.resize((w, h), Image.Resampling.LANCZOS), np.uint8)
  if channels == 1:
    pixels = np.round(ink_on_black(Image.fromarray(pixels))).astype(np.uint8)[..., None]
  return pixels


def image_paths(paths: list[str]) -> list[str]:
  """The files named, and the image files in the directories named (sorted)."""
  found = []
  for path in paths:
    if os.path.isdir(path):
      names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
      if not names:
        raise ImageError(f'{path}: a directory with no image files ({", ".join(IMAGE_SUFFIXES)})')
      found += [os.path.join(path, n) for n in names]
    else:
      found.append(path)
  return found


def default_preprocessing(image_shape) -> str:
  return 'mnist' if tuple(image_shape) == (28, 28, 1) else 'resize'


def predict(workdir: str, paths: list[str], preprocess: str = '') -> list[dict]:
  """[{path, label, probability, top3: [[label, probability], ...]}] for each image."""
  image_shape = inference.read_record(workdir, 'data.json')['image_shape']
  preprocess = preprocess or default_preprocessing(image_shape)
  if preprocess == 'mnist' and tuple(image_shape) != (28, 28, 1):
    raise ImageError(f'--preprocess=mnist is for 28x28 one-channel models; this run takes '
                     f'{tuple(image_shape)} images: use --preprocess=resize')
  paths = image_paths(paths)
  images = np.stack([load_image(p, image_shape, preprocess) for p in paths])  # All read first.
  trained = inference.Trained(workdir)
  probabilities = np.asarray(jax.nn.softmax(trained.apply(images)))
  results = []
  for path, p in zip(paths, probabilities):
    top = np.argsort(-p)[:3]
    results.append({'path': path, 'label': int(top[0]), 'probability': float(p[top[0]]),
                    'top3': [[int(k), float(p[k])] for k in top]})
  return results


def table(results: list[dict]) -> str:
  width = max(len('path'), *(len(r['path']) for r in results))
  lines = [f'{"path":<{width}}  label  probability  top 3']
  for r in results:
    top = '  '.join(f'{k}:{p:.2f}' for k, p in r['top3'])
    lines.append(f'{r["path"]:<{width}}  {r["label"]:>5}  {r["probability"]:>11.4f}  {top}')
  return '\n'.join(lines)


def main(argv):
  if len(argv) < 2:
    sys.exit('error: give one or more image files or directories after the flags')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO.
  try:
    results = predict(flags.FLAGS.workdir, argv[1:], flags.FLAGS.preprocess)
  except (ImageError, FileNotFoundError, *train.USER_ERRORS) as e:
    sys.exit(f'error: {e}')
  print(json.dumps(results, indent=1) if flags.FLAGS.json else table(results))


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'The workdir of a trained run.')
  flags.DEFINE_enum('preprocess', '', ['', *PREPROCESSING], 'mnist: like MNIST\'s digits '
                    '(crop to the ink, fit 20x20, centre by mass); resize: the whole image. '
                    'Default: mnist for 28x28 one-channel models, resize otherwise.')
  flags.DEFINE_bool('json', False, 'Print the results as JSON.')
  flags.mark_flag_as_required('workdir')
  app.run(main)
