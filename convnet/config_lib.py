"""The config schema: every key, its type and allowed values, checked before any work.

A config is an `ml_collections.ConfigDict` from `configs/*.py`. `validate` rejects
unknown or missing keys, wrong types and impossible values with the key named;
`block_args` turns the per-block tuples into the ConvNet's arguments;
`check_shapes` rejects models whose feature maps would vanish for the data.
"""

import math
import sys
from typing import Any, Sequence

from absl import flags

from convnet import models

# Per-block settings are tuples with one entry per block, or one entry for all blocks.
PER_BLOCK = {
    'filters': int, 'kernel_size': int, 'stride': int, 'padding': str, 'norm': str,
    'pool': str, 'pool_size': int, 'pool_stride': int,
}
SCHEMA = {
    'seed': int, 'batch_size': int, 'eval_batch_size': int, 'num_epochs': int,
    'learning_rate': float, 'optimizer': str, 'momentum': float, 'weight_decay': float,
    'schedule': str, 'warmup_epochs': float, 'log_every_steps': int, 'num_devices': int,
    'num_seeds': int, 'checkpoint_every_steps': int, 'keep_checkpoints': int, 'progress': bool,
    'parallel': str, 'micro_batch_size': int,
    'data.source': str, 'data.dir': str, 'data.name': str, 'data.download': bool,
    'data.num_train': int,
    'model.num_blocks': int, 'model.activation': str, 'model.hidden': tuple,
    'model.dropout': float, 'model.num_classes': int, 'model.conv_impl': str,
    'model.layout': str,
    **{f'model.{key}': tuple for key in PER_BLOCK},
}
CHOICES = {
    'optimizer': ('adam', 'adamw', 'sgd'), 'schedule': ('constant', 'cosine'),
    'parallel': ('pmap', 'jit'),
    'data.source': ('idx', 'tfds'), 'model.activation': models.ACTIVATIONS,
    'model.conv_impl': models.CONV_IMPLS, 'model.layout': models.LAYOUTS,
    'model.padding': models.PADDINGS, 'model.norm': models.NORMS, 'model.pool': models.POOLS,
}
POSITIVE = ('batch_size', 'eval_batch_size', 'num_epochs', 'learning_rate', 'num_seeds',
            'keep_checkpoints', 'model.num_blocks',
            'model.num_classes', 'model.filters', 'model.kernel_size', 'model.stride',
            'model.pool_size', 'model.pool_stride', 'model.hidden')
NON_NEGATIVE = ('data.num_train', 'momentum', 'weight_decay', 'warmup_epochs', 'log_every_steps',
                'num_devices', 'checkpoint_every_steps', 'micro_batch_size')


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def flatten(config, prefix: str = '') -> dict[str, Any]:
  """{'model.filters': (32,), ...} from a nested ConfigDict or dict."""
  flat = {}
  for key, value in dict(config).items():
    if hasattr(value, 'items'):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _type_ok(value, kind) -> bool:
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, kind)


