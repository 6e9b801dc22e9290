"""Where the step functions run: devices, processes, and how data is laid out on them.

The step functions in train.py are written for one device's slice of a batch and
an axis name. This module decides how that is spread out: `parallelize` is the one
place that calls `jax.pmap` (or, with config.parallel='jit', jax.jit + shard_map
over a NamedSharding mesh); over several processes (jax.distributed) the pmapped
axis spans every process's devices and each process feeds only its own devices.
"""

import contextlib
import os
import threading
from typing import Callable

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

AXIS = 'batch'


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None):
  """jax.distributed.initialize, with gloo collectives so CPU processes can talk. Without
  arguments JAX reads them from the cluster (SLURM, a TPU pod slice)."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    if coordinator_address:
      jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                                 process_id=process_id)
    else:
      jax.distributed.initialize()
  except (RuntimeError, ValueError) as e:
    where = (f'with coordinator {coordinator_address}, {num_processes} processes, this one '
             f'{process_id}' if coordinator_address else 'from the cluster\'s environment')
    raise SetupError(f'jax.distributed.initialize ({where}) failed: '
                     f'{str(e).splitlines()[0][:200]}; every process must be started and '
                     f'reach the coordinator') from None


class SetupError(RuntimeError):
  """The environment (variables, the installed jax) cannot run this; the message says why."""


def env_int(name: str, default: int, environ=os.environ) -> int:
  """An integer environment variable, or SetupError naming it."""
  value = environ.get(name, '')
  try:
    return int(value) if value.strip() else default
  except ValueError:
    raise SetupError(f'${name}={value!r} is not an integer') from None


# What jax.distributed.initialize() reads in a SLURM job step (its SlurmCluster): srun sets them.
SLURM_STEP_VARIABLES = ('SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID')


def cluster(environ=os.environ) -> str | None:
  """Which multi-process cluster the environment describes, or None for one process.

  SLURM with more than one task, or a TPU pod slice (several TPU worker hosts): both
  are what jax.distributed.initialize() detects by itself. A SLURM job of several tasks
  lacking what JAX reads there (a process started without srun) is refused."""
  tasks = env_int('SLURM_NTASKS', 0, environ) or env_int('SLURM_NPROCS', 1, environ)
  if environ.get('SLURM_JOB_ID') and tasks > 1:
    missing = [name for name in SLURM_STEP_VARIABLES if name not in environ]
    if missing:
      raise SetupError(
          f'SLURM job {environ["SLURM_JOB_ID"]} has {tasks} tasks but {", ".join(missing)} '
          f'not set: start one process per task with srun, or give --coordinator_address, '
          f'--num_processes and --process_id')
    return f'SLURM job {environ["SLURM_JOB_ID"]} ({tasks} tasks)'
  hosts = [h for h in environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  if len(hosts) > 1:
    return f'TPU pod slice ({len(hosts)} hosts)'
  return None


def slurm_array_worker(environ=os.environ) -> tuple[int, int] | None:
  """(num_workers, worker_index) of a SLURM array task, or None outside one."""
  if 'SLURM_ARRAY_TASK_ID' not in environ:
    return None
  if 'SLURM_ARRAY_TASK_COUNT' not in environ:
    raise SetupError('SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not: '
                     'give --num_workers and --worker_index')
  count = env_int('SLURM_ARRAY_TASK_COUNT', 1, environ)
  index = env_int('SLURM_ARRAY_TASK_ID', 0, environ) - env_int('SLURM_ARRAY_TASK_MIN', 0, environ)
  if not 0 <= index < count:
    raise SetupError(
        f'SLURM array task {environ["SLURM_ARRAY_TASK_ID"]} (SLURM_ARRAY_TASK_MIN='
        f'{environ.get("SLURM_ARRAY_TASK_MIN", 0)}) is not one of SLURM_ARRAY_TASK_COUNT={count}'
        f' consecutive tasks: give --num_workers and --worker_index')
  return count, index


def start_backend(environ=os.environ) -> None:
  """Starts JAX's backend now, so that one JAX cannot start (JAX_PLATFORMS naming an
  accelerator this machine or this jax lacks) is one line instead of a traceback."""
  try:
    jax.devices()
  except (RuntimeError, AssertionError) as e:
    reason = str(e).splitlines()[0] if str(e) else 'no backend started'
    platforms = environ.get('JAX_PLATFORMS')
    hint = (f'JAX_PLATFORMS={platforms!r} asks for a backend this machine or its jax lacks: '
            f'unset it, or install jax for that accelerator (README, Install)' if platforms
            else 'see the README, Install')
    raise SetupError(f'JAX could not start ({reason[:200]}); {hint}') from None


def compilation_cache_dir(environ=os.environ) -> str:
  """Where compiled programs are kept: $CONVNET_CACHE, else ~/.cache/convnet/jax."""
  return os.path.expanduser(environ.get('CONVNET_CACHE') or '~/.cache/convnet/jax')


def use_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache in `directory`: a rerun, a resume or the next
  sweep point of the same shapes loads its compiled programs instead of compiling them
  again. Every program is kept (JAX's default keeps those that took over a second)."""
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def force_cpu_devices(count: int) -> None:
  """Makes XLA split the CPU into `count` devices; call before jax first touches a device."""
  flag = f'--xla_force_host_platform_device_count={count}'
  os.environ['XLA_FLAGS'] = ' '.join(
      f for f in os.environ.get('XLA_FLAGS', '').split()
      if not f.startswith('--xla_force_host_platform_device_count')) + ' ' + flag


