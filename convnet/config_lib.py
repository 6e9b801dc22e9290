"""The config schema, and the config read once into typed specs before any work.

A config is an `ml_collections.ConfigDict` from `configs/*.py`. Its keys are the
option() fields of the specs below (Spec, with Data and Model) and one per field of
shapes.Block (per-block keys, tuples). `read` rejects unknown or missing keys, wrong
types and impossible values with the key named, and returns a Spec: train.py and the
modules below it take that, never the ConfigDict. `validate` adds the checks that
depend on the devices; `check_shapes` rejects models whose feature maps would vanish for
the data. Choices come from the registries (ops.BACKENDS, models.ACTIVATIONS and NORMS,
shapes.POOLS, optim.OPTIMIZERS and SCHEDULES) when validating, so an entry added there
is a valid choice here.
"""

import dataclasses
import difflib
import functools
import inspect
import math
import os
import sys
import typing
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


# Per-block settings: one per field of shapes.Block, read from the class (see its
# docstring). In a config each is a tuple with one value for every block, or one value
# per block; a block key a config lacks is the field's default (BLOCK_DEFAULTS).
BLOCK_SCHEMA = {f.name: Key(f.type, choices=models.BLOCK_CHOICES.get(f.name),
                            rule=POSITIVE if f.type is int else None)
                for f in dataclasses.fields(shapes.Block)}
BLOCK_DEFAULTS = {f.name: f.default for f in dataclasses.fields(shapes.Block)
                  if f.default is not dataclasses.MISSING}


def option(rule: Optional[Rule] = None, choices=None) -> Any:
  """A spec field that is a config key: its type is the field's annotation (a tuple's
  values: tuple[int, ...]); choices and rule as in Key."""
  return dataclasses.field(metadata={'key': (rule, choices)})


@dataclasses.dataclass(frozen=True)
class Data:
  """data.*: which images, and how training batches are augmented."""
  source: str = option(choices=('idx', 'tfds'))
  dir: str = option()
  augment: str = option(choices=input_pipeline.AUGMENTATIONS)
  augment_pixels: int = option(NON_NEGATIVE)
  name: str = option()
  download: bool = option()
  num_train: int = option(NON_NEGATIVE)


@dataclasses.dataclass(frozen=True)
class Model:
  """model.*: the ConvNet. Its per-block keys (BLOCK_SCHEMA) are read into `blocks`."""
  num_blocks: int = option(POSITIVE)
  activation: str = option(choices=models.ACTIVATIONS)
  hidden: tuple[int, ...] = option(POSITIVE)
  dropout: float = option(FRACTION)
  num_classes: int = option(POSITIVE)
  layout: str = option(choices=ops.LAYOUTS)
  dtype: str = option(choices=ops.DTYPES)
  ops: str = option(choices=ops.BACKENDS)  # Last: the field's name hides the module below.
  blocks: tuple[shapes.Block, ...] = ()


@dataclasses.dataclass(frozen=True)
class Spec:
  """A config, checked and read once (`read`, `validate`): what train.py and the modules
  below it take instead of the ConfigDict, with the same attribute names. `record` is
  the config as a nested dict, as config.json and TensorBoard's hparams keep it."""
  seed: int = option(SEED)
  batch_size: int = option(POSITIVE)
  eval_batch_size: int = option(POSITIVE)
  num_epochs: int = option(POSITIVE)
  learning_rate: float = option(POSITIVE)
  optimizer: str = option(choices=optim.OPTIMIZERS)
  momentum: float = option(NON_NEGATIVE)
  weight_decay: float = option(NON_NEGATIVE)
  label_smoothing: float = option(FRACTION)
  schedule: str = option(choices=optim.SCHEDULES)
  warmup_epochs: float = option(NON_NEGATIVE)
  log_every_steps: int = option(NON_NEGATIVE)
  num_devices: int = option(NON_NEGATIVE)
  parallel: str = option(choices=('pmap', 'jit'))
  micro_batch_size: int = option(NON_NEGATIVE)
  num_seeds: int = option(POSITIVE)
  checkpoint_every_steps: int = option(NON_NEGATIVE)
  keep_checkpoints: int = option(POSITIVE)
  divergence_factor: float = option(NON_NEGATIVE)
  progress: bool = option()
  profile_steps: int = option(NON_NEGATIVE)
  data: Data = option()
  model: Model = option()
  record: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