def validate(config, available_devices: int) -> None:
  """Raises ConfigError naming the first key whose value cannot work."""
  flat = flatten(config)
  unknown = sorted(set(flat) - set(SCHEMA))
  if unknown:
    raise ConfigError(f'unknown config key(s): {", ".join(unknown)}')
  missing = sorted(set(SCHEMA) - set(flat))
  if missing:
    raise ConfigError(f'missing config key(s): {", ".join(missing)}')
  for key, kind in SCHEMA.items():
    value = flat[key]
    if not _type_ok(value, kind):
      raise ConfigError(f'{key} must be {kind.__name__}, got {value!r}')
    item_kind = PER_BLOCK.get(key.removeprefix('model.'), int if key == 'model.hidden' else None)
    items = value if kind is tuple else (value,)
    if item_kind and not all(_type_ok(v, item_kind) for v in items):
      raise ConfigError(f'{key} must hold {item_kind.__name__} values, got {value!r}')
    if key in CHOICES and any(v not in CHOICES[key] for v in items):
      raise ConfigError(f'{key} must be one of {CHOICES[key]}, got {value!r}')
    if key in POSITIVE and any(v <= 0 for v in items):
      raise ConfigError(f'{key} must be > 0, got {value!r}')
    if key in NON_NEGATIVE and any(v < 0 for v in items):
      raise ConfigError(f'{key} must be >= 0, got {value!r}')
  if not 0 <= flat['model.dropout'] < 1:
    raise ConfigError(f'model.dropout must be in [0, 1), got {flat["model.dropout"]!r}')
  if not math.isfinite(flat['learning_rate']):
    raise ConfigError(f'learning_rate must be finite, got {flat["learning_rate"]!r}')
  block_args(config.model)  # Checks the per-block tuple lengths.
  if flat['num_devices'] > available_devices:
    raise ConfigError(f'num_devices={flat["num_devices"]} but only {available_devices} local '
                      f'devices exist')
  num_devices = flat['num_devices'] or available_devices
  for key in ('batch_size', 'eval_batch_size'):
    if flat[key] % num_devices:
      raise ConfigError(f'{key}={flat[key]} is not divisible by the {num_devices} devices; '
                        f'use a multiple of {num_devices}')
  per_device = flat['batch_size'] // num_devices
  micro = flat['micro_batch_size']
  if micro and per_device % micro:
    raise ConfigError(f'micro_batch_size={micro} does not divide the per-device batch of '
                      f'{per_device} (batch_size={flat["batch_size"]} over {num_devices} '
                      f'device(s)); use a divisor of {per_device}, or 0 for the whole batch')
  if micro and micro < per_device and 'batch' in flat['model.norm']:
    raise ConfigError(f'micro_batch_size={micro} with model.norm=\'batch\': BatchNorm would '
                      f'normalise over slices of {micro}, not the batch; use 0')


def block_args(model_config) -> dict[str, list]:
  """Per-block tuples -> one list per ConvNet argument, each of length num_blocks."""
  n = model_config.num_blocks
  resolved = {}
  for key in PER_BLOCK:
    values = tuple(model_config[key])
    if len(values) not in (1, n):
      raise ConfigError(f'model.{key} has {len(values)} entries {values} but model.num_blocks '
                        f'is {n}: give one value for all blocks or one per block')
    resolved[key] = list(values) * n if len(values) == 1 else list(values)
  return resolved


def model_args(model_config) -> dict[str, Any]:
  """Keyword arguments of models.ConvNet from the `model` part of a config."""
  blocks = block_args(model_config)
  return dict(
      filters=blocks['filters'], kernel_sizes=blocks['kernel_size'], strides=blocks['stride'],
      paddings=blocks['padding'], norms=blocks['norm'], pools=blocks['pool'],
      pool_sizes=blocks['pool_size'], pool_strides=blocks['pool_stride'],
      activation=model_config.activation, hidden=tuple(model_config.hidden),
      dropout=model_config.dropout, num_classes=model_config.num_classes,
      conv_impl=model_config.conv_impl, layout=model_config.layout)


def check_shapes(model: models.ConvNet, image_shape: Sequence[int]) -> None:
  """Raises ConfigError if a kernel or pooling window does not fit its block's input."""
  h, w, _ = image_shape
  for i, (out_h, out_w, _) in enumerate(models.feature_shapes(model, image_shape)):
    k = model.kernel_sizes[i]
    if k > min(h, w):
      raise ConfigError(f'model.kernel_size: block {i} has a {k}x{k} kernel but its input is '
                        f'only {h}x{w}')
    conv_h = models.conv_output_size(h, k, model.strides[i], model.paddings[i])
    conv_w = models.conv_output_size(w, k, model.strides[i], model.paddings[i])
    if model.pools[i] != 'none' and model.pool_sizes[i] > min(conv_h, conv_w):
      raise ConfigError(f'model.pool_size: block {i} pools {model.pool_sizes[i]}x'
                        f'{model.pool_sizes[i]} windows over a {conv_h}x{conv_w} feature map, '
                        f'leaving less than 1x1')
    h, w = out_h, out_w


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with a one-line message, not a traceback, for a bad --config override."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError) as e:  # ml_collections' answer to an unknown key.
    key = str(e).strip('"\'')
    sys.exit(f'error: unknown config key {key!r}; see configs/default.py for every key')
