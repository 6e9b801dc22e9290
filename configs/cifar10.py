"""CIFAR-10 (32x32 colour, tfds) with the conv/pool stack of TensorFlow's CNN tutorial.

    python -m convnet.main --config configs/cifar10.py --workdir runs/cifar10

Three 3x3 VALID conv blocks (32, 64, 64 filters; 2x2 max pooling after the first two:
32 -> 30 -> 15 -> 13 -> 6 -> 4), dense 64, Adam at 1e-3, batches of 32, 10 epochs, no
augmentation: the model of https://www.tensorflow.org/tutorials/images/cnn, which says
it reaches "a test accuracy of over 70%". Not measured here (the dataset needs a
download). Needs `cifar10` prepared in tfds's data dir (by `tfds build`, or by
`tfds.load` where TensorFlow is importable), or `--config.data.download=True` with a
network. Augmentation as an ablation:
`--config.data.augment=crop_flip --config.data.augment_pixels=4`.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.source, config.data.name = 'tfds', 'cifar10'
  config.num_epochs = 10
  config.batch_size = 32
  config.schedule = 'constant'
  config.model.num_blocks = 3
  config.model.filters = (32, 64, 64)
  config.model.padding = ('VALID',)
  config.model.pool = ('max', 'max', 'none')
  config.model.hidden = (64,)
  return config
