"""Orbax checkpoints of the train state: written in the background, restored with checks.

`save` hands a copy of the state (host arrays, or a device copy no later step reuses)
to a writer thread and returns: the thread fetches it to the host, has orbax write it,
then writes the SHA-256 sums of its files, so the training loop waits for none of that.
The next `save`, and `finish`, wait for the one before and raise its failure (e.g. a
full disk, refused before orbax writes a byte when the free space is known to be too
little), which leaves the checkpoints before it intact. One thread
writes for the whole process: orbax's own asynchronous saves coordinate through
process-wide signals, and two of them at once (sweep points training in threads) wait
on each other's signals until they time out.

A restore never silently returns something else: the restored tree must have the
structure, shapes and dtypes of the state it replaces, and its files the SHA-256
sums written beside them at save time (orbax checks structure, not content, so a
flipped byte would otherwise load). A checkpoint that fails either check, or fails
to restore, is skipped with a warning for the previous one and moved to
checkpoints.damaged/ (left in place when read-only, as for predict and visualize);
if none restores, `CheckpointError` names the directory and nothing is moved.
"""

import concurrent.futures
import errno
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from convnet import workdir as workdir_lib

SUBDIR = 'checkpoints'
SUMS = 'sha256.json'  # In each step's directory: {relative path: sha256} of its other files.


class _ExpectedOrbaxNotices(logging.Filter):
  """Drops orbax warnings about what this module does on purpose: a read-only manager
  (predict, visualize), and reading a checkpoint's array metadata without its step's."""
  EXPECTED = ('is read only', 'Metadata file does not exist')

  def filter(self, record):
    return not any(text in record.getMessage() for text in self.EXPECTED)


logging.getLogger('absl').addFilter(_ExpectedOrbaxNotices())


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was expected; the message names the path."""


class Manager(ocp.CheckpointManager):
  """orbax's manager, and the save being finished in the background (see `save`)."""
  pending: tuple[int, concurrent.futures.Future] | None = None

  def close(self):
    if self.pending is not None:  # A failure was raised by `finish`, or is moot in a crash.
      concurrent.futures.wait([self.pending[1]])
    super().close()


def manager(workdir: str, keep: int, read_only: bool = False) -> Manager:
  """Keeps the last `keep` checkpoints under workdir/checkpoints, one directory per step.

  Orbax writes each step to a temporary directory and renames it when complete, so a
  crash mid-save leaves the previous checkpoints as they were. `read_only` creates,
  moves and deletes nothing.
  """
  process = jax.process_index()
  directory = os.path.abspath(os.path.join(workdir, SUBDIR))
  if read_only and not os.path.isdir(directory):
    raise CheckpointError(f'{directory} not found: {workdir} holds no checkpoint')
  os.makedirs(directory, exist_ok=True)
  read_only = read_only or process != 0
  options = ocp.CheckpointManagerOptions(
      # Read-only managers keep and save nothing (said so, else orbax warns it changed them).
      max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
      create=False, read_only=read_only,
      cleanup_tmp_directories=not read_only,  # A write that failed part-way (a full disk).
      enable_async_checkpointing=False,  # Asynchronous through our writer thread.
      # Every process restores on its own; only process 0 saves (host numpy arrays).
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          primary_host=process, active_processes={process}))
  return Manager(directory, options=options)


def latest_step(workdir: str) -> int:
  """The step of workdir's latest checkpoint (0: none), from the names of its step
  directories: read-only, as opening a manager would create the directory."""
  directory = os.path.join(workdir, SUBDIR)
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return max((int(n) for n in names if n.isdigit()), default=0)


def file_sums(path: str) -> dict[str, str]:
  """{path relative to `path`: sha256} of every file under it but the sums file itself."""
  sums = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      relative = os.path.relpath(full, path)
      if relative != SUMS:
        digest = hashlib.sha256()
        with open(full, 'rb') as f:
          for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
        sums[relative] = digest.hexdigest()
  return dict(sorted(sums.items()))


def verify(path: str) -> str | None:
  """Why the checkpoint at `path` does not hold what was saved, or None if it does.

  A checkpoint without a sums file (one from before they were written, or a crash
  between the save and its sums) is let through to orbax's own checks."""
  sums_path = os.path.join(path, SUMS)
  if not os.path.exists(sums_path):
    return None
  try:
    with open(sums_path) as f:
      expected = json.load(f)
  except (OSError, ValueError) as e:
    return f'its {SUMS} does not read ({e})'
  actual = file_sums(path)
  for name in sorted(set(expected) | set(actual)):
    if name not in actual:
      return f'{name} is missing'
    if expected.get(name) != actual[name]:
      return f'{name} is not the file that was saved (its SHA-256 differs)'
  return None


def save(checkpoints: Manager, step: int, tree) -> None:
  """Starts writing the checkpoint for `step` from `tree` and returns; first waits for the
  one before (see `finish`). Its arrays must not change afterwards: host arrays, or device
  arrays no later step reuses (the writer thread copies them to the host)."""
  finish(checkpoints)
  checkpoints.pending = (step, _WRITER.submit(_write, checkpoints, step, tree))


def finish(checkpoints: Manager) -> None:
  """Waits until the checkpoint being written, and its sums, are on disk; raises
  CheckpointError if that failed (the checkpoints before it are intact)."""
  if checkpoints.pending is None:
    return
  (step, done), checkpoints.pending = checkpoints.pending, None
  try:
    done.result()
  except Exception as e:  # pylint: disable=broad-except
    raise _not_written(checkpoints, step, e) from e


