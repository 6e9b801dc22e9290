"""The Keras `mnist_convnet` example, layer for layer, for side-by-side benchmarks.

    python -m convnet.main --config configs/keras_convnet.py --workdir runs/keras_convnet

conv 32 3x3 (VALID) -> 2x2 max pool -> conv 64 3x3 (VALID) -> 2x2 max pool ->
dropout 0.5 -> dense 10; Adam 1e-3 at a constant rate, batch 128, 15 epochs
(28 -> 26 -> 13 -> 11 -> 5: 34,826 parameters, as in Keras). Run batch-innermost
(model.layout='CHWN') in micro-batches of 32: the same model and gradient, faster on
CPU (docs/performance.md); the layout acts on the CPU kernels only. Expected:
>= 99.1% MNIST test accuracy (measured over 3 seeds, with the command: docs/performance.md).
"""

from configs import default


def get_config(variant: str = ''):
  config = default.get_config(variant)
  config.schedule = 'constant'
  config.model.num_blocks = 2
  config.model.filters = (32, 64)
  config.model.padding = ('VALID',)
  config.model.hidden = ()  # Flatten straight into the 10 logits.
  config.model.dropout = 0.5  # Before the logits, as in Keras.
  config.model.layout = 'CHWN'  # Same model and parameters; faster on CPU for two conv blocks.
  config.micro_batch_size = 32  # Same gradient, computed in cache-sized slices: faster on CPU.
  return config
