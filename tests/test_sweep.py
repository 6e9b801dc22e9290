"""Sweeps: expansion, bad overrides, resuming after a kill, worker shares, the report."""

import csv
import glob
import importlib.util
import inspect
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, fingerprint
from convnet import config_lib, inference, predict, report, sweep, train, visualize, workdir


def test_product_and_zipped_give_the_right_points_and_names():
  points = sweep.product(sweep.values('model.filters', [8, 16]),
                         sweep.values('model.kernel_size', [1, 3, 5]))
  assert len(points) == 6
  assert points[0] == {'model.filters': 8, 'model.kernel_size': 1}
  assert points[-1] == {'model.filters': 16, 'model.kernel_size': 5}
  assert sweep.point_name(points[1]) == 'model.filters=8,model.kernel_size=3'
  zipped = sweep.zipped(sweep.values('model.num_blocks', [1, 2]),
                        sweep.values('model.filters', [(32,), (32, 64)]))
  assert zipped == [{'model.num_blocks': 1, 'model.filters': (32,)},
                    {'model.num_blocks': 2, 'model.filters': (32, 64)}]
  assert sweep.point_name(zipped[1]) == 'model.num_blocks=2,model.filters=32-64'
  with pytest.raises(ValueError, match='different lengths'):
    sweep.zipped(sweep.values('seed', [0, 1]), sweep.values('model.filters', [8]))


def test_overrides_set_per_block_tuples_and_unknown_keys_fail_naming_them(smoke_config):
  config = sweep.apply_overrides(smoke_config, {'model.filters': 8, 'learning_rate': 0.01})
  assert config.model.filters == (8,) and config.learning_rate == 0.01
  assert smoke_config.model.filters == (32,)  # The base is untouched.
  with pytest.raises(config_lib.ConfigError, match="'model.widht': unknown config key"):
    sweep.expand(smoke_config, [{'model.filters': 8}, {'model.widht': 3}], 2)
  with pytest.raises(config_lib.ConfigError,
                     match='sweep point model.filters=0: model.filters must be > 0'):
    sweep.expand(smoke_config, [{'model.filters': 0}], 2)


def test_worker_shares_are_disjoint_and_cover_every_point():
  shares = [sweep.worker_share(10, 3, k) for k in range(3)]
  assert sorted(i for share in shares for i in share) == list(range(10))
  assert shares[1] == [1, 4, 7]
  with pytest.raises(config_lib.ConfigError, match='--worker_index=3'):
    sweep.worker_share(10, 3, 3)


EXPERIMENT = '''
from configs import default
from convnet import sweep

def get_config():
  config = default.get_config('smoke')
  config.data.num_train = 1024
  config.log_every_steps = 2
  config.num_seeds = 2
  return config

def get_sweep():
  return sweep.product(sweep.values('model.filters', [4, 8]),
                       sweep.values('model.kernel_size', [3]))
'''


def sweep_command(experiment, sweep_dir, *flags):
  """The sweep command, one point at a time unless flags say otherwise."""
  return [sys.executable, '-m', 'convnet.sweep', '--config', str(experiment), '--workdir',
          str(sweep_dir), '--points_at_once=1', *flags]


