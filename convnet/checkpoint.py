"""Orbax checkpoints of the train state: saved synchronously, restored with checks.

A restore never silently returns something else: the restored tree must have the
structure, shapes and dtypes of the state it replaces. A checkpoint that fails to
restore (truncated or missing file) is skipped with a warning for the previous
one and moved to checkpoints.damaged/; if none restores, `CheckpointError` names
the directory and nothing is moved.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

SUBDIR = 'checkpoints'


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was expected; the message names the path."""


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """Keeps the last `keep` checkpoints under workdir/checkpoints, one directory per step.

  Orbax writes each step to a temporary directory and renames it when complete, so a
  crash mid-save leaves the previous checkpoints as they were.
  """
  process = jax.process_index()
  directory = os.path.abspath(os.path.join(workdir, SUBDIR))
  os.makedirs(directory, exist_ok=True)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=False, read_only=process != 0,
      enable_async_checkpointing=False,
      # Every process restores on its own; only process 0 saves (host numpy arrays).
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          primary_host=process, active_processes={process}))
  return ocp.CheckpointManager(directory, options=options)


def save(checkpoints: ocp.CheckpointManager, step: int, tree) -> None:
  """Writes the checkpoint for `step`; a failure (e.g. a full disk) leaves the older ones."""
  try:
    checkpoints.save(step, args=ocp.args.StandardSave(tree), force=True)
    checkpoints.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'could not write the checkpoint of step {step} in '
                          f'{checkpoints.directory}: {str(e).splitlines()[0][:300]}; the '
                          f'checkpoints before it are intact: {checkpoints.all_steps()}') from e


def _describe(tree) -> list[tuple[str, tuple, str]]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return [(jax.tree_util.keystr(path), np.shape(x), str(jnp.asarray(x).dtype))
          for path, x in leaves]


def restore_latest(checkpoints: ocp.CheckpointManager, target):
  """(tree like target, step) from the newest checkpoint that restores, or None if none exist."""
  directory = str(checkpoints.directory)
  steps = sorted(checkpoints.all_steps(), reverse=True)
  if not steps:
    return None
  expected = _describe(target)
  abstract = jax.tree_util.tree_map(jnp.asarray, target)
  errors = []
  for step in steps:
    path = os.path.join(directory, str(step))
    try:
      restored = checkpoints.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many kinds)
      errors.append(f'{path}: {str(e).splitlines()[0][:300]}')
      print(f'warning: checkpoint {path} does not restore ({errors[-1]}); trying the one '
            f'before it', file=sys.stderr, flush=True)
      continue
    if _describe(restored) != expected:
      raise CheckpointError(f'{path} holds a different model or optimizer state than the '
                            f'config describes; move it away or use another --workdir')
    _set_aside(checkpoints, [s for s in steps if s > step])
    return restored, step
  raise CheckpointError(f'no checkpoint in {directory} restores:\n  ' + '\n  '.join(errors))


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
