"""Sweep points that differ only in keys that change no shape, trained as one vmapped
program (train.train_together): each equal to the point alone, each in its own workdir."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import metrics_without_timings
from configs import default
from convnet import checkpoint, config_lib, inference, sweep, train, workdir

# Each differs from the first in train.VMAPPED_KEYS only: every one of them varies.
POINTS = [
    {},
    {'seed': 5, 'learning_rate': 3e-3, 'schedule': 'constant', 'warmup_epochs': 0.5},
    {'weight_decay': 0.1, 'label_smoothing': 0.1, 'model.dropout': 0.0, 'data.augment_pixels': 1},
]


def point_config(overrides: dict):
  """The smoke model for 2 epochs on 512 images, with AdamW, shifts and dropout."""
  config = default.get_config('smoke')
  config.data.num_train, config.num_epochs, config.num_devices = 512, 2, 1
  config.optimizer, config.weight_decay = 'adamw', 1e-4
  config.data.augment, config.data.augment_pixels = 'shift', 2
  return sweep.apply_overrides(config, overrides)


def group(directory) -> list[tuple]:
  return [(point_config(p), str(directory / f'point{i}')) for i, p in enumerate(POINTS)]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """The three points trained together, and each alone."""
  directory = tmp_path_factory.mktemp('vmapped')
  together = train.train_together(group(directory / 'together'))
  alone = [train.train_and_evaluate(config, str(directory / 'alone' / f'point{i}'))
           for i, (config, _) in enumerate(group(directory))]
  return directory, together, alone


def test_points_trained_together_equal_each_point_trained_alone(trained, mnist):
  directory, together, alone = trained
  for i, (mine, its) in enumerate(zip(together, alone)):
    assert mine['vmapped_with'] == 2 and 'vmapped_with' not in its
    np.testing.assert_allclose(mine['test_loss'], its['test_loss'], rtol=1e-4, err_msg=str(i))
    assert abs(mine['test_accuracy'] - its['test_accuracy']) <= 2e-3  # A test image or two.
    run_dir = directory / 'together' / f'point{i}'
    # Its own workdir, as the point alone writes it: its config, records and checkpoints.
    assert workdir.read_json(run_dir / 'config.json') == json.loads(
        json.dumps(point_config(POINTS[i]).to_dict()))
    assert workdir.read_json(run_dir / 'results.json') == mine
    records = metrics_without_timings(run_dir)
    their_records = metrics_without_timings(directory / 'alone' / f'point{i}')
    assert [r['step'] for r in records] == [r['step'] for r in their_records]
    np.testing.assert_allclose([r.get('learning_rate', 0) for r in records],
                               [r.get('learning_rate', 0) for r in their_records], rtol=1e-6)
    assert sorted(os.listdir(run_dir / 'checkpoints')) == ['4', '8']
    # What predict and visualize load: the point's own model, as the point alone gives it.
    digits = mnist.test.images[:8]
    np.testing.assert_allclose(
        inference.Trained(str(run_dir)).apply(digits),
        inference.Trained(str(directory / 'alone' / f'point{i}')).apply(digits), atol=1e-3)
  assert len({r['test_loss'] for r in together}) == 3  # Each its own values, not the first's.


def test_an_interrupted_group_resumes_as_it_would_have_run(trained, tmp_path, monkeypatch):
  """Stopped in its first epoch (as SIGTERM stops it), the group saves a checkpoint per
  point; rerun, it resumes all of them and ends where the uninterrupted group ended. With
  one point's checkpoint gone, the points are at different steps: refused, naming them."""
  directory, together, _ = trained
  real = train.Training.start_chunk

  def stop_after_the_first_epoch(self):
    handlers = real(self)
    self.stop_requested.append('SIGTERM')
    return handlers

  monkeypatch.setattr(train.Training, 'start_chunk', stop_after_the_first_epoch)
  with pytest.raises(train.Interrupted, match='SIGTERM at step 4'):
    train.train_together(group(tmp_path / 'run'))
  monkeypatch.setattr(train.Training, 'start_chunk', real)
  for i in range(len(POINTS)):
    assert os.listdir(tmp_path / 'run' / f'point{i}' / 'checkpoints') == ['4']
  resumed = train.train_together(group(tmp_path / 'run'))
  for i, (mine, uninterrupted) in enumerate(zip(resumed, together)):
    assert mine['test_loss'] == uninterrupted['test_loss'], i
    assert (metrics_without_timings(tmp_path / 'run' / f'point{i}') ==
            metrics_without_timings(directory / 'together' / f'point{i}'))

  monkeypatch.setattr(train.Training, 'start_chunk', stop_after_the_first_epoch)
  with pytest.raises(train.Interrupted):
    train.train_together(group(tmp_path / 'again'))
  monkeypatch.setattr(train.Training, 'start_chunk', real)
  shutil.rmtree(tmp_path / 'again' / 'point1' / 'checkpoints' / '4')
  with pytest.raises(checkpoint.CheckpointError, match=r'points at different steps .*point1.: 0'):
    train.train_together(group(tmp_path / 'again'))


