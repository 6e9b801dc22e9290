"""Several processes (jax.distributed over localhost, gloo) train exactly like one; the
process's malloc settings; values shared by runs in one process."""

import json
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from conftest import REPO, main_command
from convnet import input_pipeline, parallel, train, workdir

# Dropout off: its masks are drawn per device, so they depend on the device count.
RUN = ('--config.data.num_train=2048', '--config.model.dropout=0.0', '--config.batch_size=32',
       '--config.log_every_steps=16')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_on_localhost_match_one_process(tmp_path):
  one = subprocess.run(main_command(tmp_path / 'one', *RUN), cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert one.returncode == 0, one.stderr
  address = f'localhost:{free_port()}'
  logs = [open(tmp_path / f'process{i}.log', 'w+') for i in range(2)]
  processes = [subprocess.Popen(
      main_command(tmp_path / 'two', *RUN, f'--coordinator_address={address}',
                   '--num_processes=2', f'--process_id={i}'),
      cwd=REPO, stdout=logs[i], stderr=logs[i], text=True) for i in range(2)]
  for i, process in enumerate(processes):
    process.wait(timeout=300)
    logs[i].seek(0)
    assert process.returncode == 0, logs[i].read()[-3000:]
  logs[0].seek(0)
  assert '4 x cpu in 2 process(es)' in logs[0].read()  # 2 fake CPU devices per process.
  results = [json.loads((tmp_path / run / 'results.json').read_text()) for run in ('one', 'two')]
  assert results[0]['num_devices'] == 2 and results[1]['num_devices'] == 4
  assert results[1]['test_count'] == 10000
  assert results[1]['test_accuracy'] == pytest.approx(results[0]['test_accuracy'], abs=1e-3)
  assert results[1]['test_loss'] == pytest.approx(results[0]['test_loss'], rel=1e-3)
  # Only process 0 wrote: each record once, as in the one-process run.
  records = [workdir.read_jsonl(tmp_path / run / 'metrics.jsonl') for run in ('one', 'two')]
  assert [r['step'] for r in records[1]] == [r['step'] for r in records[0]] == [16, 32, 48, 64, 64]
  assert sorted(p.name for p in (tmp_path / 'two' / 'checkpoints').iterdir()) == ['64']


# Plain malloc and free, as XLA's kernels use them (NumPy asks for huge pages).
PAGE_FAULTS = """
import ctypes, resource, sys
from convnet.cpu import memory
if sys.argv[1] == 'keep':
  assert memory.keep_freed_memory()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
  block = libc.malloc(40_000_000)
  ctypes.memset(block, 1, 40_000_000)
  libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_reuses_freed_blocks_without_page_faults():
  faults = {how: int(subprocess.run([sys.executable, '-c', PAGE_FAULTS, how], cwd=REPO,
                                    capture_output=True, text=True, check=True,
                                    timeout=120).stdout)
            for how in ('default', 'keep')}
  pages = 40_000_000 // 4096
  assert faults['default'] > 15 * pages  # glibc gives each freed block back to the OS...
  assert faults['keep'] < 2 * pages  # ...and now keeps the first one for the other 19.


def test_clusters_are_recognised_from_their_environment():
  assert parallel.cluster({}) is None
  assert parallel.cluster({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}) is None  # One process.
  step = {'SLURM_STEP_NODELIST': 'node[1-4]', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}
  assert parallel.cluster({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4', **step}) == (
      'SLURM job 7 (4 tasks)')
  with pytest.raises(parallel.SetupError, match='SLURM job 7 has 4 tasks but SLURM_PROCID not '
                                                'set: start one process per task with srun'):
    parallel.cluster({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4', 'SLURM_STEP_NODELIST': 'n1',
                      'SLURM_LOCALID': '0'})
  assert parallel.cluster({'TPU_WORKER_HOSTNAMES': 'localhost'}) is None  # A single TPU VM.
  assert parallel.cluster({'TPU_WORKER_HOSTNAMES': 'w-0,w-1,w-2,w-3'}) == (
      'TPU pod slice (4 hosts)')
  assert parallel.slurm_array_worker({}) is None
  assert parallel.slurm_array_worker({'SLURM_ARRAY_TASK_ID': '12', 'SLURM_ARRAY_TASK_MIN': '10',
                                      'SLURM_ARRAY_TASK_COUNT': '3'}) == (3, 2)
  with pytest.raises(parallel.SetupError, match=r'SLURM array task 9 \(SLURM_ARRAY_TASK_MIN=0\) '
                                                r'is not one of SLURM_ARRAY_TASK_COUNT=2'):
    parallel.slurm_array_worker({'SLURM_ARRAY_TASK_ID': '9', 'SLURM_ARRAY_TASK_COUNT': '2'})


def test_a_cluster_initialises_jax_distributed_without_flags(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(jax.config, 'update', lambda *a: None)  # Keep this process's settings.
  parallel.initialize_distributed()
  parallel.initialize_distributed('host:1234', 2, 1)
  assert calls == [((), {}), (('host:1234',), {'num_processes': 2, 'process_id': 1})]


def test_shared_values_are_made_once_for_their_holders_and_dropped_after_the_last():
  made = []

  def make():
    made.append(object())
    return made[-1]

  with parallel.shared('key', make) as first, parallel.shared('key', make) as second:
    assert first is second
  assert len(made) == 1 and 'key' not in parallel._SHARED  # pylint: disable=protected-access
  with parallel.shared('key', make) as third:
    assert third is made[1]


def test_points_on_the_same_devices_share_one_copy_of_the_dataset(mnist):
  data = mnist._replace(train=input_pipeline.Split(*(x[:256] for x in mnist.train)))
  record = workdir.data_record(data, default.get_config(), 1)
  devices, others = jax.local_devices()[:1], jax.local_devices()[1:]
  with train.on_devices(data, record, 100, devices, devices) as a, \
       train.on_devices(data, record, 100, devices, devices) as b, \
       train.on_devices(data, record, 100, others, others) as other:
    assert a is b and other is not a
    assert a.train_images.devices() == set(devices)
    np.testing.assert_array_equal(np.asarray(a.train_images)[0], data.train.images)
    np.testing.assert_array_equal(np.asarray(other.train_labels)[0], data.train.labels)
