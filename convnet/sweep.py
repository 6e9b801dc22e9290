"""Sweeps: one base config, a list of override points, each trained in its own workdir.

An experiment file (experiments/*.py) has `get_config()` (the base) and
`get_sweep()` (the points), built from small sweeps:

    product(values('model.filters', [8, 16]), values('model.kernel_size', [3, 5]))
    # -> [{'model.filters': 8, 'model.kernel_size': 3}, ... 4 points]
    zipped(values('model.num_blocks', [1, 2]), values('model.filters', [(32,), (32, 64)]))
    # -> [{'model.num_blocks': 1, 'model.filters': (32,)}, ... 2 points]

    python -m convnet.sweep --config experiments/filters_kernel.py --workdir runs/fk \
        [--config.num_epochs=1] [--num_workers=N --worker_index=K]

Each point's workdir is named after its overrides. Every point is checked before the
first trains (config, shapes, directory name). A point with a results.json is skipped
if it was trained with the same config and data (else the sweep is refused, naming
the point and the differences), an unfinished one resumes from its checkpoint, so
rerunning the command finishes a sweep. Worker K of N runs points K, K+N, K+2N, ...: any scheduler
(Slurm arrays, several Colab sessions) can split a sweep over a shared filesystem;
a worker whose base config (command-line overrides included) or points differ from what
the first recorded (base_config.json, sweep.json) is refused, and a point another
worker is training is skipped (left pending in the table). Points that differ only in
keys that change no shape (train.VMAPPED_KEYS) train vmapped in one program
(program_groups), each still in its own workdir.
"""

import concurrent.futures
import importlib.util
import itertools
import json
import os
import queue
import sys
import threading
from typing import NamedTuple

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from convnet import checkpoint, config_lib, metric_writer, parallel, report, train, workdir

SWEEP_FILE = 'sweep.json'
BASE_FILE = 'base_config.json'


def values(key: str, vals) -> list[dict]:
  """One key taking each of vals: [{key: v} for v in vals]."""
  return [{key: v} for v in vals]


def product(*sweeps: list[dict]) -> list[dict]:
  """Every combination of one point from each sweep (the last varies fastest)."""
  return [dict(itertools.chain.from_iterable(p.items() for p in combo))
          for combo in itertools.product(*sweeps)]


def zipped(*sweeps: list[dict]) -> list[dict]:
  """The i-th points of all sweeps merged; the sweeps must have equal lengths."""
  lengths = {len(s) for s in sweeps}
  if len(lengths) > 1:
    raise ValueError(f'zipped sweeps have different lengths {sorted(lengths)}')
  return [dict(itertools.chain.from_iterable(p.items() for p in combo))
          for combo in zip(*sweeps)]


def _format(value) -> str:
  if isinstance(value, (tuple, list)):
    return '-'.join(_format(v) for v in value) or 'none'
  return str(value)


def point_name(overrides: dict) -> str:
  """'model.filters=8,model.kernel_size=3': the point's workdir name."""
  return ','.join(f'{key}={_format(value)}' for key, value in overrides.items()) or 'base'


def apply_overrides(base, overrides: dict):
  """A copy of base with overrides set; a scalar for a per-block tuple key means all blocks."""
  config = base.copy_and_resolve_references()
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      if parent not in node:
        raise config_lib.ConfigError(f'sweep override {key!r}: unknown config key')
      node = node[parent]
    if leaf not in node:
      raise config_lib.ConfigError(f'sweep override {key!r}: unknown config key')
    if isinstance(node[leaf], tuple) and not isinstance(value, (tuple, list)):
      value = (value,)
    try:
      node[leaf] = tuple(value) if isinstance(value, list) else value
    except TypeError as e:
      raise config_lib.ConfigError(f'sweep override {key}={value!r}: {e}') from e
  return config


class Point(NamedTuple):
  """A sweep point: its place among the sweep's points, its directory's name, its config
  and that config read (once) into a Spec."""
  index: int
  count: int
  name: str
  config: ml_collections.ConfigDict
  spec: config_lib.Spec


