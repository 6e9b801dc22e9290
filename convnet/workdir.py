"""What a run keeps on disk: config.json, data.json, metrics.jsonl, results.json, checkpoints/.

Writes are atomic (temporary file + rename) so a crash never leaves half a file,
and a workdir is only ever resumed by the config and data that started it.
data.json holds what inference needs besides the checkpoint (image shape, class
count, normalisation statistics), so predict and visualize never reload the training
set, and a fingerprint of the arrays trained on.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import threading
import time

import ml_collections

from convnet import config_lib, ops

# Keys that change how often things are written, or where data is read from, but
# not the numbers a run produces; a resume may change them freely.
# The kernels (model.ops, model.layout) compute the same function up to float rounding,
# and model.dtype is how precisely (the parameters are float32 either way), so a run
# started on a CPU may resume on a GPU; data.dir may move, as the data's
# fingerprint (data.json) guards what is read there.
RESUMABLE_CHANGES = ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                     'divergence_factor', 'progress', 'profile_steps', 'parallel', 'data.dir',
                     'data.download', 'model.ops', 'model.layout', 'model.dtype')


class ConfigMismatchError(ValueError):
  """Resuming a workdir with a config that would change its results."""


class LockedError(RuntimeError):
  """The workdir is in use by another live process."""


@contextlib.contextmanager
def locked(directory: str, wait: bool = False):
  """An exclusive lock on `directory` for the life of the block, or LockedError naming the
  process holding it (`wait=True`: waits for it instead).

  The lock is a flock on the directory itself, which the kernel releases when its holder
  dies, so a lock left by a killed process never blocks, and deleting or replacing files
  in the directory never frees it. `directory`/.lock names the holder's PID for others'
  messages; it is removed on release only while it still names this process.
  """
  fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
  except BlockingIOError:
    os.close(fd)
    raise LockedError(f'{directory} is in use by process {lock_holder(directory)}; wait for '
                      f'it to finish, stop it, or use another directory') from None
  pid_file = os.path.join(directory, '.lock')
  try:
    write_text(pid_file, f'{os.getpid()}\n')
    yield
  finally:
    if lock_holder(directory, patience_s=0.0) == str(os.getpid()):
      os.unlink(pid_file)
    os.close(fd)


def lock_holder(directory: str, patience_s: float = 1.0) -> str:
  """The PID the lock's holder wrote into `directory`/.lock (a holder that has just taken
  the lock is given `patience_s` to write it), or words saying it is missing."""
  deadline = time.time() + patience_s
  while True:
    try:
      with open(os.path.join(directory, '.lock')) as f:
        return f.read().strip()
    except FileNotFoundError:
      if time.time() >= deadline:
        return '(unknown: its .lock file was removed)'
      time.sleep(0.02)


class WorkdirError(ValueError):
  """A --workdir that cannot hold a run; the message says why."""


# Room under a workdir for the paths it writes (orbax's checkpoint files are the deepest).
DEPTH_RESERVE = 512


def check_path(workdir: str) -> None:
  """Refuses a workdir path that cannot hold a run, before anything is written there."""
  if not workdir:
    raise WorkdirError('--workdir is empty: give the directory to write the run to')
  if os.path.islink(workdir) and not os.path.exists(workdir):
    raise WorkdirError(f'{workdir} is a symbolic link to {os.readlink(workdir)}, which does not '
                       f'exist: create that directory, or give another --workdir')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'{workdir} is a file, not a directory: give another --workdir')
  limit = os.pathconf('/', 'PC_PATH_MAX') - DEPTH_RESERVE
  if len(os.path.abspath(workdir).encode()) > limit:
    raise WorkdirError(f'--workdir is {len(os.path.abspath(workdir).encode())} bytes long '
                       f'(as an absolute path): the files under it would pass the system\'s '
                       f'path limit; use one of at most {limit} bytes')


@contextlib.contextmanager
def claim(workdir: str, enabled: bool = True):
  """The workdir, created if need be and locked for the life of the block.

  If the block fails before the run wrote any file (a refusal, a model too big to
  compile), a workdir this created is removed again: a failed start leaves the disk as
  it found it. Processes other than 0 (`enabled=False`) neither create nor lock it.
  """
  if not enabled:
    yield
    return
  check_path(workdir)
  created = not os.path.exists(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise PermissionError(f'{workdir}: cannot create the workdir ({e.strerror})') from e
  if not os.access(workdir, os.W_OK):
    raise PermissionError(f'{workdir}: workdir is not writable')
  try:
    with locked(workdir):
      yield
  except BaseException:
    if created and not any(files for _, _, files in os.walk(workdir)):
      shutil.rmtree(workdir, ignore_errors=True)
    raise


def write_text(path: str, text: str) -> None:
  """Writes `path` whole or not at all: a temporary file of this process and thread,
  then a rename, so concurrent writers never share (or remove) each other's."""
  tmp = f'{path}.{os.getpid()}.{threading.get_ident()}.tmp'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def write_json(path: str, data) -> None:
  write_text(path, json.dumps(data, indent=2))