def test_only_points_of_one_program_train_together(tmp_path):
  """A shape key differs: refused, naming it. The sweep groups points by program and by
  the step they resume from, at most vmap_points per group."""
  runs = group(tmp_path)
  runs[1][0].model.filters = (8,)
  with pytest.raises(config_lib.ConfigError, match=r'point1 cannot train in one program with .*'
                                                   r'model.filters: \(32,\) -> \(8,\)'):
    train.train_together(runs)
  assert not os.listdir(tmp_path)
  configs = [point_config(p) for p in POINTS + [{}]]
  configs[3].model.filters = (8,)
  todo = [sweep.Point(i, 4, f'p{i}', c, config_lib.read(c)) for i, c in enumerate(configs)]
  assert [[p.index for p in g] for g in sweep.program_groups(todo, str(tmp_path), 0)] == [
      [0, 1, 2], [3]]
  assert [[p.index for p in g] for g in sweep.program_groups(todo, str(tmp_path), 2)] == [
      [0, 1], [2], [3]]
  os.makedirs(tmp_path / 'p1' / 'checkpoints' / '4')
  assert [[p.index for p in g] for g in sweep.program_groups(todo, str(tmp_path), 0)] == [
      [0, 2], [1], [3]]


def test_one_point_compiles_no_member_values(smoke_config):
  """Values the points share stay constants of the program: a run alone varies nothing."""
  specs = [config_lib.read(point_config(p)) for p in POINTS]
  assert train.member_values(specs[:1], steps_per_epoch=4) == {}
  values = train.member_values(specs, steps_per_epoch=4)
  assert sorted(values) == ['data.augment_pixels', 'label_smoothing', 'learning_rate',
                            'model.dropout', 'weight_decay']
  np.testing.assert_allclose(values['learning_rate'][1], [0.0, 1.5e-3, 3e-3, 3e-3, 3e-3,
                                                          3e-3, 3e-3, 3e-3], rtol=1e-6)
  np.testing.assert_array_equal(values['data.augment_pixels'], [2, 2, 1])


def test_points_vmapped_on_the_library_ops_equal_each_alone(tmp_path):
  """What a GPU or TPU runs (model.ops='xla', the floor's and Colab's jax too): two points
  with their own learning rate, dropout and shifts in one program, each as it is alone."""
  runs = group(tmp_path / 'together')[:2]
  for config, _ in runs:
    config.model.ops, config.num_epochs, config.data.num_train = 'xla', 1, 256
    config.model.dropout, config.data.augment_pixels = config.model.dropout + 0.1, 1
  runs[1][0].data.augment_pixels = 2
  together = train.train_together(runs)
  for i, (config, _) in enumerate(runs):
    assert together[i]['kernels'] == 'xla'
    alone = train.train_and_evaluate(config, str(tmp_path / f'alone{i}'))
    np.testing.assert_allclose(together[i]['test_loss'], alone['test_loss'], rtol=1e-4)


def test_a_sweep_shares_its_points_out_over_the_programs_it_runs_at_once(tmp_path, monkeypatch):
  """--vmap_points=0 (the default): as many points per program as share them out over
  --points_at_once programs, so no device idles while one program holds them all."""
  started = []
  monkeypatch.setattr(sweep, 'train_points',
                      lambda groups, sweep_dir, slots: started.append([len(g) for g in groups]))
  points = sweep.product(sweep.values('learning_rate', [1e-3, 2e-3, 3e-3]),
                         sweep.values('model.dropout', [0.0, 0.5]))
  for at_once, vmap_points, sizes in [(2, 0, [3, 3]), (4, 0, [2, 2, 2]), (1, 0, [6]),
                                      (1, 4, [4, 2]), (2, 1, [1] * 6)]:
    sweep.run(point_config({}), points, str(tmp_path / f'{at_once}-{vmap_points}'),
              points_at_once=at_once, vmap_points=vmap_points)
    assert started.pop() == sizes, (at_once, vmap_points)
