"""The lesson's model: one 3x3 conv block + 2x2 max pool (28 -> 14), a dense layer, Adam.

    python -m convnet.main --config configs/default.py --workdir runs/default

Expected: ~98.8% MNIST test accuracy after 15 epochs, a few minutes on a 2-core CPU
(measured figures: docs/performance.md). `configs/default.py:smoke` is a seconds-long
run on the same model for trying things out.
"""

import ml_collections

from convnet import config_lib


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # The only source of randomness: init, data order, dropout.
  config.batch_size = 128  # Global mini-batch, split evenly over the devices.
  config.eval_batch_size = 200  # Test batches (last one padded, masked); 200 fits the CPU cache.
  config.num_epochs = 15
  config.learning_rate = 1e-3  # Peak learning rate.
  config.optimizer = 'adam'  # 'adam' | 'adamw' | 'sgd'
  config.momentum = 0.9  # sgd only; 0 means plain SGD.
  config.weight_decay = 0.0  # adamw only.
  # Training targets: 1 - label_smoothing on the label, label_smoothing spread over all classes.
  config.label_smoothing = 0.0
  config.schedule = 'cosine'  # 'constant' | 'cosine' (to 0 at the last step)
  config.warmup_epochs = 0.0  # Linear warmup from 0, before the schedule.
  config.log_every_steps = 100  # Train-metric interval in metrics.jsonl; 0 = once per epoch.
  config.num_devices = 0  # How many local devices to use; 0 = all.
  config.parallel = 'pmap'  # 'pmap' | 'jit' (jax.jit + shard_map over a device mesh; one process).
  config.micro_batch_size = 0  # Per-device slices forward/backward, gradients summed; 0 = whole.
  config.num_seeds = 1  # Seeds seed, seed+1, ... trained together in one program (vmapped).
  # Also checkpoint at the first chunk end (every log_every_steps) at least this many steps
  # after the last checkpoint: a multiple of log_every_steps; 0 = at epoch ends only.
  config.checkpoint_every_steps = 0
  config.keep_checkpoints = 2  # How many of the latest checkpoints to keep.
  # Stop when a logged training loss is non-finite or above this many times ln(num_classes),
  # a uniform guess's loss (a diverged run); 0 = only on non-finite losses.
  config.divergence_factor = 10.0
  config.progress = True  # A progress bar per epoch, when stderr is a terminal.
  # Write a jax.profiler trace of at least this many training steps (whole compiled chunks,
  # after the first compile) to WORKDIR/tensorboard/plugins/profile; 0 = none.
  config.profile_steps = 0

  config.data = ml_collections.ConfigDict()
  config.data.source = 'idx'  # 'idx': a directory of MNIST-format files | 'tfds'
  # Where the data is; '' = the source's default: the MNIST files shipped in data/mnist for
  # idx, tfds's own data dir (~/tensorflow_datasets, or $TFDS_DATA_DIR) for tfds. ~ and $VARS
  # are expanded.
  config.data.dir = ''
  config.data.name = 'mnist'  # tfds dataset name (fashion_mnist, kmnist, ...)
  config.data.download = False  # tfds only: allow tfds to download and prepare.
  config.data.num_train = 0  # Train on the first N training images only; 0 = all.
  # Moves each training image at random, on the device: 'none' | 'shift' (translate by up
  # to augment_pixels, MNIST-style) | 'crop_flip' (pad by augment_pixels, random crop and
  # horizontal flip: the CIFAR standard).
  config.data.augment = 'none'
  config.data.augment_pixels = 2

  config.model = ml_collections.ConfigDict()
  config.model.num_blocks = 1
  # Per-block settings: one value for every block, or a tuple with one per block,
  # e.g. --config.model.filters=64 or --config.model.filters='(32,64)'.
  config.model.filters = (32,)  # Number of conv filters (output channels).
  config.model.kernel_size = (3,)  # Square kernel: 3 means 3x3.
  config.model.stride = (1,)  # Conv stride.
  config.model.dilation = (1,)  # Conv dilation: a 3x3 kernel dilated by 2 spans 5x5.
  config.model.padding = ('SAME',)  # 'SAME' keeps 28x28 | 'VALID' gives 26x26 for 3x3.
  config.model.norm = ('none',)  # 'none' | 'batch' | 'layer' | 'group', after the conv.
  config.model.norm_groups = (8,)  # norm='group': channel groups, a divisor of filters.
  config.model.pool = ('max',)  # 'max' | 'avg' | 'none'
  config.model.pool_size = (2,)  # Pooling window: 2 means 2x2 (28 -> 14).
  config.model.pool_stride = (2,)
  config.model.activation = 'relu'  # Any of models.ACTIVATIONS, for conv and dense layers.
  config.model.hidden = (128,)  # Dense hidden layer widths after flatten; () for none.
  config.model.dropout = 0.25  # Before each dense layer.
  config.model.num_classes = 10
  # The kernels (convnet/ops.py): 'auto' = the CPU kernels on a CPU, the library's ops
  # (lax.conv, Flax pooling, nn.Dropout) on GPU/TPU | 'cpu' | 'xla'. Same parameters.
  config.model.ops = 'auto'
  config.model.layout = 'NHWC'  # CPU kernels only: 'CHWN' runs the blocks batch-innermost.
  # What the layers compute in: 'auto' = bfloat16 for the library ops on GPU/TPU, float32
  # on CPU | 'float32' | 'bfloat16' (library ops only). Parameters, optimizer state,
  # BatchNorm statistics and the loss stay float32, so checkpoints are the same either way.
  config.model.dtype = 'auto'
  # Any field of shapes.Block (a per-block setting) not listed above, at its default: a new
  # field is a --config.model.<field> key at once.
  for name, default in config_lib.BLOCK_DEFAULTS.items():
    if name not in config.model:
      config.model[name] = (default,)

  if variant == 'smoke':  # Seconds: the same model on 2,048 training images, 1 epoch.
    config.num_epochs = 1
    config.data.num_train = 2048
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/default.py; known: 'smoke'")
  return config