def expand(base, points: list[dict], available_devices: int) -> list[Point]:
  """Every point, each validated: errors name the point and the key."""
  expanded = []
  for index, overrides in enumerate(points):
    name = point_name(overrides)
    config = apply_overrides(base, overrides)
    try:
      spec = config_lib.validate(config, available_devices)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f'sweep point {name}: {e}') from e
    expanded.append(Point(index, len(points), name, config, spec))
  names = [point.name for point in expanded]
  if len(set(names)) != len(names):
    raise config_lib.ConfigError(f'sweep has repeated points: {names}')
  return expanded


def check_points(expanded: list[Point], sweep_dir: str) -> None:
  """Before any point trains: each point's directory is one safe name inside sweep_dir,
  its model fits its data, and a finished point was trained with this config and data
  (else its row would mix into the table as if it were)."""
  datasets = {}
  for point in expanded:
    name, spec = point.name, point.spec
    if (name != os.path.basename(name) or name.startswith('.') or '\0' in name
        or len(name.encode()) > 255):
      raise config_lib.ConfigError(
          f'sweep point {name[:100]!r}: its directory name must be one path component (no '
          f'"/", not starting with ".") of at most 255 bytes; shorten or change its values')
    data_key = (spec.data.source, spec.data.dir, spec.data.name, spec.data.num_train,
                spec.model.num_classes)
    if data_key not in datasets:
      data = train.load_data(spec)
      num_devices = len(parallel.participating_devices(spec.num_devices)[0])
      datasets[data_key] = (data, workdir.data_record(data, spec, num_devices))
    data, record = datasets[data_key]
    try:
      train.check_data(spec, data)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f'sweep point {name}: {e}') from e
    point_dir = os.path.join(sweep_dir, name)
    workdir.check_path(point_dir)
    if os.path.exists(os.path.join(point_dir, 'results.json')):
      data_lines, diff = workdir.differences(point_dir, spec.record, record)
      diff += data_lines
      if diff:
        raise workdir.ConfigMismatchError(
            f'sweep point {name} finished with another config or data:\n  '
            + '\n  '.join(diff) + f'\nuse a new --workdir, or remove {point_dir} to retrain '
            'that point')


def record_sweep(sweep_dir: str, base: dict, points: list[dict]) -> None:
  """Records the sweep in its directory: its points (sweep.json) and its base config with
  the command line's overrides (base_config.json). A worker or rerun whose base config
  or points differ is refused, naming the differences, so one table never mixes them."""
  base_path, points_path = (os.path.join(sweep_dir, n) for n in (BASE_FILE, SWEEP_FILE))
  if os.path.exists(base_path):
    diff = workdir.config_diff(workdir.read_json(base_path), base, base_path)
    if diff:
      raise workdir.ConfigMismatchError(
          f'{sweep_dir} is a sweep of another base config ({base_path}): {"; ".join(diff)}; '
          f'give the same --config overrides as its other workers, or use a new --workdir')
  points = json.loads(json.dumps(points))  # As they read back: tuples become lists.
  if os.path.exists(points_path):
    recorded = workdir.read_json(points_path)
    if recorded != points:
      names, recorded_names = [p['name'] for p in points], [p['name'] for p in recorded]
      raise workdir.ConfigMismatchError(
          f'{sweep_dir} is a sweep of other points ({points_path}): only there '
          f'{[n for n in recorded_names if n not in names]}, only here '
          f'{[n for n in names if n not in recorded_names]}; use the same experiment file, '
          f'or a new --workdir')
  else:
    workdir.write_json(points_path, points)
  workdir.write_json(base_path, base)


