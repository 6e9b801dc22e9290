"""What a run keeps on disk: config.json, metrics.jsonl, results.json, checkpoints/.

Writes are atomic (temporary file + rename) so a crash never leaves half a file,
and a workdir is only ever resumed by the config that started it.
"""

import json
import os

from convnet import config_lib

# Keys that change how often things are written, or where data is read from, but
# not the numbers a run produces; a resume may change them freely.
RESUMABLE_CHANGES = ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                     'progress', 'parallel', 'data.dir', 'data.download')


class ConfigMismatchError(ValueError):
  """Resuming a workdir with a config that would change its results."""


def write_json(path: str, data) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(data, f, indent=2)
  os.replace(path + '.tmp', path)


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def append_jsonl(path: str, record: dict) -> None:
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def keep_records_up_to(path: str, step: int) -> None:
  """Drops metrics logged after `step` (the checkpoint a resume starts from)."""
  records = [r for r in read_jsonl(path) if r['step'] <= step]
  with open(path + '.tmp', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  os.replace(path + '.tmp', path)


def config_diff(saved: dict, new: dict) -> list[str]:
  """'key: saved -> new' for every key that differs and would change the results."""
  saved, new = config_lib.flatten(saved), config_lib.flatten(new)
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


def prepare(workdir: str, config: dict, allow_config_change: bool = False,
            write: bool = True) -> None:
  """Creates workdir, or checks that the run in it may be resumed with this config.

  Refuses a finished run (results.json exists) and a config that differs from the
  saved one in a key that changes results, unless allow_config_change. With
  write=False (processes other than 0) it only checks. Whether training resumes
  is up to the checkpoints found, not to this.
  """
  if not write:
    if os.path.exists(os.path.join(workdir, 'results.json')):
      raise FileExistsError(f'{workdir} holds a finished run; choose a new --workdir')
    return
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise PermissionError(f'{workdir}: cannot create the workdir ({e.strerror})') from e
  if not os.access(workdir, os.W_OK):
    raise PermissionError(f'{workdir}: workdir is not writable')
  results = os.path.join(workdir, 'results.json')
  if os.path.exists(results):
    raise FileExistsError(f'{results} exists: {workdir} holds a finished run; choose a new '
                          f'--workdir')
  saved_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(saved_path):
    write_json(saved_path, config)
    return
  diff = config_diff(read_json(saved_path), config)
  if diff and not allow_config_change:
    raise ConfigMismatchError(
        f'{saved_path} differs from this config in keys that change results:\n  '
        + '\n  '.join(diff) + '\nuse a new --workdir, or pass --allow_config_change to resume '
        'anyway (e.g. to train for more epochs)')
  if diff:
    os.replace(saved_path, saved_path + '.before_change')
    write_json(saved_path, config)