class RecordError(ValueError):
  """A run's file that cannot be read; the message names it."""


def read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise RecordError(f'{path}: not valid JSON ({e}); the file is damaged') from e


def config_from_dict(data: dict, where: str = 'config.json') -> ml_collections.ConfigDict:
  """config.json -> ConfigDict, with JSON's lists turned back into tuples, and the keys
  added since it was written (config_lib.ABSENT) as the run computed without them, said
  in one line naming them."""
  def tuples(value):
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    return tuple(value) if isinstance(value, list) else value
  config = ml_collections.ConfigDict(tuples(data))
  added = []
  for key, value in config_lib.ABSENT.items():
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    if leaf not in node:
      node[leaf] = value
      added.append(f'{key}={value!r}')
  if added:
    ops.say_once(f'{where} predates {len(added)} key(s); read as the run computed without '
                 f'them: {", ".join(added)}')
  return config


def append_jsonl(path: str, record: dict) -> None:
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSON-lines file. A torn last line (a crash in mid-append) is
  dropped with a warning; a damaged line before it is an error naming the file."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f.read().split('\n') if line.strip()]
  records = []
  for number, line in enumerate(lines, 1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number < len(lines):
        raise RecordError(f'{path}: line {number} is not valid JSON ({e})') from e
      print(f'warning: {path}: ignoring its torn last line (a crash in mid-append)',
            file=sys.stderr, flush=True)
  return records


def keep_records_up_to(path: str, step: int) -> None:
  """Drops metrics logged after `step` (the checkpoint a resume starts from)."""
  records = [r for r in read_jsonl(path) if r['step'] <= step]
  write_text(path, ''.join(json.dumps(r) + '\n' for r in records))


def fingerprint(split) -> dict:
  """Count, shape and sha256 of a split's images and labels: its identity, wherever it lives."""
  digest = hashlib.sha256()
  for array in split:
    digest.update(str((array.dtype.str, array.shape)).encode())
    digest.update(memoryview(array.ravel() if array.flags.c_contiguous else array.copy()))
  return {'count': int(len(split.labels)), 'image_shape': list(split.images.shape[1:]),
          'sha256': digest.hexdigest()}


def data_record(data, spec, num_devices: int) -> dict:
  """data.json: what inference needs, and the fingerprint of the data trained on (and
  the device count it was split over)."""
  return {'image_shape': list(data.train.images.shape[1:]), 'num_devices': num_devices,
          'num_classes': int(spec.model.num_classes),
          'mean': [float(m) for m in data.mean], 'std': [float(s) for s in data.std],
          'train': fingerprint(data.train), 'test': fingerprint(data.test)}


def data_diff(saved: dict, new: dict) -> list[str]:
  """'split key: saved -> new' for each fingerprint field that differs, and 'mean'/'std'
  when the normalisation statistics do."""
  lines = [f'{split} {key}: {saved.get(split, {}).get(key)!r} -> {new[split][key]!r}'
           for split in ('train', 'test') if split in new for key in new[split]
           if saved.get(split, {}).get(key) != new[split][key]]
  return lines + [f'{key}: {saved.get(key)} -> {new[key]}' for key in ('mean', 'std')
                  if key in new and saved.get(key) != new[key]]


def config_diff(saved: dict, new: dict, where: str = 'config.json') -> list[str]:
  """'key: saved -> new' for every key that differs and would change the results. A key
  added since `saved` was written is compared as config_lib.ABSENT says the run computed."""
  saved, new = (config_lib.flatten(config_from_dict(c, where).to_dict()) for c in (saved, new))
  lines = []
  for key in sorted(set(saved) | set(new)):
    old_value, new_value = saved.get(key, '<absent>'), new.get(key, '<absent>')
    if isinstance(old_value, list):  # JSON turns tuples into lists.
      old_value = tuple(old_value)
    if isinstance(new_value, list):
      new_value = tuple(new_value)
    if key not in RESUMABLE_CHANGES and old_value != new_value:
      lines.append(f'{key}: {old_value!r} -> {new_value!r}')
  return lines


def prepare(workdir: str, config: dict, data: dict,
            allow_config_change: bool = False) -> dict[str, dict]:
  """Checks that the run in workdir may be resumed with this config, data and device
  count; returns the records to write once the run has started (`start`).

  Refuses a finished run (results.json exists), data whose fingerprint differs from
  the saved one, another device count (per-device batches change the numbers) and a
  config that differs from the saved one in a key that changes results, the last two
  unless allow_config_change. Writes nothing. Whether training resumes is up to the
  checkpoints found, not to this.
  """
  results = os.path.join(workdir, 'results.json')
  if os.path.exists(results):
    raise FileExistsError(f'{results} exists: {workdir} holds a finished run; choose a new '
                          f'--workdir')
  if not os.path.exists(os.path.join(workdir, 'config.json')):
    return {'config.json': config, 'data.json': data}
  data_lines, diff = differences(workdir, config, data)
  if data_lines:
    raise ConfigMismatchError(f'{os.path.join(workdir, "data.json")}: this run was trained on '
                              f'other data:\n  ' + '\n  '.join(data_lines) + '\nuse a new '
                              '--workdir, or the data it was trained on')
  if diff and not allow_config_change:
    raise ConfigMismatchError(
        f'{os.path.join(workdir, "config.json")} differs from this run in what changes '
        f'results:\n  ' + '\n  '.join(diff) + '\nuse a new --workdir, or pass '
        '--allow_config_change to resume anyway (e.g. to train for more epochs)')
  return {'config.json': config, 'data.json': data}


def differences(workdir: str, config: dict, data: dict) -> tuple[list[str], list[str]]:
  """(data differences, the others: config keys that change results and the device count)
  between the run recorded in workdir and this config and data record."""
  data_path = os.path.join(workdir, 'data.json')
  saved_data = read_json(data_path) if os.path.exists(data_path) else {}
  path = os.path.join(workdir, 'config.json')
  lines = config_diff(read_json(path), config, path)
  devices = saved_data.get('num_devices', data['num_devices'])
  if devices != data['num_devices']:
    lines.append(f'devices: {devices} -> {data["num_devices"]} (per-device batches and random '
                 f'streams change; --config.num_devices={devices} resumes as it started)')
  return (data_diff(saved_data, data) if saved_data else []), lines


def start(workdir: str, records: dict[str, dict]) -> None:
  """Writes the records `prepare` returned, once the run is known to start. A changed
  config.json keeps its predecessor as config.json.before_change; a data.json written
  for another device count keeps the earlier counts (the run's numbers depend on each)."""
  for name, record in records.items():
    path = os.path.join(workdir, name)
    saved = read_json(path) if os.path.exists(path) else None
    if name == 'config.json' and saved is not None and saved != json.loads(json.dumps(record)):
      os.replace(path, path + '.before_change')
    if name == 'data.json' and saved and saved.get('num_devices', record['num_devices']) != (
        record['num_devices']):
      earlier = saved.get('earlier_num_devices', []) + [saved['num_devices']]
      record = {**record, 'earlier_num_devices': earlier}
    write_json(path, record)