def is_writer() -> bool:
  """Only process 0 writes shared files (config, metrics, checkpoints, results)."""
  return jax.process_index() == 0


def participating_devices(num_devices: int) -> tuple[list, list]:
  """(all devices taking part, this process's devices among them), in pmap's order."""
  if jax.process_count() == 1:
    devices = jax.local_devices()[:num_devices or None]
  else:
    devices = jax.devices()
  local = [d for d in devices if d.process_index == jax.process_index()]
  return devices, local


def parallelize(fn: Callable, devices, in_axes, how: str = 'pmap',
                donate_argnums: tuple[int, ...] = ()) -> Callable:
  """fn over `devices` along AXIS: state in and out unreplicated, data sharded.

  fn sees one device's slice of each argument whose in_axes entry is 0 (the
  leading axis removed) and the whole of each None argument, and its outputs must
  be the same on every device (pmean-ed). how='pmap' is the one jax.pmap in the
  code base; how='jit' is the same program as jax.jit of a shard_map over a 1-D
  NamedSharding mesh (single process), the form newer JAX prefers. Arguments in
  donate_argnums give their buffers to the outputs: the caller must not use them again.
  """
  if how == 'pmap':
    return jax.pmap(fn, axis_name=AXIS, in_axes=in_axes, out_axes=None,
                    devices=devices if jax.process_count() == 1 else None,
                    donate_argnums=donate_argnums)
  mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
  specs = tuple(P() if axis is None else P(AXIS) for axis in in_axes)

  def per_device(*args):
    return fn(*(x if axis is None else jax.tree_util.tree_map(lambda a: a[0], x)
                for x, axis in zip(args, in_axes)))

  return jax.jit(shard_map(per_device, mesh, specs), donate_argnums=donate_argnums)


def shard_map(fn: Callable, mesh, in_specs) -> Callable:
  """jax.shard_map with unchecked replication and a replicated output; jax 0.6.0 (the
  lowest jax pyproject allows) has it only as jax.experimental.shard_map."""
  if hasattr(jax, 'shard_map'):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(), check_vma=False)
  from jax.experimental import shard_map as old  # pylint: disable=import-outside-toplevel
  return old.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(), check_rep=False)


def compile_now(fn: Callable, *args) -> Callable:
  """Compiles fn for args ahead of time (so compile time is measured on its own).

  A multi-process pmap compiles at its first call instead: its ahead-of-time form
  expects global shapes where each process passes its local part.
  """
  if jax.process_count() > 1:
    return fn
  return fn.lower(*args).compile()


def put_on_devices(x: np.ndarray, devices) -> jax.Array:
  """Places x, shaped [len(devices), ...], with row d on device d."""
  mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
  return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS)))


def replicated(devices) -> jax.sharding.NamedSharding:
  """The sharding of a value held whole on every device (how pmap returns the state)."""
  return jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                                    jax.sharding.PartitionSpec())


def replicate(x: np.ndarray, devices) -> jax.Array:
  """One copy of x on every device (the training set: each device gathers its own batch)."""
  return put_on_devices(np.broadcast_to(x, (len(devices), *x.shape)), devices)


def local_rows(x: np.ndarray, devices, local_devices) -> np.ndarray:
  """The rows of a [len(devices), ...] array that belong to this process's devices."""
  return x[[devices.index(d) for d in local_devices]]


_SHARED: dict = {}  # key -> [value, number of holders]
_SHARED_LOCK = threading.Lock()


@contextlib.contextmanager
def shared(key, make: Callable):
  """make()'s value, made once for everyone in this process holding `key` at the time:
  sweep points training at once on the same devices share one copy of the dataset
  there. It is dropped (its device memory freed) when the last holder is done."""
  with _SHARED_LOCK:
    if key not in _SHARED:
      _SHARED[key] = [make(), 0]
    entry = _SHARED[key]
    entry[1] += 1
  try:
    yield entry[0]
  finally:
    with _SHARED_LOCK:
      entry[1] -= 1
      if not entry[1]:
        del _SHARED[key]