def test_a_killed_sweep_reruns_only_the_missing_points_and_reports_them(tmp_path):
  experiment = tmp_path / 'tiny.py'
  experiment.write_text(EXPERIMENT)
  sweep_dir = tmp_path / 'sweep'
  names = ['model.filters=4,model.kernel_size=3', 'model.filters=8,model.kernel_size=3']
  # Killed while the 2nd point trains: the 1st is finished, the 2nd is not.
  log = open(tmp_path / 'killed.log', 'w')
  process = subprocess.Popen(sweep_command(experiment, sweep_dir), cwd=REPO, stdout=log,
                             stderr=log)
  deadline = time.time() + 240
  while time.time() < deadline and not (sweep_dir / names[1] / 'metrics.jsonl').exists():
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  assert (sweep_dir / names[0] / 'results.json').exists()
  assert not (sweep_dir / names[1] / 'results.json').exists()
  finished = (sweep_dir / names[0] / 'results.json').read_text()

  done = subprocess.run(sweep_command(experiment, sweep_dir), cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  assert '2 points, 2 for worker 0 of 1, 1 already done' in done.stdout
  assert 'point 1 of 2' not in done.stdout  # Finished points are never run again.
  assert (sweep_dir / names[0] / 'results.json').read_text() == finished
  with open(sweep_dir / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [(r['model.filters'], r['model.kernel_size']) for r in rows] == [('4', '3'), ('8', '3')]
  assert all(r['status'] == 'done' and r['num_seeds'] == '2' for r in rows)
  assert all(0.25 < float(r['test_accuracy']) <= 1 for r in rows)  # 8 steps; chance is 0.1
  assert float(rows[1]['num_params']) == (3 * 3 * 8 + 8) + (14 * 14 * 8 * 128 + 128) + 1290
  markdown = (sweep_dir / 'results.md').read_text().splitlines()
  assert markdown[0].startswith('| model.filters | model.kernel_size | test accuracy %')
  assert len(markdown) == 2 + 2
  for name in ('heatmap.png', 'accuracy_vs_params.png', 'curves.png'):
    with Image.open(sweep_dir / name) as image:
      assert image.size[0] > 300 and image.size[1] > 200, name
      assert len(np.unique(np.asarray(image.convert('L')))) > 10, name  # Not blank.

  # The report command rebuilds the same table from the files alone.
  os.remove(sweep_dir / 'results.md')
  again = subprocess.run([sys.executable, '-m', 'convnet.report', '--workdir',
                          str(sweep_dir)], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert again.returncode == 0, again.stderr
  assert (sweep_dir / 'results.md').read_text().splitlines() == markdown
  # A SLURM array task (ids 4-5) is a worker of the sweep without --num_workers/--worker_index.
  slurm = {**os.environ, 'SLURM_ARRAY_TASK_ID': '5', 'SLURM_ARRAY_TASK_MIN': '4',
           'SLURM_ARRAY_TASK_COUNT': '2'}
  task = subprocess.run(sweep_command(experiment, sweep_dir), cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=slurm)
  assert task.returncode == 0, task.stderr
  assert '2 points, 1 for worker 1 of 2, 1 already done' in task.stdout


def sweep_on_4_devices(experiment, tmp_path, *flags) -> subprocess.CompletedProcess:
  """The sweep of an experiment file into tmp_path/sweep, on 4 fake CPU devices."""
  return subprocess.run(sweep_command(experiment, tmp_path / 'sweep', *flags), cwd=REPO,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ,
                             'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})


def first_and_last_alone(experiment, tmp_path):
  """(name, its results.json in the sweep, the point trained alone on one device) for the
  first and last of an experiment's 4 points."""
  spec = importlib.util.spec_from_file_location('experiment', experiment)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for overrides in module.get_sweep()[::3]:
    name = sweep.point_name(overrides)
    config = sweep.apply_overrides(module.get_config(), overrides)
    config.num_devices = 1
    alone = train.train_and_evaluate(config, str(tmp_path / 'alone' / name))
    yield name, workdir.read_json(tmp_path / 'sweep' / name / 'results.json'), alone


def test_points_at_once_each_train_on_a_device_of_their_own_as_they_would_alone(tmp_path):
  """4 points (2 seeds each) at once on 4 fake devices: each point on its own device, and
  its results those of the point trained alone on one device (num_devices=1)."""
  experiment = tmp_path / 'four.py'
  experiment.write_text(EXPERIMENT.replace("kernel_size', [3]", "kernel_size', [3, 5]"))
  done = sweep_on_4_devices(experiment, tmp_path, '--points_at_once=4')
  assert done.returncode == 0, done.stderr
  assert ('4 points, 4 for worker 0 of 1, 0 already done; one program per point, 4 at once, '
          'each on one device of 4') in done.stdout
  lines = done.stdout.splitlines()
  starts = [line for line in lines if line.startswith('== point ') and ' on ' in line]
  assert len(starts) == 4 and len({line.split(' on ')[1].split(': ')[0] for line in starts}) == 4
  # Per point: its start, its epoch line (marked with the point) and its result.
  assert len([line for line in lines if line.startswith('[point ')]) == 4
  assert len([line for line in lines if ' done: model.filters=' in line]) == 4
  for name, together, alone in first_and_last_alone(experiment, tmp_path):
    assert together['num_devices'] == alone['num_devices'] == 1
    for key in ('test_accuracy_per_seed', 'test_loss_per_seed'):
      np.testing.assert_allclose(together[key], alone[key], rtol=1e-6, err_msg=name)


def test_points_of_one_program_train_vmapped_each_as_it_would_alone(tmp_path):
  """4 points (2 seeds each) differing in learning rate and dropout, 2 per vmapped program,
  2 programs at once on 4 fake devices: each point in its own workdir with the results of
  that point trained alone on one device."""
  experiment = tmp_path / 'rates.py'
  experiment.write_text(EXPERIMENT.replace(
      "sweep.values('model.filters', [4, 8]),\n                       "
      "sweep.values('model.kernel_size', [3])",
      "sweep.values('learning_rate', [1e-3, 2e-3]), sweep.values('model.dropout', [0.0, 0.25])"))
  done = sweep_on_4_devices(experiment, tmp_path, '--points_at_once=2', '--vmap_points=2')
  assert done.returncode == 0, done.stderr
  assert ('4 points, 4 for worker 0 of 1, 0 already done; 4 points in 2 vmapped programs, 2 at '
          'once, each on one device of 4') in done.stdout
  lines = done.stdout.splitlines()
  starts = [line for line in lines if line.startswith('== point ') and ', vmapped with 1 more: '
            in line]
  assert len(starts) == 4 and len({line.split(' on ')[1].split(',')[0] for line in starts}) == 2
  assert sorted(line.split(']')[0] for line in lines if ' epoch 1/1: ' in line) == [
      f'[point {i}' for i in range(1, 5)]  # Each point's epoch line, marked with the point.
  for name, together, alone in first_and_last_alone(experiment, tmp_path):
    assert together['vmapped_with'] == 1 and together['num_devices'] == 1
    np.testing.assert_allclose(together['test_loss_per_seed'], alone['test_loss_per_seed'],
                               rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(together['test_accuracy_per_seed'],
                               alone['test_accuracy_per_seed'], atol=2e-3, err_msg=name)


def test_every_point_is_checked_before_the_first_trains(smoke_config, tmp_path):
  """A bad later point (a kernel larger than its input, a name leaving the sweep
  directory) stops the sweep before anything is written."""
  smoke_config.data.num_train = 256
  for points, message in [
      (sweep.values('model.kernel_size', [3, 29]),
       r'sweep point model.kernel_size=29: model.kernel_size: block 0 has a 29x29 kernel'),
      (sweep.values('data.name', ['mnist', '../../../ESCAPED']),
       r"sweep point 'data.name=../../../ESCAPED': its directory name must be one path"),
      (sweep.values('model.hidden', [(8,), (128,) * 90]), r'at most 255 bytes')]:
    with pytest.raises(config_lib.ConfigError, match=message):
      sweep.run(smoke_config, points, str(tmp_path / 'sweep'))
    assert not (tmp_path / 'sweep').exists() and not (tmp_path / 'ESCAPED').exists()


def test_a_finished_point_of_another_config_is_refused_not_mixed_in(smoke_config, tmp_path):
  smoke_config.data.num_train, smoke_config.progress = 256, False
  points = sweep.values('model.filters', [4])
  sweep_dir = tmp_path / 'sweep'
  sweep.run(smoke_config, points, str(sweep_dir))
  before = fingerprint(sweep_dir)
  smoke_config.num_epochs = 2
  with pytest.raises(workdir.ConfigMismatchError,
                     match=r'sweep point model.filters=4 finished with another config or '
                           r'data:\n  num_epochs: 1 -> 2'):
    sweep.run(smoke_config, points, str(sweep_dir))
  assert fingerprint(sweep_dir) == before
  smoke_config.num_epochs, smoke_config.log_every_steps = 1, 7  # Does not change results.
  assert [r['status'] for r in sweep.run(smoke_config, points, str(sweep_dir))] == ['done']


def test_report_pools_seed_points_and_marks_pending_ones(tmp_path):
  points = sweep.product(sweep.values('model.filters', [4]), sweep.values('seed', [0, 1, 2]))
  workdir.write_json(str(tmp_path / 'sweep.json'),
                     [{'name': sweep.point_name(p), 'overrides': p} for p in points])
  for seed, accuracy in ((0, 0.9), (1, 0.8)):
    (tmp_path / f'model.filters=4,seed={seed}').mkdir()
    workdir.write_json(str(tmp_path / f'model.filters=4,seed={seed}' / 'results.json'), {
        'test_accuracy': accuracy, 'test_loss': 0.1, 'num_params': 10,
        'flops_per_image': 100.0, 'train_images_per_s': 1000.0, 'wall_time_s': 5.0})
  rows = report.collect(str(tmp_path))
  assert len(rows) == 1 and rows[0]['status'] == 'pending'
  (tmp_path / 'model.filters=4,seed=2').mkdir()
  workdir.write_json(str(tmp_path / 'model.filters=4,seed=2' / 'results.json'), {
      'test_accuracy': 0.7, 'test_loss': 0.1, 'num_params': 10, 'flops_per_image': 100.0,
      'train_images_per_s': 1000.0, 'wall_time_s': 5.0})
  row, = report.collect(str(tmp_path))
  assert row['num_seeds'] == 3 and row['wall_time_s'] == 15.0
  assert row['test_accuracy'] == pytest.approx(0.8)
  assert row['test_accuracy_std'] == pytest.approx(0.1)
  assert '| 80.00 ± 10.00 | 3 |' in report.markdown_table([row])
  one_seed = {**row, 'num_seeds': 1, 'test_accuracy_std': 0.0}
  assert '| 80.00 | 1 |' in report.markdown_table([one_seed])  # Not '± 0.00'.


def test_report_shows_swept_floats_as_given(tmp_path):
  """A learning rate of 3e-4 and a dropout of 0.25 stay what they are in the table, the
  CSV and the plots' labels, while the measured columns are rounded."""
  row = {'learning_rate': 3e-4, 'model.dropout': 0.25, 'model.filters': (8, 16),
         'test_accuracy': 0.9, 'test_accuracy_std': 0.01, 'num_seeds': 2, 'test_loss': 0.12345,
         'num_params': 1234, 'flops_per_image': 2.5e6, 'train_images_per_s': 1234.5,
         'wall_time_s': 12.34, 'status': 'done', 'names': ['p']}
  assert report.markdown_table([row]).splitlines()[2] == (
      '| 0.0003 | 0.25 | 8-16 | 90.00 ± 1.00 | 2 | 0.1235 | 1,234 | 2.5M | 1,234 | 12 | done |')
  report.write_csv(str(tmp_path / 'results.csv'), [row])
  assert (tmp_path / 'results.csv').read_text().splitlines()[1].startswith('0.0003,0.25,8-16,')
  assert report._label(row) == 'learning_rate=0.0003, dropout=0.25, filters=8-16'


def test_sweep_workers_with_different_overrides_are_refused_before_training(smoke_config,
                                                                           tmp_path):
  """Worker 0 recorded the sweep with num_epochs=1 (as when started together); worker 1
  with num_epochs=2, or with other points, is refused and writes nothing."""
  smoke_config.data.num_train, smoke_config.progress = 256, False
  points = sweep.values('model.filters', [4, 8])
  sweep_dir = tmp_path / 'sweep'
  sweep_dir.mkdir()
  sweep.record_sweep(str(sweep_dir), smoke_config.to_dict(),
                     [{'name': sweep.point_name(p), 'overrides': p} for p in points])
  before = fingerprint(sweep_dir)
  other = smoke_config.copy_and_resolve_references()
  other.num_epochs = 2
  with pytest.raises(workdir.ConfigMismatchError,
                     match=r'is a sweep of another base config .*base_config.json\): '
                           r'num_epochs: 1 -> 2; give the same --config overrides'):
    sweep.run(other, points, str(sweep_dir), num_workers=2, worker_index=1)
  with pytest.raises(workdir.ConfigMismatchError,
                     match=r"other points .*: only there \['model.filters=8'\], only here "
                           r"\['model.filters=16'\]"):
    sweep.run(smoke_config, sweep.values('model.filters', [4, 16]), str(sweep_dir))
  assert fingerprint(sweep_dir) == before


def test_a_point_another_worker_is_training_is_skipped_and_left_pending(smoke_config, tmp_path,
                                                                        capsys):
  smoke_config.data.num_train, smoke_config.progress = 256, False
  points = sweep.values('model.filters', [4, 8])
  busy = tmp_path / 'sweep' / 'model.filters=8'
  busy.mkdir(parents=True)
  with workdir.locked(str(busy)):  # As an overlapping worker training that point holds it.
    rows = sweep.run(smoke_config, points, str(tmp_path / 'sweep'), points_at_once=1)
  assert [r['status'] for r in rows] == ['done', 'pending']
  assert f'== point 2 of 2 skipped: {busy} is in use by process {os.getpid()}' in (
      capsys.readouterr().out)


def test_the_heatmap_orders_values_as_numbers_and_skips_a_zipped_sweep(tmp_path, monkeypatch):
  def rows(points):
    return [{'model.num_blocks': blocks, 'model.filters': filters, 'test_accuracy': 0.9,
             **{k: None for k in report.COLUMNS if k != 'test_accuracy'}}
            for blocks, filters in points]

  drawn = {}
  monkeypatch.setattr('matplotlib.axes.Axes.set_xticks',
                      lambda self, ticks, labels: drawn.update(x=list(labels)))
  monkeypatch.setattr('matplotlib.axes.Axes.set_yticks',
                      lambda self, ticks, labels: drawn.update(y=list(labels)))
  grid = rows([(b, f) for b in (2, 1) for f in ([16, 32], [8, 16], [128, 256])])
  assert report.plot_heatmap(str(tmp_path / 'grid.png'), grid)
  assert drawn == {'x': ['[8, 16]', '[16, 32]', '[128, 256]'], 'y': ['1', '2']}
  zipped = rows([(1, [32]), (2, [32, 64]), (3, [32, 64, 128])])  # sweep.zipped: a diagonal.
  assert not report.plot_heatmap(str(tmp_path / 'zipped.png'), zipped)
  assert not (tmp_path / 'zipped.png').exists()


IMAGE_SHAPES = {'mnist': (28, 28, 1), 'fashion_mnist': (28, 28, 1), 'cifar10': (32, 32, 3)}


def shipped(pattern):
  return sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, pattern)))


@pytest.mark.parametrize('path', shipped('configs/*.py') + shipped('experiments/*.py'))
def test_every_shipped_config_and_sweep_point_validates_and_fits_its_images(path):
  """Each configs/*.py (and its :smoke variant where it has one) and each point of each
  experiments/*.py passes validation and the shape check on its dataset's images."""
  if path.endswith('__init__.py'):
    return
  spec = importlib.util.spec_from_file_location('shipped', os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    assert path == 'experiments/edge_filter.py'  # A script, not a config.
    return
  configs = [module.get_config()]
  if inspect.signature(module.get_config).parameters:  # It has variants (default.py: smoke).
    configs.append(module.get_config('smoke'))
  if hasattr(module, 'get_sweep'):
    configs = [sweep.apply_overrides(configs[0], point) for point in module.get_sweep()]
  assert configs
  for config in configs:
    spec = config_lib.validate(config, 2)
    config_lib.check_shapes(spec.model.blocks, IMAGE_SHAPES[config.data.name])


def test_a_run_older_than_some_keys_reruns_visualizes_and_predicts(smoke_config, tmp_path,
                                                                   monkeypatch, mnist):
  """A finished point whose config.json predates data.augment, data.augment_pixels,
  model.stride and model.dilation: each reads as config_lib.ABSENT says the run computed
  (a per-block key: its shapes.Block default). The sweep reruns over it, visualize and
  predict read it; without its ABSENT entry the rerun is refused naming the key. (Its
  resume: test_checkpoint.)"""
  smoke_config.data.num_train, smoke_config.progress = 256, False
  points = sweep.values('model.filters', [4])
  sweep_dir = tmp_path / 'sweep'
  sweep.run(smoke_config, points, str(sweep_dir))
  point = sweep_dir / 'model.filters=4'
  saved = workdir.read_json(point / 'config.json')
  del saved['data']['augment'], saved['data']['augment_pixels']
  del saved['model']['stride'], saved['model']['dilation']
  workdir.write_json(str(point / 'config.json'), saved)
  with monkeypatch.context() as patch:
    patch.delitem(config_lib.ABSENT, 'data.augment_pixels')
    with pytest.raises(workdir.ConfigMismatchError,
                       match=r"data.augment_pixels: '<absent>' -> 2\n"):
      sweep.run(smoke_config, points, str(sweep_dir))
  assert [r['status'] for r in sweep.run(smoke_config, points, str(sweep_dir))] == ['done']
  trained = inference.Trained(str(point))
  assert trained.spec.data.augment == 'none' and trained.spec.model.blocks[0].stride == 1
  assert all(os.path.getsize(path) for path in visualize.visualize(str(point),
                                                                    out=str(tmp_path / 'f')))
  Image.fromarray(mnist.test.images[0].squeeze()).save(tmp_path / 'digit.png')
  [row] = predict.predict(str(point), [str(tmp_path / 'digit.png')])
  assert 0 <= row['label'] < 10 and len(row['top3']) == 3