"""The benchmark command in smoke mode (it runs, prints its table, writes every field), how
it times its trainers, and its peers (tf.keras, PyTorch) training the same model."""

import glob
import importlib
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import default
from conftest import REPO
from convnet import benchmark, config_lib, models, peers, train


def run_benchmark(*flags, timeout=600, env=None):
  return subprocess.run([sys.executable, '-m', 'convnet.benchmark', *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})


def test_benchmark_smoke_mode_writes_its_json_with_every_field(tmp_path):
  out = tmp_path / 'bench.json'
  proc = run_benchmark('--config', 'configs/default.py:smoke', '--steps=2', '--repeats=2',
                       '--peers=false', f'--json={out}')
  assert proc.returncode == 0, proc.stderr
  result = json.loads(out.read_text())
  for key in ('train_images_per_s', 'train_images_per_s_jit'):
    rates = result[key]
    assert len(rates['all']) == 2 and 0 < rates['min'] <= rates['median'] <= rates['max']
  assert result['parallel'] == 'pmap' and result['num_devices'] == 2  # conftest's 2 devices
  assert result['compile_s'] > 0 and result['eval_images_per_s'] > 0
  assert 100 < result['peak_rss_mb'] < 4000 and result['matmul_peak_gflops'] > 1
  assert result['keep_freed_memory'] is True  # glibc here, as the trainer sets it
  # The lesson model's forward pass is 2 * (28*28*9*32 + 6272*128 + 128*10) FLOPs per
  # image; training (forward + two backward products) is about three times that.
  forward = 2 * (28 * 28 * 9 * 32 + 14 * 14 * 32 * 128 + 128 * 10)
  assert 2.5 * forward < result['flops_per_image'] < 3.5 * forward
  assert abs(result['achieved_gflops'] - result['flops_per_image'] *
             result['train_images_per_s']['median'] / 1e9) < 1e-6
  assert abs(result['percent_of_matmul_peak'] - 100 * result['achieved_gflops'] /
             result['matmul_peak_gflops']) < 1e-6
  assert result['peers'] == {'tf.keras': {'skipped': '--peers=false'},
                             'pytorch': {'skipped': '--peers=false'}}
  assert {'cpu', 'cores', 'jax', 'device_kind', 'python'} <= set(result['machine'])
  assert 'train images/s' in proc.stdout and 'skipped: --peers=false' in proc.stdout
  assert result['config'] == 'configs/default.py:smoke' and result['ops'] == 'cpu'
  assert len(result['date_utc']) == 16 and result['commit']
  # The table mode prints it as one row under the header.
  table = run_benchmark('--mode=table', f'--table_from={tmp_path}', timeout=120)
  assert table.returncode == 0, table.stderr
  cpu, _, header, rule, row = table.stdout.strip().splitlines()
  assert cpu == f'**{result["machine"]["cpu"]}**'  # One table per CPU.
  assert row == benchmark.markdown_table([str(out)]).splitlines()[4]
  assert row.startswith('| `configs/default.py:smoke` |') and '| cpu | 2 |' in row


def test_the_table_in_docs_is_generated_from_the_committed_benchmark_json():
  docs = os.path.join(REPO, 'docs')
  text = open(os.path.join(docs, 'performance.md'), encoding='utf-8').read()
  table = text.split('<!-- benchmark-table:begin -->\n')[1].split('<!-- benchmark-table:end -->')[0]
  paths = sorted(glob.glob(os.path.join(docs, 'benchmarks', '*.json')))
  assert len(paths) >= 2  # keras_convnet and the lesson model at least
  assert table.strip() == benchmark.markdown_table(paths), (
      'docs/performance.md is stale: paste `python -m convnet.benchmark --mode=table`')


def test_time_to_accuracy_reports_the_first_epoch_at_the_target(tmp_path):
  """And with --compilation_cache, a second run loads the first one's programs."""
  results = []
  for run in ('cold', 'warm'):
    out = tmp_path / f'{run}.json'
    proc = run_benchmark('--mode=time_to_accuracy', '--config', 'configs/default.py:smoke',
                         '--config.num_epochs=2', '--target=0.5', f'--json={out}',
                         '--compilation_cache', env={'CONVNET_CACHE': str(tmp_path / 'cache')})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result['reached'] and result['epoch'] == 1  # > 85% after one smoke epoch
    assert result['seconds'] == result['seconds_by_epoch'][0] > 0
    parts = ('start_up_s', 'compile_s', 'train_s', 'other_s')
    assert all(result[k] > 0 for k in parts)
    assert abs(sum(result[k] for k in parts) - result['seconds']) < 1e-6
    assert len(result['accuracy_by_epoch']) == 2 and result['accuracy_by_epoch'][0] >= 0.5
    assert '50.0% test accuracy:' in proc.stdout
    assert result['seed'] == 0 and result['machine']['cores'] == os.cpu_count()  # Provenance,
    assert result['config'].startswith('configs/default.py') and 'commit' in result  # as train's.
    assert result['compilation_cache'] == str(tmp_path / 'cache') in proc.stdout
    results.append(result)
  assert os.listdir(tmp_path / 'cache')
  assert results[1]['compile_s'] < results[0]['compile_s']
  assert results[1]['accuracy_by_epoch'] == results[0]['accuracy_by_epoch']


