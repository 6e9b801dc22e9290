"""Several processes (jax.distributed over localhost, gloo) train exactly like one."""

import json
import socket
import subprocess

import pytest

from conftest import REPO, main_command
from convnet import workdir

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
