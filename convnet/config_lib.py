"""The config schema: every key, its type and allowed values, checked before any work.

A config is an `ml_collections.ConfigDict` from `configs/*.py`. `validate` rejects
unknown or missing keys, wrong types and impossible values with the key named;
`model_args` turns the model part into models.ConvNet's arguments; `check_shapes`
rejects models whose feature maps would vanish for the data. Choices come from the
registries (ops.BACKENDS, models.ACTIVATIONS and NORMS, shapes.POOLS, optim.OPTIMIZERS
and SCHEDULES) when validating, so an entry added there is a valid choice here.
"""

import dataclasses
import difflib
import inspect
import math
import os
import sys
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

from absl import flags

from convnet import input_pipeline, models, ops, optim, shapes

MAX_SEED = 2**31 - 1


class Rule(NamedTuple):
  """A condition on a value, and how an error message says it."""
  says: str
  holds: Callable[[Any], bool]


POSITIVE = Rule('> 0', lambda v: v > 0)
NON_NEGATIVE = Rule('>= 0', lambda v: v >= 0)
FRACTION = Rule('in [0, 1)', lambda v: 0 <= v < 1)
SEED = Rule(f'in [0, {MAX_SEED})', lambda v: 0 <= v < MAX_SEED)


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key: its type and the values it may take.

  For a tuple, `item` is the type of its values, and choices and rule apply to each.
  `choices` may be a registry (a dict): its keys at validation time are the choices.
  """
  kind: type
  item: Optional[type] = None
  choices: Union[Sequence[str], Mapping[str, Any], None] = None
  rule: Optional[Rule] = None


def _per_block_fields() -> list[dataclasses.Field]:
  return [f for f in dataclasses.fields(models.ConvBlock)
          if f.name not in models.ConvBlock.NOT_PER_BLOCK]


# Per-block settings: one per int or str field of models.ConvBlock, read from the class
# (see its docstring). In a config each is a tuple with one value for every block, or
# one value per block; a block key a config lacks is the field's default (BLOCK_DEFAULTS).
BLOCK_SCHEMA = {f.name: Key(f.type, choices=models.BLOCK_CHOICES.get(f.name),
                            rule=POSITIVE if f.type is int else None)
                for f in _per_block_fields()}
BLOCK_DEFAULTS = {f.name: f.default for f in _per_block_fields()
                  if f.default is not dataclasses.MISSING}

SCHEMA = {
    'filters': Key(int, rule=POSITIVE),
    'kernel_size': Key(int, rule=POSITIVE),
    'dilation': Key(int, rule=POSITIVE),
    'stride': Key(int, rule=POSITIVE),
    'padding': Key(str, choices=shapes.PADDINGS),
    'norm': Key(str, choices=models.NORMS),
    'norm_groups': Key(int, rule=POSITIVE),
    'pool': Key(str, choices=shapes.POOLS),
    'pool_size': Key(int, rule=POSITIVE),
    'pool_stride': Key(int, rule=POSITIVE),
}

SCHEMA = {
    'seed': Key(int, rule=SEED),
    'batch_size': Key(int, rule=POSITIVE),
    'eval_batch_size': Key(int, rule=POSITIVE),
    'num_epochs': Key(int, rule=POSITIVE),
    'learning_rate': Key(float, rule=POSITIVE),
    'optimizer': Key(str, choices=optim.OPTIMIZERS),
    'momentum': Key(float, rule=NON_NEGATIVE),
    'weight_decay': Key(float, rule=NON_NEGATIVE),
    'schedule': Key(str, choices=optim.SCHEDULES),
    'warmup_epochs': Key(float, rule=NON_NEGATIVE),
    'log_every_steps': Key(int, rule=NON_NEGATIVE),
    'num_devices': Key(int, rule=NON_NEGATIVE),
    'parallel': Key(str, choices=('pmap', 'jit')),
    'micro_batch_size': Key(int, rule=NON_NEGATIVE),
    'num_seeds': Key(int, rule=POSITIVE),
    'checkpoint_every_steps': Key(int, rule=NON_NEGATIVE),
    'keep_checkpoints': Key(int, rule=POSITIVE),
    'divergence_factor': Key(float, rule=NON_NEGATIVE),
    'progress': Key(bool),
    'profile_steps': Key(int, rule=NON_NEGATIVE),
    'data.source': Key(str, choices=('idx', 'tfds')),
    'data.dir': Key(str),
    'data.augment': Key(str, choices=input_pipeline.AUGMENTATIONS),
    'data.augment_pixels': Key(int, rule=NON_NEGATIVE),
    'data.name': Key(str),
    'data.download': Key(bool),
    'data.num_train': Key(int, rule=NON_NEGATIVE),
    'model.num_blocks': Key(int, rule=POSITIVE),
    'model.activation': Key(str, choices=models.ACTIVATIONS),
    'model.hidden': Key(tuple, item=int, rule=POSITIVE),
    'model.dropout': Key(float, rule=FRACTION),
    'model.num_classes': Key(int, rule=POSITIVE),
    'model.ops': Key(str, choices=ops.BACKENDS),
    'model.layout': Key(str, choices=ops.LAYOUTS),
    'model.dtype': Key(str, choices=ops.DTYPES),
    **{f'model.{name}': dataclasses.replace(key, kind=tuple, item=key.kind)
       for name, key in BLOCK_SCHEMA.items()},
}


# Keys added since runs were first written, and the value that reproduces what a run
# whose config.json lacks the key computed (read by workdir.config_from_dict); for a
# per-block key, its field's default.
ABSENT = {'model.dtype': 'float32', 'profile_steps': 0,
          **{f'model.{name}': (default,) for name, default in BLOCK_DEFAULTS.items()}}


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


def check_key(name: str, key: Key, value) -> None:
  """Raises ConfigError naming `name` if value is not of the key's type and range."""
  if not _type_ok(value, key.kind):
    raise ConfigError(f'{name} must be {key.kind.__name__}, got {value!r}')
  items = value if key.kind is tuple else (value,)
  kind = key.item or key.kind
  if not all(_type_ok(v, kind) for v in items):
    raise ConfigError(f'{name} must hold {kind.__name__} values, got {value!r}')
  if kind is float and not all(math.isfinite(v) for v in items):
    raise ConfigError(f'{name} must be finite, got {value!r}')
  if key.choices is not None and any(v not in key.choices for v in items):
    raise ConfigError(f'{name} must be one of {tuple(key.choices)}, got {value!r}')
  if key.rule is not None and not all(key.rule.holds(v) for v in items):
    raise ConfigError(f'{name} must be {key.rule.says}, got {value!r}')