def test_benchmark_rejects_an_unknown_mode_and_counts_out_of_range():
  proc = run_benchmark('--mode=fastest', timeout=120)
  assert proc.returncode != 0 and '--mode=fastest' in proc.stderr
  # Zero steps or rounds would print 0 images/s (or fail in min()) after compiling.
  for flag in ('--cpu_devices=-1', '--steps=0', '--repeats=0'):
    proc = run_benchmark(flag, timeout=120)
    assert proc.returncode != 0 and flag.split('=')[0] in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_interleave_runs_every_trainer_once_per_round():
  calls = []
  runs = {name: (lambda name=name: calls.append(name) or float(len(calls)))
          for name in ('convnet', 'jit', 'tf.keras')}
  rates = benchmark.interleave(runs, repeats=3)
  assert calls == ['convnet', 'jit', 'tf.keras'] * 3
  assert rates['jit'] == {'min': 2.0, 'median': 5.0, 'max': 8.0, 'all': [2.0, 5.0, 8.0]}


def test_ratio_per_round_pairs_timings_of_the_same_round():
  # Per round convnet is 2x, 1.5x and 4x the peer; the medians alone (30 / 10) say 3x.
  ours, theirs = {'all': [20.0, 30.0, 40.0]}, {'all': [10.0, 20.0, 10.0]}
  assert benchmark.ratio_per_round(ours, theirs) == 2.0


def test_peers_skip_a_model_they_do_not_build():
  config = default.get_config()
  config.model.norm = ('batch',)
  assert peers.trainers(config_lib.read(config), data=None, steps=1) == (
      {}, {name: "peers do not build model.norm='batch'" for name in peers.NAMES})


def test_peers_train_on_the_trainers_float32_normalised_images(mnist):
  """Float64 inputs stopped PyTorch's peer ('Input type (double) and bias type (float)')."""
  images, labels = peers._inputs(mnist, 16)  # pylint: disable=protected-access
  assert images.dtype == np.float32 and images.flags.writeable and labels.dtype == np.int64
  want = (mnist.train.images[:16].astype(np.float64) / 255 - mnist.mean) / mnist.std
  np.testing.assert_allclose(images, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(labels, mnist.train.labels[:16])


@pytest.mark.parametrize('jax_backend,cuda,device', [('gpu', True, 'cuda'), ('gpu', False, 'cpu'),
                                                     ('cpu', True, 'cpu'), ('tpu', True, 'cpu')])
def test_pytorch_trains_on_the_gpu_only_when_jax_does(jax_backend, cuda, device):
  assert peers.torch_device(jax_backend, cuda) == device


def test_peak_rss_is_the_benchmark_process_own_not_its_parent():
  ballast = np.ones(2 * 2**30 // 8)  # 2 GB in this (parent) process.
  code = 'from convnet import benchmark; print(benchmark.peak_rss_mb())'
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                        text=True, timeout=120, check=True)
  assert float(proc.stdout) < 1000 < ballast.nbytes / 2**20


@pytest.mark.parametrize('name', ['keras_convnet', 'default'])
def test_each_peer_builds_the_same_model_and_trains_it(mnist, name):
  """tf.keras and PyTorch (a CPU build; `make test` installs both) build the config's
  model with our parameter count, and each times a few real training steps."""
  spec = config_lib.read(importlib.import_module(f'configs.{name}').get_config())
  runs, skipped = peers.trainers(spec, mnist, steps=3)
  assert skipped == {} and sorted(runs) == sorted(peers.NAMES)
  for peer, repeat in runs.items():
    assert repeat() > 0, peer
  model = train.build_model(spec.model, axis_name=None)
  ours = models.count_params(model.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32),
                                        train=False)['params'])
  assert peers.keras_model(spec).count_params() == ours
  assert sum(p.numel() for p in peers.torch_model(spec).parameters()) == ours


def test_the_keras_peer_times_fits_steps_and_not_its_teardown(mnist, monkeypatch):
  """fit's teardown (of tf.data's autotuning) sometimes waits for a fixed time whatever
  the training took; a slow teardown, made here by a sleep after fit, is left out."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  spec = config_lib.read(default.get_config())
  repeat = peers.keras_trainer(spec, mnist, steps=3)
  fit = tf.keras.Model.fit
  monkeypatch.setattr(tf.keras.Model, 'fit',
                      lambda self, *args, **kwargs: (fit(self, *args, **kwargs), time.sleep(2))[0])
  start = time.perf_counter()
  rate = repeat()
  whole_call = time.perf_counter() - start
  assert whole_call > 2
  # The images over the rate: the timed span, which the 2-s teardown is not part of.
  assert 3 * spec.batch_size / rate < whole_call - 2