def load_sweep(path: str) -> list[dict]:
  """get_sweep() of an experiment file (given as for --config, an optional ':arg' ignored)."""
  path = path.split(':')[0]
  spec = importlib.util.spec_from_file_location('experiment', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise config_lib.ConfigError(f'{path} has no get_sweep(): not an experiment file')
  return module.get_sweep()


def worker_share(num_points: int, num_workers: int, worker_index: int) -> list[int]:
  """The point indices worker_index of num_workers runs: a fixed, disjoint partition."""
  if not 0 <= worker_index < num_workers:
    raise config_lib.ConfigError(f'--worker_index={worker_index} must be in [0, '
                                 f'--num_workers={num_workers})')
  return list(range(worker_index, num_points, num_workers))


def default_points_at_once() -> int:
  """One point per device on GPUs and TPUs, where one small model leaves a device mostly
  idle; two on a CPU, where one trains while the other compiles, evaluates or writes
  (docs/performance.md has it measured)."""
  import jax  # pylint: disable=import-outside-toplevel
  return 2 if jax.default_backend() == 'cpu' else jax.local_device_count()


def program_groups(todo: list[Point], sweep_dir: str, vmap_points: int) -> list[list[Point]]:
  """The points in groups that train as one vmapped program (train.train_together): those
  whose configs differ only in train.VMAPPED_KEYS and that resume from the same step, at
  most vmap_points (0: no limit) per group, in the sweep's order."""
  groups: dict = {}
  for point in todo:
    key = json.dumps([train.program_key(point.spec),
                      checkpoint.latest_step(os.path.join(sweep_dir, point.name))],
                     sort_keys=True, default=str)
    if key not in groups or len(groups[key][-1]) == (vmap_points or len(todo)):
      groups.setdefault(key, []).append([])
    groups[key][-1].append(point)
  return sorted((g for gs in groups.values() for g in gs), key=lambda g: g[0].index)


def run(base, points: list[dict], sweep_dir: str, num_workers: int = 1,
        worker_index: int = 0, points_at_once: int | None = None,
        vmap_points: int = 0) -> list[dict]:
  """Trains this worker's unfinished points; returns the table of everything on disk.

  points_at_once > 1 trains that many programs at once, each on one device (num_devices=1,
  so each point equals that point trained alone on one device), round-robin over the local
  devices: several per device when there are more at once than devices. 1 trains one at
  a time on the devices the config asks for. Default: default_points_at_once. A program
  holds one point, or up to vmap_points that differ only in train.VMAPPED_KEYS, vmapped
  (program_groups); 0: as many as share the points out over points_at_once programs.
  On every backend, a 2-core CPU too, that is faster than one program per point
  (docs/performance.md).
  The table rows are plain dicts (see report.collect), so a notebook needs no pandas.
  """
  import jax  # pylint: disable=import-outside-toplevel
  given = base.to_dict()
  points_at_once = points_at_once or default_points_at_once()
  slots = [None]  # The devices a point trains on: the config's own.
  if points_at_once > 1:
    base = base.copy_and_resolve_references()
    base.num_devices, base.progress = 1, False  # One bar per point would garble the output.
    slots = [[jax.local_devices()[i % jax.local_device_count()]] for i in range(points_at_once)]
  expanded = expand(base, points, jax.local_device_count())
  share = worker_share(len(expanded), num_workers, worker_index)
  workdir.check_path(sweep_dir)
  check_points(expanded, sweep_dir)
  os.makedirs(sweep_dir, exist_ok=True)
  with workdir.locked(sweep_dir, wait=True):  # Workers starting together take turns here.
    record_sweep(sweep_dir, given, [{'name': point.name, 'overrides': overrides}
                                    for point, overrides in zip(expanded, points)])
  # Workers share the directory, each its own points; the same worker twice is refused.
  worker_dir = os.path.join(sweep_dir, '.workers', str(worker_index))
  os.makedirs(worker_dir, exist_ok=True)
  with workdir.locked(worker_dir):
    todo = [expanded[i] for i in share if not os.path.exists(
        os.path.join(sweep_dir, expanded[i].name, 'results.json'))]
    groups = program_groups(todo, sweep_dir, vmap_points or -(-len(todo) // points_at_once))
    programs = (f'{len(todo)} points in {len(groups)} vmapped programs'
                if len(groups) < len(todo) else 'one program per point')
    at_once = (f'{points_at_once} at once, each on one device of {jax.local_device_count()}'
               if points_at_once > 1 else 'one at a time')
    print(f'sweep {sweep_dir}: {len(expanded)} points, {len(share)} for worker {worker_index} of '
          f'{num_workers}, {len(share) - len(todo)} already done; {programs}, {at_once}',
          flush=True)
    train_points(groups, sweep_dir, slots)
  rows = report.collect(sweep_dir)
  report.write(sweep_dir, rows)
  return rows


def train_points(groups: list[list[Point]], sweep_dir: str, slots: list) -> None:
  """Trains the groups of points (program_groups) in threads, one per slot (the devices a
  group trains on, or None for its config's own) at a time.
  After a group fails, no new one starts, and the first error is raised once the running
  ones end; SIGTERM/SIGINT stops every running group at its next checkpoint
  (train.Interrupted)."""
  free = queue.Queue()
  for slot in slots:
    free.put(slot)
  failed = threading.Event()

  def train_group(group):
    if failed.is_set():
      return
    devices = free.get()
    numbers = [f'{point.index + 1}' for point in group]
    count = group[0].count
    try:
      where = f' on {devices[0]}' if devices else ''
      together = f', vmapped with {len(group) - 1} more' if len(group) > 1 else ''
      for point in group:
        metric_writer.print_line(
            f'== point {point.index + 1} of {count}{where}{together}: {point.name}')
      with metric_writer.line_prefix(f'[point {"+".join(numbers)}] '):
        results = train.train_together(
            [(point.config, os.path.join(sweep_dir, point.name)) for point in group],
            devices=devices, stop_requested=stop_requested,
            prefixes=[f'[point {number}] ' for number in numbers])
      for point, result in zip(group, results):
        metric_writer.print_line(f'== point {point.index + 1} of {count} done: {point.name}: '
                                 + train.summary_line(result))
    except workdir.LockedError as e:  # Another worker's share overlaps this one's.
      metric_writer.print_line(f'== point {"+".join(numbers)} of {count} skipped: {e}')
    except BaseException:
      failed.set()
      raise
    finally:
      free.put(devices)

  with train.stop_requests() as stop_requested, \
       concurrent.futures.ThreadPoolExecutor(len(slots)) as pool:
    futures = [pool.submit(train_group, group) for group in groups]
  errors = [f.exception() for f in futures if f.exception() is not None]
  if errors:
    raise next((e for e in errors if not isinstance(e, train.Interrupted)), errors[0])


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  if COMPILATION_CACHE.value:  # Points of the same shapes share their compiled programs.
    parallel.use_compilation_cache(parallel.compilation_cache_dir())
  try:
    parallel.start_backend()
    points = load_sweep(flags.FLAGS['config'].config_filename)
    num_workers, worker_index = NUM_WORKERS.value, WORKER_INDEX.value
    if num_workers is None and worker_index is None:  # A SLURM array task says which.
      num_workers, worker_index = parallel.slurm_array_worker() or (1, 0)
    rows = run(CONFIG.value, points, WORKDIR.value, num_workers or 1, worker_index or 0,
               POINTS_AT_ONCE.value, VMAP_POINTS.value)
  except train.Interrupted as e:
    print(f'stopped: {e}', file=sys.stderr)
    sys.exit(train.EXIT_INTERRUPTED)
  except train.USER_ERRORS as e:
    sys.exit(f'error: {e}')
  print(report.markdown_table(rows))


if __name__ == '__main__':
  CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file, e.g. '
                                           'experiments/filters_kernel.py.', lock_config=True)
  WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory: one sub-workdir per point.')
  NUM_WORKERS = flags.DEFINE_integer('num_workers', None, 'Split the points over this many '
                                     'workers (default: a SLURM array\'s task count, else 1).')
  WORKER_INDEX = flags.DEFINE_integer('worker_index', None, 'Which worker this is, 0-based '
                                      '(default: the SLURM array task\'s index, else 0).')
  POINTS_AT_ONCE = flags.DEFINE_integer(
      'points_at_once', None, 'Train this many programs (a point, or points vmapped '
      'together: --vmap_points) at once, each on one device (num_devices=1), round-robin '
      'over the devices; 1 = one at a time, on the devices the config asks for. Default: '
      'one per device on GPU and TPU, 2 on CPU.',
      lower_bound=1)
  VMAP_POINTS = flags.DEFINE_integer(
      'vmap_points', 0, 'Train up to this many points that differ only in keys that '
      f'change no shape ({", ".join(train.VMAPPED_KEYS)}) as one vmapped program, each in '
      'its own workdir; 0 = as many as share the points out over --points_at_once '
      'programs, 1 = one program per point.',
      lower_bound=0)
  COMPILATION_CACHE = flags.DEFINE_bool(
      'compilation_cache', True, 'Keep compiled programs in $CONVNET_CACHE (default '
      '~/.cache/convnet/jax), so points of the same shapes, and reruns, skip compiling.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=config_lib.parse_flags)