def validate(config, available_devices: int) -> None:
  """Raises ConfigError naming the first key whose value cannot work."""
  flat = flatten(config)
  unknown = sorted(set(flat) - set(SCHEMA))
  if unknown:
    raise ConfigError(f'unknown config key(s): {", ".join(unknown)}')
  missing = sorted(set(SCHEMA) - set(flat) - {f'model.{name}' for name in BLOCK_DEFAULTS})
  if missing:
    raise ConfigError(f'missing config key(s): {", ".join(missing)}')
  for name, key in SCHEMA.items():
    if name in flat:
      check_key(name, key, flat[name])
  if flat['seed'] + flat['num_seeds'] > MAX_SEED:
    raise ConfigError(f'seed={flat["seed"]} + num_seeds={flat["num_seeds"]} exceeds {MAX_SEED}')
  block_settings(config.model)  # Checks the per-block tuple lengths.
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
  every, log_every = flat['checkpoint_every_steps'], flat['log_every_steps']
  if every and (not log_every or every % log_every):
    raise ConfigError(f'checkpoint_every_steps={every}: checkpoints are written where a compiled '
                      f'chunk of steps ends (every log_every_steps={log_every} steps; 0 = whole '
                      f'epochs), so it must be a multiple of log_every_steps > 0')
  if flat['model.dtype'] == 'bfloat16' and ops.resolve(flat['model.ops']) == 'cpu':
    raise ConfigError("model.dtype='bfloat16' computes on the library ops, and the CPU kernels "
                      "that model.ops picks here compute in float32: set model.ops='xla', or "
                      "model.dtype='auto'")
  if micro and micro < per_device and 'batch' in flat['model.norm']:
    raise ConfigError(f'micro_batch_size={micro} with model.norm=\'batch\': BatchNorm would '
                      f'normalise over slices of {micro}, not the batch; use 0')


def block_settings(model_config) -> tuple[dict[str, Any], ...]:
  """Per-block tuples -> one dict of ConvBlock settings per block (model.num_blocks)."""
  n = model_config.num_blocks
  columns = {}
  for name in BLOCK_SCHEMA:
    values = tuple(model_config[name]) if name in model_config else (BLOCK_DEFAULTS[name],)
    if len(values) not in (1, n):
      raise ConfigError(f'model.{name} has {len(values)} entries {values} but '
                        f'model.num_blocks is {n}: give one value for all blocks or one per '
                        f'block')
    columns[name] = values * n if len(values) == 1 else values
  blocks = tuple({name: columns[name][i] for name in BLOCK_SCHEMA} for i in range(n))
  for i, block in enumerate(blocks):
    if block['norm'] == 'group' and block['filters'] % block['norm_groups']:
      raise ConfigError(f"model.norm_groups: block {i}'s {block['filters']} filters do not "
                        f"split into {block['norm_groups']} groups for norm='group'; use a "
                        f'divisor of {block["filters"]}')
  return blocks


