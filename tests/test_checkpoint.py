"""Checkpoints and resuming: SIGKILL, SIGTERM, changed configs, corrupt files, full disks, NaNs."""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default
from conftest import MNIST_DIR, REPO, fingerprint, main_command, metrics_without_timings
from convnet import checkpoint, config_lib, inference, input_pipeline, train, workdir
from test_input_pipeline import write_idx

# 4,096 images = 32 steps per epoch; a chunk and a checkpoint every 4 steps; shifted images,
# so that a resumed run must also draw the same moves.
RUN = ('--config.num_epochs=2', '--config.data.num_train=4096', '--config.log_every_steps=4',
       '--config.checkpoint_every_steps=4', '--config.data.augment=shift')


def final_params(run_dir):
  """The params of the newest checkpoint, as numpy arrays by path."""
  with ocp.CheckpointManager(os.path.abspath(run_dir / 'checkpoints')) as manager:
    tree = manager.restore(manager.latest_step())
  return {path: np.asarray(x) for path, x in
          ocp.tree.to_flat_dict(tree['state']['params'], sep='/').items()}


def results(run_dir):
  with open(run_dir / 'results.json') as f:
    data = json.load(f)
  return {k: v for k, v in data.items() if k.startswith('test_')}


@pytest.fixture(scope='module')
def uninterrupted_runs(tmp_path_factory):
  """kernels ('auto' | 'xla') -> the workdir of RUN trained uninterrupted with model.ops set
  so, trained once, when first asked for."""
  runs = {}

  def run(kernels):
    if kernels not in runs:
      run_dir = tmp_path_factory.mktemp(f'uninterrupted-{kernels}') / 'run'
      done = subprocess.run(main_command(run_dir, *RUN, f'--config.model.ops={kernels}'),
                            cwd=REPO, capture_output=True, text=True, timeout=300)
      assert done.returncode == 0, done.stderr
      runs[kernels] = run_dir
    return runs[kernels]
  return run


@pytest.fixture(scope='module')
def uninterrupted(uninterrupted_runs):
  return uninterrupted_runs('auto')


def start_and_signal(run_dir, sig, after_step, *overrides):
  """Starts a run and sends `sig` once metrics.jsonl shows `after_step`; returns the process."""
  log = open(run_dir.parent / f'{run_dir.name}.log', 'w+')  # Not a pipe: it could fill up.
  process = subprocess.Popen(main_command(run_dir, *RUN, *overrides), cwd=REPO, stdout=log,
                             stderr=log, text=True)
  metrics = run_dir / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    steps = [r['step'] for r in workdir.read_jsonl(metrics)] if metrics.exists() else []
    if steps and max(steps) >= after_step:
      process.send_signal(sig)
      break
    time.sleep(0.02)
  process.wait(timeout=240)
  log.seek(0)
  return process, log.read()