def _keys(spec: type, prefix: str = '') -> dict[str, Key]:
  """The config keys of a spec class, from its option() fields (nested specs too)."""
  keys = {}
  for f in dataclasses.fields(spec):
    if 'key' not in f.metadata:
      continue
    if dataclasses.is_dataclass(f.type):
      keys.update(_keys(f.type, f'{prefix}{f.name}.'))
      continue
    rule, choices = f.metadata['key']
    item = typing.get_args(f.type)[0] if typing.get_origin(f.type) is tuple else None
    keys[prefix + f.name] = Key(tuple if item else f.type, item=item, choices=choices,
                                rule=rule)
  return keys


SCHEMA = {
    **_keys(Spec),
    **{f'model.{name}': dataclasses.replace(key, kind=tuple, item=key.kind)
       for name, key in BLOCK_SCHEMA.items()},
}


# Keys added since runs were first written, and the value that reproduces what a run
# whose config.json lacks the key computed (read by workdir.config_from_dict); for a
# per-block key, its field's default.
ABSENT = {'model.dtype': 'float32', 'profile_steps': 0, 'label_smoothing': 0.0,
          'data.augment': 'none', 'data.augment_pixels': 2,  # No augmentation before them.
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


def get(spec, key: str):
  """A spec's value of a dotted config key ('model.dropout')."""
  return functools.reduce(getattr, key.split('.'), spec)


def replace(spec, values: dict[str, Any]):
  """A copy of spec with dotted config keys set, unchecked: a vmapped sweep group's traced
  values (train.member_state) go where the model and optimizer read them."""
  nested: dict[str, dict] = {}
  for key, value in values.items():
    head, _, rest = key.partition('.')
    nested.setdefault(head, {})[rest] = value
  return dataclasses.replace(spec, **{
      head: replace(getattr(spec, head), inner) if '' not in inner else inner['']
      for head, inner in nested.items()})


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


def read(config) -> Spec:
  """The config as a Spec; raises ConfigError naming the first key whose value cannot
  be read: unknown or missing keys, wrong types or values, per-block tuples of the wrong
  length. What depends on this machine's devices is `validate`'s."""
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
      if key.kind is tuple:
        flat[name] = tuple(flat[name])
  if flat['seed'] + flat['num_seeds'] > MAX_SEED:
    raise ConfigError(f'seed={flat["seed"]} + num_seeds={flat["num_seeds"]} exceeds {MAX_SEED}')
  spec = _spec(Spec, flat)
  return dataclasses.replace(spec, model=dataclasses.replace(spec.model, blocks=_blocks(flat)),
                             record=config.to_dict())


def _spec(spec: type, flat: dict[str, Any], prefix: str = ''):
  """A spec class filled from the flat config (nested specs from their prefix)."""
  return spec(**{f.name: (_spec(f.type, flat, f'{prefix}{f.name}.')
                          if dataclasses.is_dataclass(f.type) else flat[prefix + f.name])
                 for f in dataclasses.fields(spec) if 'key' in f.metadata})


def _blocks(flat: dict[str, Any]) -> tuple[shapes.Block, ...]:
  """The per-block tuples -> one shapes.Block per block (model.num_blocks)."""
  n = flat['model.num_blocks']
  columns = {}
  for name in BLOCK_SCHEMA:
    values = flat.get(f'model.{name}', (BLOCK_DEFAULTS.get(name),))
    if len(values) not in (1, n):
      raise ConfigError(f'model.{name} has {len(values)} entries {values} but '
                        f'model.num_blocks is {n}: give one value for all blocks or one per '
                        f'block')
    columns[name] = values * n if len(values) == 1 else values
  blocks = tuple(shapes.Block(**{name: columns[name][i] for name in BLOCK_SCHEMA})
                 for i in range(n))
  for i, block in enumerate(blocks):
    if block.norm == 'group' and block.filters % block.norm_groups:
      raise ConfigError(f"model.norm_groups: block {i}'s {block.filters} filters do not "
                        f"split into {block.norm_groups} groups for norm='group'; use a "
                        f'divisor of {block.filters}')
  return blocks


def validate(config, available_devices: int) -> Spec:
  """`read`, then what depends on the devices: the config as a Spec, or ConfigError
  naming the first key whose value cannot work on `available_devices` devices."""
  spec = read(config)
  if spec.num_devices > available_devices:
    raise ConfigError(f'num_devices={spec.num_devices} but only {available_devices} local '
                      f'devices exist')
  num_devices = spec.num_devices or available_devices
  for key in ('batch_size', 'eval_batch_size'):
    if getattr(spec, key) % num_devices:
      raise ConfigError(f'{key}={getattr(spec, key)} is not divisible by the {num_devices} '
                        f'devices; use a multiple of {num_devices}')
  per_device = spec.batch_size // num_devices
  micro = spec.micro_batch_size
  if micro and per_device % micro:
    raise ConfigError(f'micro_batch_size={micro} does not divide the per-device batch of '
                      f'{per_device} (batch_size={spec.batch_size} over {num_devices} '
                      f'device(s)); use a divisor of {per_device}, or 0 for the whole batch')
  every, log_every = spec.checkpoint_every_steps, spec.log_every_steps
  if every and (not log_every or every % log_every):
    raise ConfigError(f'checkpoint_every_steps={every}: checkpoints are written where a compiled '
                      f'chunk of steps ends (every log_every_steps={log_every} steps; 0 = whole '
                      f'epochs), so it must be a multiple of log_every_steps > 0')
  if spec.model.dtype == 'bfloat16' and ops.resolve(spec.model.ops) == 'cpu':
    raise ConfigError("model.dtype='bfloat16' computes on the library ops, and the CPU kernels "
                      "that model.ops picks here compute in float32: set model.ops='xla', or "
                      "model.dtype='auto'")
  if micro and micro < per_device and any(block.norm == 'batch' for block in spec.model.blocks):
    raise ConfigError(f'micro_batch_size={micro} with model.norm=\'batch\': BatchNorm would '
                      f'normalise over slices of {micro}, not the batch; use 0')
  return spec


def check_shapes(blocks: Sequence[shapes.Block], image_shape: Sequence[int]) -> None:
  """Raises ConfigError if a kernel or pooling window does not fit its block's input."""
  h, w, _ = image_shape
  for i, block in enumerate(blocks):
    k = block.conv_extent
    if k > min(h, w):
      spans = f' spanning {k}x{k} (Block.conv_extent)' if k != block.kernel_size else ''
      raise ConfigError(f'model.kernel_size: block {i} has a {block.kernel_size}x'
                        f'{block.kernel_size} kernel{spans} but its input is only {h}x{w}')
    conv_h, conv_w = block.conv_output_size(h), block.conv_output_size(w)
    pooled = [block.output_size(n) for n in (h, w)]
    if min(pooled) < 1:
      # The stride is to blame if the window would have fit the map a stride of 1 leaves.
      unstrided = dataclasses.replace(block, stride=1).output_size(min(h, w))
      blame = 'model.stride' if block.stride > 1 and unstrided >= 1 else 'model.pool_size'
      raise ConfigError(f'{blame}: block {i}\'s conv (kernel {k}, stride {block.stride}, '
                        f'{block.padding}) takes {h}x{w} to {conv_h}x{conv_w}, which its '
                        f'{block.pool_size}x{block.pool_size} pooling leaves less than 1x1')
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