def model_args(model_config) -> dict[str, Any]:
  """Keyword arguments of models.ConvNet from the `model` part of a config."""
  return dict(blocks=block_settings(model_config), activation=model_config.activation,
              hidden=tuple(model_config.hidden), dropout=model_config.dropout,
              num_classes=model_config.num_classes,
              ops=ops.make(model_config.ops, model_config.layout, model_config.dtype))


def check_shapes(blocks: Sequence[Mapping[str, Any]], image_shape: Sequence[int]) -> None:
  """Raises ConfigError if a kernel or pooling window does not fit its block's input."""
  h, w, _ = image_shape
  for i, block in enumerate(blocks):
    k = shapes.kernel_extent(block)
    if k > min(h, w):
      dilated = (f' dilated by {block["dilation"]} (spanning {k}x{k})'
                 if block.get('dilation', 1) > 1 else '')
      raise ConfigError(f'model.kernel_size: block {i} has a {block["kernel_size"]}x'
                        f'{block["kernel_size"]} kernel{dilated} but its input is only {h}x{w}')
    conv_h, conv_w = (shapes.conv_output_size(n, k, block['stride'], block['padding'])
                      for n in (h, w))
    pool = shapes.POOLS[block['pool']]
    pooled = [pool.output_size(n, block['pool_size'], block['pool_stride'])
              for n in (conv_h, conv_w)]
    if min(pooled) < 1:
      # The stride is to blame if the window would have fit the map a stride of 1 leaves.
      unstrided = shapes.conv_output_size(min(h, w), k, 1, block['padding'])
      blame = ('model.stride' if block['stride'] > 1 and
               pool.output_size(unstrided, block['pool_size'], block['pool_stride']) >= 1
               else 'model.pool_size')
      raise ConfigError(f'{blame}: block {i}\'s conv (kernel {k}, stride {block["stride"]}, '
                        f'{block["padding"]}) takes {h}x{w} to {conv_h}x{conv_w}, which its '
                        f'{block["pool_size"]}x{block["pool_size"]} pooling leaves less than 1x1')
    h, w = pooled


def check_config_file(spec: str) -> None:
  """Exits with one line if `--config PATH[:ARG]` cannot give a config: a missing or
  unreadable file, a syntax error, no get_config, or an ARG its get_config cannot take."""
  path, _, arg = spec.partition(':')
  where = f'--config {spec}'
  try:
    with open(path) as f:
      code = compile(f.read(), path, 'exec')
  except SyntaxError as e:
    sys.exit(f'error: {where}: line {e.lineno}: {e.msg}')
  except OSError as e:
    sys.exit(f'error: {where}: {e.strerror}')
  namespace = {'__file__': os.path.abspath(path), '__name__': 'config_file'}
  try:
    exec(code, namespace)  # pylint: disable=exec-used
    get_config = namespace.get('get_config')
    if not callable(get_config):
      sys.exit(f'error: {where}: the file defines no get_config()')
    takes = len(inspect.signature(get_config).parameters)
    if arg and not takes:
      sys.exit(f'error: {where}: its get_config() takes no argument; use --config {path}')
    get_config(arg) if takes and arg else get_config()  # pylint: disable=expression-not-assigned
  except Exception as e:  # pylint: disable=broad-except  (any error in the user's file)
    sys.exit(f'error: {where}: get_config() fails: {type(e).__name__}: {e}')


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with a one-line message, not a traceback, for a bad --config file
  or override."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      check_config_file(arg.split('=', 1)[1])
    elif arg == '--config' and i + 1 < len(argv):
      check_config_file(argv[i + 1])
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError) as e:  # ml_collections' answer to an unknown key.
    sys.exit(f'error: {unknown_override(argv) or e}')


def unknown_override(argv: Sequence[str]) -> str | None:
  """What is wrong with the first --config.KEY=VALUE whose KEY is no config key, in a line
  with the closest key; None if every override names one."""
  for arg in argv:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=')[0]
      if key not in SCHEMA:
        parent, _, leaf = key.rpartition('.')
        siblings = {name.rpartition('.')[2]: name for name in SCHEMA
                    if name.rpartition('.')[0] == parent}
        close = difflib.get_close_matches(leaf, siblings, n=1)
        hint = f"; did you mean '{siblings[close[0]]}'?" if close else ''
        return (f"unknown config key '{key}' in {arg}{hint} (configs/default.py lists every "
                f'key)')
  return None