# Writes every checkpoint of the process, one at a time, off the training threads.
_WRITER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='checkpoint-writer')


def _write(checkpoints: Manager, step: int, tree) -> None:
  tree = jax.device_get(tree)  # Waits for the step's arrays here, not on the training thread.
  check_space(str(checkpoints.directory), sum(np.asarray(x).nbytes
                                              for x in jax.tree_util.tree_leaves(tree)))
  checkpoints.save(step, args=ocp.args.StandardSave(tree), force=True)
  path = os.path.join(str(checkpoints.directory), str(step))
  workdir_lib.write_text(os.path.join(path, SUMS), json.dumps(file_sums(path), indent=1))


def check_space(directory: str, num_bytes: int) -> None:
  """Refuses a checkpoint whose arrays alone (num_bytes) exceed the free space: orbax
  would fail part-way, from its own threads, with tracebacks that bury the cause."""
  free = shutil.disk_usage(directory).free
  if free < num_bytes:
    raise OSError(errno.ENOSPC, f'No space left on device: {free / 1e6:.1f} MB free, '
                  f'{num_bytes / 1e6:.1f} MB needed')


def _not_written(checkpoints: Manager, step: int, e: Exception) -> CheckpointError:
  intact = [s for s in checkpoints.all_steps() if s < step]
  return CheckpointError(f'could not write the checkpoint of step {step} in '
                         f'{checkpoints.directory}: {str(e).splitlines()[0][:300]}; the '
                         f'checkpoints before it are intact: {intact}' + (
                             f'; once it can be written, rerun the same command to resume '
                             f'from step {intact[-1]}' if intact else ''))


def _describe(tree) -> list[tuple[str, tuple, str]]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return [(jax.tree_util.keystr(path), np.shape(x), str(jnp.asarray(x).dtype))
          for path, x in leaves]


def restore_latest(checkpoints: ocp.CheckpointManager, target, read_only: bool = False):
  """(tree like target, step) from the newest intact checkpoint, or None if none exist.

  Damaged newer ones are moved to checkpoints.damaged/ unless `read_only`. A checkpoint
  that a run still training removes while it is read (keep_checkpoints) is not damaged:
  the newest is looked for again."""
  for _ in range(10):
    try:
      return _restore_newest(checkpoints, target, read_only)
    except _Removed:
      checkpoints.reload()
  raise CheckpointError(f'the checkpoints in {checkpoints.directory} kept being replaced while '
                        f'read: try again, or after the run writing them stops')


class _Removed(Exception):
  """The checkpoint being read was removed meanwhile (by the run that wrote it)."""


def _restore_newest(checkpoints: ocp.CheckpointManager, target, read_only: bool):
  directory = str(checkpoints.directory)
  steps = sorted(checkpoints.all_steps(), reverse=True)
  if not steps:
    return None
  expected = _describe(target)
  abstract = jax.tree_util.tree_map(jnp.asarray, target)
  errors = []
  for step in steps:
    path = os.path.join(directory, str(step))
    damage = verify(path)
    stored = None if damage else _stored(path)
    if not os.path.isdir(path):
      raise _Removed(path)
    if stored is not None and stored != sorted(expected):  # Checked before orbax reads it:
      raise _other_model(path, stored, expected)  # a failed read leaves threads that print.
    if damage is None:
      try:
        restored = checkpoints.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many kinds)
        damage = str(e).splitlines()[0][:300]
    if damage is not None and not os.path.isdir(path):
      raise _Removed(path)
    if damage is not None:
      errors.append(f'{path}: {damage}')
      print(f'warning: checkpoint {path} is damaged ({damage}); trying the one before it',
            file=sys.stderr, flush=True)
      continue
    if _describe(restored) != expected:
      raise _other_model(path, _describe(restored), expected)
    if not read_only:
      _set_aside(checkpoints, [s for s in steps if s > step])
    return restored, step
  raise CheckpointError(f'no checkpoint in {directory} restores:\n  ' + '\n  '.join(errors))


def _other_model(path: str, stored: list, expected: list) -> CheckpointError:
  """The error for a checkpoint of another model, naming its first differing array."""
  got, want = next((a, b) for a, b in itertools.zip_longest(sorted(stored), sorted(expected))
                   if a != b)
  return CheckpointError(f'{path} holds a different model or optimizer state than the config '
                         f'describes (it has {got}, the config needs {want}); move it away or '
                         f'use another --workdir')


def _stored(path: str) -> list[tuple[str, tuple, str]] | None:
  """(path, shape, dtype) of every array the checkpoint at `path` holds, from its metadata
  alone; None if that does not read (the restore then says what is wrong)."""
  try:
    tree = ocp.StandardCheckpointer().metadata(os.path.join(path, 'default')).item_metadata
    return sorted((jax.tree_util.keystr(key), tuple(leaf.shape), str(leaf.dtype))
                  for key, leaf in jax.tree_util.tree_leaves_with_path(tree))
  except Exception:  # pylint: disable=broad-except
    return None


def _set_aside(checkpoints: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves damaged checkpoints to checkpoints.damaged/, out of the way of new saves."""
  if not steps:
    return
  directory = str(checkpoints.directory)
  damaged = directory + '.damaged'
  os.makedirs(damaged, exist_ok=True)
  for step in steps:
    os.replace(os.path.join(directory, str(step)), os.path.join(damaged, str(step)))
  print(f'warning: moved the damaged checkpoint(s) {steps} to {damaged}', file=sys.stderr,
        flush=True)
  checkpoints.reload()
