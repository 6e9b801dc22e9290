"""`python -m convnet.main` as a user runs it: outputs, bad overrides, bad data, reused workdirs."""

import importlib
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, fingerprint, main_command
from convnet import config_lib, shapes, train


def run_main(workdir, *overrides):
  return subprocess.run(main_command(workdir, *overrides), cwd=REPO, capture_output=True,
                        text=True, timeout=300)


def test_cli_trains_and_writes_every_output(tmp_path, mnist):
  overrides = ('--config.data.num_train=512', '--config.model.filters=8',
               '--config.model.kernel_size=5', '--config.log_every_steps=2')
  done = run_main(tmp_path / 'run', *overrides)
  assert done.returncode == 0, done.stderr
  assert 'epoch 1/1' in done.stdout and 'test loss' in done.stdout
  assert 'compiling the training step' in done.stdout  # Said before the wait, not after.
  summary = done.stdout.strip().splitlines()[-1]  # The last line says where everything is.
  results_path = summary.split('; results ')[1].split(';')[0]
  tensorboard_dir = summary.split('tensorboard --logdir ')[1].split(';')[0]
  assert summary.startswith('done: test accuracy ')
  assert os.path.isfile(results_path) and os.path.isdir(tensorboard_dir)
  assert summary.endswith(f'python -m convnet.visualize --workdir {tmp_path / "run"}')
  # The TensorBoard command it prints works in this venv (--inspect: no server).
  tensorboard = summary.split('TensorBoard: ')[1].split(';')[0].split()
  shown = subprocess.run([*tensorboard, '--inspect'], capture_output=True, text=True, timeout=120)
  assert shown.returncode == 0 and 'scalars' in shown.stdout, shown.stderr
  files = sorted(os.listdir(tmp_path / 'run'))
  assert files == ['checkpoints', 'config.json', 'data.json', 'metrics.jsonl', 'results.json',
                   'tensorboard']
  with open(tmp_path / 'run' / 'results.json') as f:
    results = json.load(f)
  for key in ('test_accuracy', 'test_loss', 'num_params', 'num_epochs', 'train_time_s',
              'train_images_per_s', 'num_devices', 'device_kind'):
    assert key in results, key
  assert results['num_devices'] == 2 and results['num_epochs'] == 1
  assert results['kernels'] == 'cpu'  # What 'auto' picked here.
  assert results['num_params'] == (5 * 5 * 8 + 8) + (14 * 14 * 8 * 128 + 128) + (128 * 10 + 10)
  with open(tmp_path / 'run' / 'config.json') as f:
    saved = json.load(f)
  assert saved['model']['filters'] == [8] and saved['model']['kernel_size'] == [5]
  with open(tmp_path / 'run' / 'data.json') as f:
    data = json.load(f)  # What predict and visualize need, and what was trained on.
  assert data['image_shape'] == [28, 28, 1] and data['num_classes'] == 10
  pixels = mnist.train.images[:512] / 255  # The statistics of the images trained on.
  assert data['mean'] == pytest.approx([pixels.mean()], abs=1e-12)
  assert data['std'] == pytest.approx([pixels.std()], abs=1e-12)
  assert data['train']['count'] == 512 and data['test']['count'] == 10000
  assert len(data['train']['sha256']) == 64 and data['train']['sha256'] != data['test']['sha256']
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records if 'train_loss' in r] == [2, 4]
  assert records[-1]['test_count'] == 10000
  # The figures command the summary names: quiet, and it adds figures/ and nothing else.
  before = fingerprint(tmp_path / 'run')
  shown = subprocess.run([sys.executable, '-m', 'convnet.visualize', '--workdir',
                          str(tmp_path / 'run')], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
  assert shown.returncode == 0, shown.stderr
  assert 'INFO' not in shown.stdout + shown.stderr and 'orbax' not in shown.stderr.lower()
  after = fingerprint(tmp_path / 'run')
  assert {k: v for k, v in after.items() if not k.startswith('figures')} == before
  assert len([k for k in after if k.startswith('figures')]) == 5
  missing = subprocess.run([sys.executable, '-m', 'convnet.visualize', '--workdir',
                            str(tmp_path / 'nothing')], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
  assert missing.returncode == 1 and not os.path.exists(tmp_path / 'nothing')
  assert missing.stderr.strip().splitlines() == [
      f'error: {tmp_path / "nothing" / "config.json"} not found: {tmp_path / "nothing"} holds no '
      f'run (or one from before config.json was written)']
  # Where the figures cannot go (here a file; a read-only workdir alike): one line, and
  # --out puts them elsewhere, leaving the run untouched.
  (tmp_path / 'blocked').write_text('a file')
  blocked = subprocess.run([sys.executable, '-m', 'convnet.visualize', '--workdir',
                            str(tmp_path / 'run'), '--out', str(tmp_path / 'blocked' / 'f')],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
  assert blocked.returncode == 1 and blocked.stderr.strip().splitlines() == [
      f'error: cannot write the figures into {tmp_path / "blocked" / "f"} (Not a directory): '
      f'give --out DIR']
  elsewhere = subprocess.run([sys.executable, '-m', 'convnet.visualize', '--workdir',
                              str(tmp_path / 'run'), '--out', str(tmp_path / 'figs')],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
  assert elsewhere.returncode == 0 and len(os.listdir(tmp_path / 'figs')) == 5
  assert fingerprint(tmp_path / 'run') == after
  # The same command again: a finished run is never overwritten.
  again = run_main(tmp_path / 'run', *overrides)
  assert again.returncode == 1 and 'holds a finished run' in again.stderr
  assert fingerprint(tmp_path / 'run') == after


def test_cli_per_block_tuple_override(tmp_path):
  done = run_main(tmp_path / 'run', '--config.data.num_train=256', '--config.model.num_blocks=2',
                  "--config.model.filters=(4,8)", '--config.model.hidden=()',
                  '--cpu_devices=1')  # Overrides the 2 devices conftest's XLA_FLAGS asks for.
  assert done.returncode == 0, done.stderr
  assert '[(14, 14, 4), (7, 7, 8)]' in done.stdout
  assert '1 x cpu in 1 process(es)' in done.stdout


@pytest.mark.parametrize('cpu_devices', [8, 1])
def test_cli_trains_the_library_ops_two_seeds_on_shifted_images_on_8_devices_and_1(
    tmp_path, cpu_devices):
  """What 'auto' runs on a GPU or TPU (the library ops), from the command line."""
  done = run_main(tmp_path / 'run', '--config.model.ops=xla', '--config.data.augment=shift',
                  '--config.num_seeds=2', f'--cpu_devices={cpu_devices}')
  assert done.returncode == 0, done.stderr
  assert "xla kernels (model.ops='xla')" in done.stdout
  assert f'{cpu_devices} x cpu in 1 process(es)' in done.stdout
  with open(tmp_path / 'run' / 'results.json') as f:
    results = json.load(f)
  assert results['kernels'] == 'xla'
  assert results['num_devices'] == cpu_devices and results['seeds'] == [0, 1]
  assert min(results['test_accuracy_per_seed']) > 0.5  # One epoch on 2,048 images; chance 0.1.


def test_a_rerun_loads_its_compiled_programs_from_the_cache_unless_told_not_to(tmp_path):
  def run(name, cache, *flags):
    """The run's stderr, with JAX's compiler saying what it found in the cache."""
    done = subprocess.run(main_command(tmp_path / name, '--config.data.num_train=256', *flags),
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'CONVNET_CACHE': str(cache),
                               'JAX_DEBUG_LOG_MODULES': 'jax._src.compiler'})
    assert done.returncode == 0, done.stderr
    return done.stderr

  run('uncached', tmp_path / 'unused', '--compilation_cache=false')
  assert not (tmp_path / 'unused').exists()
  run('first', tmp_path / 'cache')
  compiled = sorted(os.listdir(tmp_path / 'cache'))
  assert len(compiled) > 5  # The step, evaluation, init, ...
  hits = run('second', tmp_path / 'cache').count('Persistent compilation cache hit')
  # Every program of the rerun was loaded from there, none compiled again (it would be
  # stored under a key of its own). What that saves is the benchmark's to measure.
  assert hits >= len(compiled) - 1 and sorted(os.listdir(tmp_path / 'cache')) == compiled


def test_cli_bad_input_exits_nonzero_naming_the_problem(tmp_path):
  cases = [
      (['--config.model.widht=3'], "error: unknown config key 'model.widht' in "
                                   "--config.model.widht=3 (configs/default.py lists every "
                                   "key)\n"),
      (['--config.model.filter=3'], "unknown config key 'model.filter' in "
                                    "--config.model.filter=3; did you mean 'model.filters'?"),
      (['--config.batch_size=abc'], 'batch_size'),
      (['--config.model.kernel_size=30'], 'model.kernel_size'),
      (['--config.data.dir=/no/such/mnist'], '/no/such/mnist'),
      (['--cpu_devices=-1'], 'cpu_devices'),
  ]
  for overrides, culprit in cases:
    done = run_main(tmp_path / 'run', *overrides)
    assert done.returncode != 0, overrides
    assert culprit in done.stderr, (overrides, done.stderr[-2000:])
    assert 'Traceback' not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / 'run').exists()
  # A tfds dataset that is not prepared: that one line, without tfds's own notices.
  done = run_main(tmp_path / 'run', '--config.data.source=tfds', '--config.data.name=cifar10',
                  f'--config.data.dir={tmp_path}')
  assert done.returncode == 1 and not (tmp_path / 'run').exists()
  assert done.stderr.strip().splitlines() == [
      f"error: tfds dataset 'cifar10' in {tmp_path}: not prepared there (config key data.dir); "
      f"set data.download=True to download and prepare it, or data.dir to the tfds data dir "
      f"holding it"]


def test_bad_config_files_are_one_line_errors(tmp_path, capsys):
  (tmp_path / 'broken.py').write_text('def get_config(:\n')
  (tmp_path / 'empty.py').write_text('x = 1\n')
  cases = [
      (str(tmp_path / 'missing.py'), 'No such file or directory'),
      (str(tmp_path / 'broken.py'), 'line 1: invalid syntax'),
      (str(tmp_path / 'empty.py'), 'the file defines no get_config()'),
      ('configs/best.py:smoke', 'its get_config() takes no argument; use --config configs/best.py'),
      ('configs/default.py:nosuch', "get_config() fails: ValueError: unknown variant 'nosuch' of "
                                   "configs/default.py; known: 'smoke'"),
  ]
  for config, message in cases:
    with pytest.raises(SystemExit) as exit_:
      config_lib.check_config_file(config)
    assert str(exit_.value) == f'error: --config {config}: {message}'
  # Through the command line: that one line and nothing else, nothing written.
  done = subprocess.run(main_command(tmp_path / 'run', config=cases[1][0]), cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == [f'error: --config {cases[1][0]}: {cases[1][1]}']
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('name', sorted(f[:-3] for f in os.listdir(os.path.join(REPO, 'configs'))
                                        if f.endswith('.py') and f != '__init__.py'))
def test_every_shipped_config_is_valid_and_its_model_fits_mnist(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  model = train.build_model(config_lib.validate(config, 2).model)
  config_lib.check_shapes(model.blocks, (28, 28, 1))
  assert shapes.feature_shapes(model.blocks, (28, 28, 1))[-1][0] >= 1
  assert config.model.ops == 'auto'  # Every shipped config lets the device pick the kernels.


SWEEP = (sys.executable, '-m', 'convnet.sweep', '--config', 'experiments/filters_kernel.py')
LONG = '/'.join(['x' * 200] * 19)
ONE_LINE_CASES = {  # case: (command (WORKDIR: the workdir), environment, the error line).
    'empty_workdir': (main_command(''), {}, 'error: --workdir is empty: give the directory'),
    'workdir_is_a_file': (main_command('WORKDIR/file'), {},
                          'error: WORKDIR/file is a file, not a directory'),
    'workdir_is_a_dangling_symlink': (
        main_command('WORKDIR/link'), {},
        'error: WORKDIR/link is a symbolic link to WORKDIR/nowhere, which does not exist'),
    'workdir_path_too_long': (main_command(f'WORKDIR/{LONG}'), {}, 'error: --workdir is '),
    'jax_num_processes_not_a_number': (
        main_command('WORKDIR/run', '--coordinator_address=localhost:1'),
        {'JAX_NUM_PROCESSES': 'abc'}, "error: $JAX_NUM_PROCESSES='abc' is not an integer"),
    'jax_platforms_without_its_accelerator': (
        main_command('WORKDIR/run'), {'JAX_PLATFORMS': 'cuda'},
        "error: JAX could not start (no backend started); JAX_PLATFORMS='cuda' asks for"),
    'partial_slurm_job': (
        main_command('WORKDIR/run'), {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'},
        'error: SLURM job 7 has 4 tasks but SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID '
        'not set: start one process per task with srun'),
    'damaged_sweep_json': (
        [sys.executable, '-m', 'convnet.report', '--workdir', 'WORKDIR/sweep'], {},
        'error: WORKDIR/sweep/sweep.json: not valid JSON'),
    'partial_slurm_array': (
        [*SWEEP, '--workdir', 'WORKDIR/run'], {'SLURM_ARRAY_TASK_ID': '3'},
        'error: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not: give '
        '--num_workers and --worker_index'),
}


@pytest.mark.parametrize('case', ONE_LINE_CASES)
def test_a_bad_workdir_or_environment_is_one_line_and_writes_nothing(tmp_path, case):
  command, environment, line = ONE_LINE_CASES[case]
  (tmp_path / 'file').write_text('a file')
  (tmp_path / 'link').symlink_to(tmp_path / 'nowhere')
  (tmp_path / 'sweep').mkdir()
  (tmp_path / 'sweep' / 'sweep.json').write_text('[{"name": ')  # Damaged.
  before = sorted(os.listdir(tmp_path))
  done = subprocess.run([part.replace('WORKDIR', str(tmp_path)) for part in command], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, **environment})
  assert done.returncode == 1
  assert done.stderr.strip().startswith(line.replace('WORKDIR', str(tmp_path))), done.stderr
  assert len(done.stderr.strip().splitlines()) == 1, done.stderr
  assert sorted(os.listdir(tmp_path)) == before


def test_cli_trains_a_dilated_conv_and_says_once_where_it_runs(tmp_path):
  done = run_main(tmp_path / 'run', '--config.data.num_train=512', '--config.model.dilation=2',
                  '--config.model.padding=VALID')
  assert done.returncode == 0, done.stderr
  assert 'feature maps [(12, 12, 32)]' in done.stdout  # 28 -> 24 (spanning 5x5) -> 12.
  assert done.stderr.count('note: model.dilation=2: the CPU conv kernel does not handle it') == 1
