"""scripts/device_check.sh: every step, tiny, on this CPU; a failing step costs no other."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import REPO, fingerprint

spec = importlib.util.spec_from_file_location(
    'device_check', os.path.join(REPO, 'scripts', 'device_check.py'))
device_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(device_check)


def test_smoke_runs_every_step_and_writes_the_report(tmp_path):
  out = tmp_path / 'check'
  done = subprocess.run([os.path.join(REPO, 'scripts', 'device_check.sh'), str(out), '--smoke'],
                        env={**os.environ, 'PYTHON': sys.executable}, capture_output=True,
                        text=True, timeout=900)  # Above the smoke budget (600 s).
  assert done.returncode == 0, done.stdout + done.stderr
  report = json.loads((out / 'device_check.json').read_text())
  assert report['backend'] == 'cpu' and report['auto_kernels'] == 'cpu' and report['smoke']
  assert report['versions']['jax'] == jax.__version__ and report['device_kind'] == 'cpu'
  steps = report['steps']
  assert list(steps) == list(device_check.STEPS)
  assert not [name for name, result in steps.items() if 'error' in result]
  assert steps['tests']['tests'] >= 4 and steps['tests']['failures'] == 0
  assert steps['train_default']['kernels'] == 'cpu'
  assert steps['train_default']['test_accuracy'] > 0.3  # 4 steps on 512 digits; chance 0.1.
  for name in ('benchmark_default', 'benchmark_keras_convnet'):
    assert steps[name]['images_per_s'] > 0 and 'pytorch' in steps[name]['peers']
  assert steps['time_to_accuracy']['accuracy_by_epoch']
  assert steps['sweep']['points'] == steps['sweep_4_at_once']['points'] == 1  # Worker 0 of 20.
  assert steps['sweep_vmapped']['points'] == 2  # Worker 0 of 3: points 1 and 4 of 6.
  assert '| sweep |' in done.stdout and done.stdout.strip().endswith('device_check.json')


def test_a_failing_step_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
  def figures(out):
    with open(os.path.join(out, 'ok.json')) as f:
      return json.load(f)

  write = 'import json, sys; json.dump({"answer": 42}, open(sys.argv[1], "w"))'
  monkeypatch.setattr(device_check, 'environment', lambda out: {'backend': 'cpu'})
  monkeypatch.setattr(device_check, 'STEPS', {
      'broken': device_check.Step(
          lambda out, smoke: [sys.executable, '-c', 'print("it broke"); raise SystemExit(3)'],
          figures, 0.5),
      'hangs': device_check.Step(
          lambda out, smoke: [sys.executable, '-c', 'import time; time.sleep(60)'], figures, 0.01),
      'works': device_check.Step(
          lambda out, smoke: [sys.executable, '-c', write, os.path.join(out, 'ok.json')],
          figures, 0.5)})
  assert device_check.main([str(tmp_path / 'out'), '--budget_s=30']) == 1
  steps = json.loads((tmp_path / 'out' / 'device_check.json').read_text())['steps']
  assert steps['broken']['error'] == 'exit code 3; broken.log ends: it broke'
  assert steps['hangs']['error'].startswith('timed out after 10 s')
  assert steps['works']['answer'] == 42 and 'error' not in steps['works']


def test_a_directory_with_files_is_refused_untouched(tmp_path):
  (tmp_path / 'old.json').write_text('{}')
  before = fingerprint(tmp_path)
  with pytest.raises(SystemExit, match='is not empty'):
    device_check.main([str(tmp_path)])
  assert fingerprint(tmp_path) == before