@pytest.mark.parametrize('kernels', ['auto', 'xla'])  # The CPU kernels here; GPU/TPU's.
def test_sigterm_then_sigkill_then_rerun_equals_an_uninterrupted_run_bitwise(uninterrupted_runs,
                                                                            tmp_path, kernels):
  uninterrupted, ops = uninterrupted_runs(kernels), f'--config.model.ops={kernels}'
  run_dir = tmp_path / 'run'
  # Preempted politely: SIGTERM saves a checkpoint and exits 75 with how to resume.
  stopped, stderr = start_and_signal(run_dir, signal.SIGTERM, 8, ops)
  assert stopped.returncode == 75, stderr
  assert 'SIGTERM at step' in stderr and 'rerun the same command to resume' in stderr
  step = int(stderr.split('SIGTERM at step ')[1].split(':')[0])
  assert str(step) in os.listdir(run_dir / 'checkpoints')
  # Resumed, then killed outright mid-run.
  killed, output = start_and_signal(run_dir, signal.SIGKILL, 38, ops)
  assert f'from its checkpoint at step {step}' in output
  assert killed.returncode == -signal.SIGKILL
  assert not (run_dir / 'results.json').exists()  # It really died mid-run.
  resumed = subprocess.run(main_command(run_dir, *RUN, ops), cwd=REPO, capture_output=True,
                           text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr
  resumed_from = int(resumed.stdout.split('checkpoint at step ')[1].split()[0])
  assert step < resumed_from < 64
  assert results(run_dir) == results(uninterrupted)
  expected = final_params(uninterrupted)
  got = final_params(run_dir)
  assert expected.keys() == got.keys()
  for path in expected:
    np.testing.assert_array_equal(got[path], expected[path], err_msg=path)
  # Metrics: every step once, as in the uninterrupted run (timings aside).
  assert metrics_without_timings(run_dir) == metrics_without_timings(uninterrupted)


def test_two_runs_started_together_one_refused_the_other_as_a_lone_run(uninterrupted, tmp_path):
  run_dir = tmp_path / 'run'
  command = main_command(run_dir, *RUN, '--config.model.ops=auto')  # As `uninterrupted`'s.
  processes = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outputs = [process.communicate(timeout=300) for process in processes]
  codes = sorted(process.returncode for process in processes)
  assert codes == [0, 1], outputs
  loser = next(err for process, (_, err) in zip(processes, outputs) if process.returncode)
  winner = next(process.pid for process in processes if process.returncode == 0)
  assert loser.strip().splitlines()[-1].startswith(
      f'error: {run_dir} is in use by process {winner}; wait for it to finish')
  assert results(run_dir) == results(uninterrupted)  # The survivor's files: a lone run's.
  assert metrics_without_timings(run_dir) == metrics_without_timings(uninterrupted)
  assert sorted(os.listdir(run_dir)) == sorted(os.listdir(uninterrupted))


def unfinished_run(smoke_config, path, **changes):
  """A workdir as a crash leaves it: trained and checkpointed, but no results.json."""
  smoke_config.update(changes)
  train.train_and_evaluate(smoke_config, str(path))
  finished = json.loads((path / 'results.json').read_text())
  os.remove(path / 'results.json')
  return finished


@pytest.fixture(scope='module')
def crashed_runs(tmp_path_factory):
  """Unfinished smoke runs of 1 and 2 epochs (checkpoints 16; 16 and 32), trained once."""
  root = tmp_path_factory.mktemp('crashed')
  return {epochs: (root / f'{epochs}', unfinished_run(default.get_config('smoke'),
                                                      root / f'{epochs}', num_epochs=epochs))
          for epochs in (1, 2)}


def copy_of(crashed_runs, epochs, tmp_path):
  """A fresh copy of the unfinished run of `epochs` epochs, and its finished results."""
  source, finished = crashed_runs[epochs]
  shutil.copytree(source, tmp_path / 'run')
  return tmp_path / 'run', finished


def test_resume_with_a_different_config_is_refused_with_a_diff(smoke_config, tmp_path,
                                                               crashed_runs):
  run_dir, _ = copy_of(crashed_runs, 1, tmp_path)
  before = fingerprint(run_dir)
  changed = smoke_config.copy_and_resolve_references()
  changed.learning_rate = 0.002
  changed.model.filters = (16,)
  with pytest.raises(workdir.ConfigMismatchError) as error:
    train.train_and_evaluate(changed, str(run_dir))
  message = str(error.value)
  assert 'learning_rate: 0.001 -> 0.002' in message and 'model.filters: (32,) -> (16,)' in message
  assert '--allow_config_change' in message
  assert fingerprint(run_dir) == before
  # Keys that do not change results may differ; more epochs with the explicit flag.
  longer = smoke_config.copy_and_resolve_references()
  longer.num_epochs, longer.log_every_steps = 2, 5
  extended = train.train_and_evaluate(longer, str(run_dir), allow_config_change=True)
  assert extended['num_epochs'] == 2
  assert sorted(os.listdir(run_dir / 'checkpoints')) == ['16', '32']


def test_resume_on_other_data_is_refused_naming_the_difference(smoke_config, tmp_path,
                                                                crashed_runs):
  """Moving the same files is fine; other files behind the same config are refused."""
  run_dir, finished = copy_of(crashed_runs, 1, tmp_path)
  before = fingerprint(run_dir)
  other = tmp_path / 'other'
  shutil.copytree(MNIST_DIR, other)
  for name in ('images-idx3-ubyte.gz', 'labels-idx1-ubyte.gz'):  # Test digits as training set.
    shutil.copy(other / f't10k-{name}', other / f'train-{name}')
  smoke_config.data.dir = str(other)
  with pytest.raises(workdir.ConfigMismatchError, match=r'trained on other data:\n  train '
                     r'sha256: .* -> '):
    train.train_and_evaluate(smoke_config, str(run_dir))
  assert fingerprint(run_dir) == before
  moved = tmp_path / 'moved'
  shutil.copytree(MNIST_DIR, moved)
  smoke_config.data.dir = str(moved)
  train.train_and_evaluate(smoke_config, str(run_dir))
  assert results(run_dir) == {k: v for k, v in finished.items() if k.startswith('test_')}


def test_statistics_are_of_the_images_trained_on_and_part_of_the_runs_identity(
    smoke_config, tmp_path, crashed_runs, mnist):
  """data.num_train=2048: the mean and std are those of the first 2,048 images, so a change
  beyond them changes nothing and resumes; a data.json of other statistics is refused."""
  run_dir, finished = copy_of(crashed_runs, 1, tmp_path)
  pixels = mnist.train.images[:2048].astype(np.float64) / 255
  recorded = workdir.read_json(run_dir / 'data.json')
  assert recorded['mean'] == pytest.approx([pixels.mean()], abs=1e-12)
  assert recorded['std'] == pytest.approx([pixels.std()], abs=1e-12)
  other = tmp_path / 'other'
  shutil.copytree(MNIST_DIR, other)
  images = mnist.train.images[..., 0].copy()
  images[2048:] = 255  # Beyond num_train: the full file's mean would change a lot.
  write_idx(other / 'train-images-idx3-ubyte.gz', images)
  old = copy_of(crashed_runs, 1, tmp_path / 'old')[0]
  workdir.write_json(str(old / 'data.json'), {**recorded, 'mean': [0.5]})  # Other statistics.
  before = fingerprint(old)
  smoke_config.data.dir = str(other)
  with pytest.raises(workdir.ConfigMismatchError, match=r'other data:\n  mean: \[0.5\] -> '):
    train.train_and_evaluate(smoke_config, str(old))
  assert fingerprint(old) == before
  train.train_and_evaluate(smoke_config, str(run_dir))
  assert results(run_dir) == {k: v for k, v in finished.items() if k.startswith('test_')}


def test_a_torn_last_metrics_line_is_dropped_on_resume(smoke_config, tmp_path, capfd,
                                                       crashed_runs):
  run_dir, finished = copy_of(crashed_runs, 1, tmp_path)
  with open(run_dir / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 16, "train_lo')  # A crash in mid-append.
  again = train.train_and_evaluate(smoke_config, str(run_dir))
  assert 'ignoring its torn last line' in capfd.readouterr().err
  assert again['test_accuracy'] == finished['test_accuracy']
  records = workdir.read_jsonl(str(run_dir / 'metrics.jsonl'))  # Every line whole again.
  assert records[-1]['test_count'] == 10000
  (run_dir / 'config.json').write_text('{"seed": ')
  with pytest.raises(workdir.RecordError, match=r'config.json: not valid JSON'):
    workdir.read_json(str(run_dir / 'config.json'))


def test_a_run_older_than_some_keys_resumes_as_it_computed(smoke_config, tmp_path, capfd,
                                                           crashed_runs):
  """A config.json written before data.augment, data.augment_pixels and model.stride
  existed: each reads as config_lib.ABSENT says the run computed, named in one line, and
  the run resumes from its step-16 checkpoint to the uninterrupted run's results."""
  run_dir, finished = copy_of(crashed_runs, 2, tmp_path)
  smoke_config.num_epochs = 2
  saved = workdir.read_json(str(run_dir / 'config.json'))
  del saved['data']['augment'], saved['data']['augment_pixels'], saved['model']['stride']
  workdir.write_json(str(run_dir / 'config.json'), saved)
  shutil.rmtree(run_dir / 'checkpoints' / '32')
  again = train.train_and_evaluate(smoke_config, str(run_dir))
  captured = capfd.readouterr()
  assert captured.err.count('predates 3 key(s)') == 1, captured.err
  assert ("data.augment='none', data.augment_pixels=2, model.stride=(1,)" in captured.err)
  assert 'from its checkpoint at step 16' in captured.out
  assert again['test_accuracy'] == finished['test_accuracy']


def damage_latest(run_dir, damage: str):
  """Damages checkpoint 32 of a 2-epoch run as `damage` says; returns its path."""
  latest = run_dir / 'checkpoints' / '32'
  data_files = [os.path.join(root, name) for root, _, names in os.walk(latest)
                for name in names if os.sep + 'd' + os.sep in os.path.join(root, name)]
  assert data_files
  if damage == 'no_default_item':
    shutil.rmtree(latest / 'default')
  elif damage == 'same_size':  # 4 kB of noise inside the largest file: orbax alone reads it.
    largest = max(data_files, key=os.path.getsize)
    size = os.path.getsize(largest)
    with open(largest, 'r+b') as f:
      f.seek(size // 2)
      f.write(np.random.default_rng(0).bytes(4096))
    assert os.path.getsize(largest) == size
  for path in data_files if damage in ('truncate', 'delete') else []:
    if damage == 'truncate':
      with open(path, 'r+b') as f:
        f.truncate(5)
    else:
      os.remove(path)
  return latest


@pytest.mark.parametrize('damage', ['truncate', 'delete', 'no_default_item'])
def test_a_damaged_latest_checkpoint_is_skipped_and_set_aside(smoke_config, tmp_path, capfd,
                                                             damage, crashed_runs):
  run_dir, _ = copy_of(crashed_runs, 2, tmp_path)
  latest = damage_latest(run_dir, damage)
  run = train.init_run(config_lib.read(smoke_config), (28, 28, 1), steps_per_epoch=16)
  with checkpoint.manager(str(run_dir), keep=2) as checkpoints:
    restored = train.restore_checkpoint(checkpoints, run.state, (run.data_keys, run.dropout_keys))
  assert restored[-1] == 16
  assert f'checkpoint {latest} is damaged' in capfd.readouterr().err
  assert os.listdir(run_dir / 'checkpoints.damaged') == ['32']  # Kept for a post-mortem.


def test_same_size_corruption_is_caught_by_the_sums_and_the_run_retrains_exactly(
    smoke_config, tmp_path, capfd, crashed_runs):
  run_dir, finished = copy_of(crashed_runs, 2, tmp_path)
  smoke_config.num_epochs = 2
  latest = damage_latest(run_dir, 'same_size')
  # predict and visualize read the intact checkpoint and leave the workdir as it is.
  before, listing = fingerprint(run_dir), sorted(os.listdir(run_dir))
  assert inference.Trained(str(run_dir)).step == 16
  assert fingerprint(run_dir) == before and sorted(os.listdir(run_dir)) == listing
  again = train.train_and_evaluate(smoke_config, str(run_dir))
  captured = capfd.readouterr()
  assert f'checkpoint {latest} is damaged (default/' in captured.err
  assert 'SHA-256 differs' in captured.err
  assert 'from its checkpoint at step 16' in captured.out
  assert os.listdir(run_dir / 'checkpoints.damaged') == ['32']
  assert again['test_accuracy'] == finished['test_accuracy']  # Retrained epoch 2 exactly.


def test_read_only_tools_create_nothing_in_a_workdir_without_checkpoints(smoke_config,
                                                                         tmp_path):
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  for name, record in (('config.json', smoke_config.to_dict()),
                       ('data.json', {'image_shape': [28, 28, 1], 'mean': 0.1, 'std': 0.3})):
    workdir.write_json(str(run_dir / name), record)
  with pytest.raises(checkpoint.CheckpointError, match='checkpoints not found'):
    inference.Trained(str(run_dir))
  assert sorted(os.listdir(run_dir)) == ['config.json', 'data.json']


def test_no_intact_checkpoint_is_an_error_naming_the_directory(smoke_config, tmp_path,
                                                               crashed_runs):
  run_dir, _ = copy_of(crashed_runs, 2, tmp_path)
  smoke_config.num_epochs = 2
  for root, _, names in os.walk(run_dir / 'checkpoints'):
    for name in names:
      if name == 'manifest.ocdbt':
        os.remove(os.path.join(root, name))
  before = fingerprint(run_dir)
  with pytest.raises(checkpoint.CheckpointError, match='no checkpoint in .*checkpoints restores'):
    train.train_and_evaluate(smoke_config, str(run_dir))
  assert fingerprint(run_dir) == before


def test_a_checkpoint_of_another_model_is_refused_and_changes_nothing(smoke_config, tmp_path,
                                                                      crashed_runs):
  """--allow_config_change with a model change: the checkpoint holds another model, so
  the run cannot start, and config.json stays as it was (the first command still resumes)."""
  run_dir, _ = copy_of(crashed_runs, 1, tmp_path)
  before = fingerprint(run_dir)
  other = smoke_config.copy_and_resolve_references()
  other.model.filters = (8,)
  with pytest.raises(checkpoint.CheckpointError,
                     match=f'{run_dir / "checkpoints" / "16"} holds a different model'):
    train.train_and_evaluate(other, str(run_dir), allow_config_change=True)
  assert fingerprint(run_dir) == before


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, crashed_runs):
  run_dir, _ = copy_of(crashed_runs, 1, tmp_path)  # Checkpoint 16: 804,554 params + Adam.
  before = fingerprint(run_dir / 'checkpoints' / '16')

  def small_disk():  # Any file write beyond 256 kB fails, as on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

  command = main_command(run_dir, '--config.num_epochs=2', '--allow_config_change')
  full = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                        preexec_fn=small_disk)
  assert full.returncode == 1, full.stderr
  # Orbax's threads log their own tracebacks, which can interleave with our one-line
  # 'error: ...' (seen: a thread's last line with no newline yet, then ours).
  assert 'error: could not write the checkpoint of step 32' in full.stderr
  assert 'File too large' in full.stderr and 'checkpoints before it are intact: [16]' in full.stderr
  assert fingerprint(run_dir / 'checkpoints' / '16') == before
  assert '32.orbax-checkpoint-tmp' in os.listdir(run_dir / 'checkpoints')  # Orbax's part-write.
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert 'checkpoint at step 16' in done.stdout
  assert sorted(os.listdir(run_dir / 'checkpoints')) == ['16', '32']  # The part-write cleared.


def no_space_known(directory, num_bytes):  # What the free-space check says on a full disk.
  raise OSError(28, 'No space left on device: 0.0 MB free, 9.7 MB needed')


def no_space_from_orbax(directory, num_bytes):  # What orbax raises when the disk fills mid-write.
  raise ValueError('RESOURCE_EXHAUSTED: Error writing "state.params" in OCDBT database: Failed '
                   'to write 76097 bytes to file 18: No space left on device')


@pytest.mark.parametrize('failure', [no_space_known, no_space_from_orbax])
def test_a_full_disk_is_one_line_naming_the_kept_checkpoint_not_out_of_memory(
    smoke_config, tmp_path, crashed_runs, monkeypatch, failure):
  run_dir, _ = copy_of(crashed_runs, 1, tmp_path)
  before = fingerprint(run_dir / 'checkpoints' / '16')
  monkeypatch.setattr(checkpoint, 'check_space', failure)
  config = smoke_config.copy_and_resolve_references()
  config.num_epochs = 2
  with pytest.raises(checkpoint.CheckpointError) as raised:
    train.train_and_evaluate(config, str(run_dir), allow_config_change=True)
  assert not isinstance(raised.value, MemoryError)
  assert str(raised.value).startswith(f'could not write the checkpoint of step 32 in '
                                      f'{run_dir / "checkpoints"}: ')
  assert 'No space left on device' in str(raised.value)
  assert str(raised.value).endswith('the checkpoints before it are intact: [16]; once it can '
                                    'be written, rerun the same command to resume from step 16')
  assert sorted(os.listdir(run_dir / 'checkpoints')) == ['16']
  assert fingerprint(run_dir / 'checkpoints' / '16') == before


def test_the_free_space_check_refuses_only_what_cannot_fit(tmp_path, monkeypatch):
  free = shutil.disk_usage(tmp_path).free
  checkpoint.check_space(str(tmp_path), free // 2)
  with pytest.raises(OSError, match=r'No space left on device: .* MB free, .* MB needed'):
    checkpoint.check_space(str(tmp_path), 2 * free)


def test_save_returns_before_the_write_and_finish_waits_for_the_files_and_sums(tmp_path,
                                                                                 monkeypatch):
  """The training thread hands the state over and goes on; the writer thread writes it and
  its sums (held up here until released); finish waits for both; the state restores."""
  release, original_sums = threading.Event(), checkpoint.file_sums
  monkeypatch.setattr(checkpoint, 'file_sums',
                      lambda path: release.wait(60) and original_sums(path))
  tree = {'w': np.arange(12, dtype=np.float32).reshape(3, 4), 'step': np.int32(7)}
  step_dir = tmp_path / 'checkpoints' / '7'
  with checkpoint.manager(str(tmp_path), keep=2) as checkpoints:
    checkpoint.save(checkpoints, 7, tree)
    assert not (step_dir / checkpoint.SUMS).exists()  # save returned with the write pending.
    release.set()
    checkpoint.finish(checkpoints)
    assert json.loads((step_dir / checkpoint.SUMS).read_text()) == original_sums(str(step_dir))
  with checkpoint.manager(str(tmp_path), keep=2, read_only=True) as checkpoints:
    restored, step = checkpoint.restore_latest(checkpoints, tree, read_only=True)
  assert step == 7
  np.testing.assert_array_equal(restored['w'], tree['w'])


def test_non_finite_loss_stops_at_its_step_and_its_advice_works(smoke_config, tmp_path,
                                                                crashed_runs):
  run_dir, _ = copy_of(crashed_runs, 1, tmp_path)
  before = fingerprint(run_dir)
  exploding = smoke_config.copy_and_resolve_references()
  exploding.num_epochs, exploding.learning_rate = 2, 1e30
  # Step 17 (the first after the checkpoint) still has good params, so its loss is
  # finite; its Adam update of ~1e30 makes step 18's loss the first non-finite one.
  with pytest.raises(FloatingPointError, match=r'non-finite training loss at step 18 .*'
                                               r'last good checkpoint \(step 16\) is kept: rerun '
                                               r'with a lower learning_rate \(now 1e\+30\) and '
                                               r'--allow_config_change'):
    train.train_and_evaluate(exploding, str(run_dir), allow_config_change=True)
  assert fingerprint(run_dir) == before  # Failed before it started: nothing written.
  exploding.learning_rate = 1e-3 / 2  # As the message says: it resumes from step 16.
  results = train.train_and_evaluate(exploding, str(run_dir), allow_config_change=True)
  assert results['test_accuracy'] > 0.5
  assert workdir.read_json(str(run_dir / 'config.json.before_change'))['learning_rate'] == 1e-3


def test_a_diverging_fresh_run_stops_and_leaves_no_workdir(smoke_config, tmp_path):
  smoke_config.optimizer, smoke_config.learning_rate = 'adam', 1e6
  with pytest.raises(FloatingPointError, match=r'training diverged: loss .* at step \d+ is above '
                                               r'divergence_factor=10.0 x ln\(10\) = 23.03 .* '
                                               r'nothing was written'):
    train.train_and_evaluate(smoke_config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_divergence_rule():
  fine = np.array([[2.3, 1.0, 0.5], [2.2, 0.9, 0.4]])  # [seeds, steps]
  assert train.divergence(fine, 10, 10.0, 10) is None
  nan = fine.copy()
  nan[1, 2] = np.nan
  assert train.divergence(nan, 10, 10.0, 10) == 'non-finite training loss at step 13'
  high = fine.copy()
  high[0, 1] = 30.0
  assert train.divergence(high, 10, 10.0, 10).startswith(
      'training diverged: loss 30 at step 12 is above divergence_factor=10.0 x ln(10) = 23.03')
  assert train.divergence(high, 10, 0.0, 10) is None  # 0: only non-finite losses stop it.


def test_a_workdir_in_use_is_refused_naming_its_process_and_a_stale_lock_is_not(
    smoke_config, tmp_path, crashed_runs):
  run_dir, _ = copy_of(crashed_runs, 1, tmp_path)
  with workdir.locked(str(run_dir)):  # As a live run holds it.
    before = fingerprint(run_dir)
    with pytest.raises(workdir.LockedError, match=f'{run_dir} is in use by process {os.getpid()}'):
      train.train_and_evaluate(smoke_config, str(run_dir))
    assert fingerprint(run_dir) == before
  assert not (run_dir / '.lock').exists()
  # A process killed while holding the lock leaves its file; the next run is not blocked.
  killed = subprocess.run([sys.executable, '-c', 'import os, sys; from convnet import workdir\n'
                           'with workdir.locked(sys.argv[1]): os.kill(os.getpid(), 9)',
                           str(run_dir)], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert killed.returncode == -9 and (run_dir / '.lock').exists()
  with workdir.locked(str(run_dir)):
    assert (run_dir / '.lock').read_text() == f'{os.getpid()}\n'


def test_the_lock_dies_with_its_holder_not_with_its_file(tmp_path):
  """Deleting or overwriting WORKDIR/.lock during a run frees nothing, and the run's
  release never removes a .lock that another process wrote."""
  with workdir.locked(str(tmp_path)):
    os.remove(tmp_path / '.lock')
    with pytest.raises(workdir.LockedError, match=r'in use by process \(unknown: its .lock '
                                                  r'file was removed\)'):
      with workdir.locked(str(tmp_path)):
        pass
    (tmp_path / '.lock').write_text('12345\n')  # As if another process had written it.
  assert (tmp_path / '.lock').read_text() == '12345\n'
  with workdir.locked(str(tmp_path)):  # The holder is gone: the lock is free.
    assert (tmp_path / '.lock').read_text() == f'{os.getpid()}\n'


def test_concurrent_writes_of_one_file_all_land_whole(tmp_path):
  path, failures = str(tmp_path / 'shared.json'), []

  def writer(n):
    for i in range(200):
      try:
        workdir.write_json(path, {'writer': n, 'i': i})
      except OSError as e:
        failures.append(e)

  threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not failures
  assert workdir.read_json(path)['i'] == 199
  assert os.listdir(tmp_path) == ['shared.json']  # No temporary file left behind.


@pytest.mark.parametrize('error,out_of_memory', [
    (MemoryError('out of memory while compiling'), True),
    (jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 1 bytes'), True),
    (jax.errors.JaxRuntimeError('INTERNAL: something else'), False),
    (RuntimeError('RESOURCE_EXHAUSTED: quota of another library'), False)])
def test_a_start_that_fails_leaves_the_workdir_as_it_was(smoke_config, tmp_path, monkeypatch,
                                                         error, out_of_memory):
  """Only XLA's RESOURCE_EXHAUSTED (or a MemoryError) is reported as out of memory, with
  the settings to lower; any other error is raised as it is."""
  def fail(*args, **kwargs):
    raise error
  monkeypatch.setattr(train.parallel, 'compile_now', fail)
  expected = (train.OutOfMemory, r'out of memory on cpu: batch_size=128 over 2 device\(s\), '
              r'micro_batch_size \(0: .*lower batch_size .*; no checkpoint was written'
              ) if out_of_memory else (type(error), re.escape(str(error)))
  with pytest.raises(expected[0], match=expected[1]):
    train.train_and_evaluate(smoke_config, str(tmp_path / 'fresh'))
  assert not (tmp_path / 'fresh').exists()


def test_resume_on_another_device_count_is_refused_or_recorded(smoke_config, tmp_path,
                                                               crashed_runs):
  run_dir, _ = copy_of(crashed_runs, 1, tmp_path)  # Trained on conftest's 2 devices.
  before = fingerprint(run_dir)
  smoke_config.num_devices = 1
  with pytest.raises(workdir.ConfigMismatchError,
                     match=r'devices: 2 -> 1 .*--config.num_devices=2 resumes as it started'):
    train.train_and_evaluate(smoke_config, str(run_dir))
  assert fingerprint(run_dir) == before
  results = train.train_and_evaluate(smoke_config, str(run_dir), allow_config_change=True)
  assert results['num_devices'] == 1
  data = workdir.read_json(str(run_dir / 'data.json'))
  assert (data['num_devices'], data['earlier_num_devices']) == (1, [2])


def test_unwritable_workdir_is_an_error_naming_it(smoke_config, tmp_path):
  (tmp_path / 'file').write_text('not a directory')
  with pytest.raises(PermissionError, match='file/run: cannot create the workdir'):
    train.train_and_evaluate(smoke_config, str(tmp_path / 'file' / 'run'))


BAD_DATA = [
    ('mnist: directory not found \\(config key data.dir\\)', lambda d: shutil.rmtree(d)),
    ('train-images-idx3-ubyte.gz', lambda d: (d / 'train-images-idx3-ubyte.gz').write_bytes(
        (d / 'train-images-idx3-ubyte.gz').read_bytes()[:5000])),
    ('t10k-labels-idx1-ubyte.gz', lambda d: shutil.copy(d / 't10k-images-idx3-ubyte.gz',
                                                        d / 't10k-labels-idx1-ubyte.gz')),
]


@pytest.mark.parametrize('culprit,damage', BAD_DATA, ids=['missing-dir', 'truncated-gz', 'wrong-magic'])
def test_bad_data_or_config_on_an_existing_run_changes_nothing(smoke_config, tmp_path, culprit,
                                                               damage, crashed_runs):
  run_dir, _ = copy_of(crashed_runs, 1, tmp_path)
  before = fingerprint(run_dir)
  data_dir = tmp_path / 'mnist'
  shutil.copytree(MNIST_DIR, data_dir)
  damage(data_dir)
  smoke_config.data.dir = str(data_dir)  # data.dir may change on resume; bad files may not.
  with pytest.raises(input_pipeline.DataError, match=culprit):
    train.train_and_evaluate(smoke_config, str(run_dir))
  smoke_config.data.dir, smoke_config.model.kernel_size = str(data_dir), (40,)
  with pytest.raises((config_lib.ConfigError, input_pipeline.DataError)):
    train.train_and_evaluate(smoke_config, str(run_dir))
  assert fingerprint(run_dir) == before


def test_sigterm_during_start_up_stops_with_a_line_and_leaves_nothing(smoke_config, tmp_path,
                                                                      monkeypatch):
  """SIGTERM while the run starts (here: while it counts the model's FLOPs, before the
  first step compiles) stops it before training, with the workdir as it was: none."""
  real = train.training_flops_per_image

  def signalled(*args):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args)

  monkeypatch.setattr(train, 'training_flops_per_image', signalled)
  with pytest.raises(train.Interrupted, match=r'SIGTERM before training started: .* is as it '
                                              r'was; rerun the same command to start'):
    train.train_and_evaluate(smoke_config, str(tmp_path / 'run'))
  assert os.listdir(tmp_path) == []
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # The handler is put back.


def test_predict_while_a_run_replaces_its_checkpoint_reads_the_new_one(tmp_path, crashed_runs,
                                                                       monkeypatch, capfd):
  """keep_checkpoints=1: the run saves step 48 and removes step 16 while predict reads 16.
  That is no damage: predict reads 48, warns of nothing and moves nothing."""
  run_dir, _ = copy_of(crashed_runs, 1, tmp_path)
  checkpoints = run_dir / 'checkpoints'
  real_verify = checkpoint.verify

  def replaced_while_read(path):
    if path.endswith('/16'):
      shutil.copytree(checkpoints / '16', checkpoints / '48')
      shutil.rmtree(checkpoints / '16')
    return real_verify(path)

  monkeypatch.setattr(checkpoint, 'verify', replaced_while_read)
  trained = inference.Trained(str(run_dir))
  assert trained.step == 48
  assert 'damaged' not in capfd.readouterr().err
  assert sorted(os.listdir(checkpoints)) == ['48'] and not (run_dir / 'checkpoints.damaged').exists()
