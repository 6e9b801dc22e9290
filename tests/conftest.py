"""Two fake CPU devices for every test: XLA_FLAGS must be set before jax is imported."""

import atexit
import hashlib
import os
import shutil
import sys
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=2').strip()
# The commands' compiled programs go to a directory of this session's (inherited by the
# commands the tests start), not to the user's ~/.cache/convnet/jax; removed at exit.
os.environ['CONVNET_CACHE'] = tempfile.mkdtemp(prefix='convnet-jax-cache-')
atexit.register(shutil.rmtree, os.environ['CONVNET_CACHE'], ignore_errors=True)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # So `configs` imports as a package from any working directory.

import jax  # noqa: E402
import pytest  # noqa: E402

from configs import default  # noqa: E402
from convnet import input_pipeline, workdir  # noqa: E402

MNIST_DIR = os.path.join(REPO, 'data', 'mnist')


@pytest.fixture(scope='session')
def mnist() -> input_pipeline.Dataset:
  return input_pipeline.load_dataset('idx', MNIST_DIR, 'mnist', 10)


@pytest.fixture
def smoke_config():
  """The real default config, shrunk to seconds (configs/default.py:smoke)."""
  return default.get_config('smoke')


def pytest_configure(config):
  if jax.default_backend() == 'cpu':  # On a GPU or TPU (the device check) it has its own.
    assert jax.local_device_count() == 2, 'XLA_FLAGS was set too late: jax saw one device'


def fingerprint(directory) -> dict[str, str]:
  """sha256 of every file under directory, by relative path: proof nothing was touched."""
  hashes = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        hashes[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return hashes


def metrics_without_timings(run_dir) -> list[dict]:
  """A run's metrics.jsonl records without their wall-clock fields: what repeats exactly."""
  return [{k: v for k, v in r.items() if k not in ('images_per_s', 'time_s', 'train_time_s')}
          for r in workdir.read_jsonl(os.path.join(run_dir, 'metrics.jsonl'))]


def main_command(workdir, *overrides, config='configs/default.py:smoke') -> list[str]:
  """`python -m convnet.main` as a user types it (run it with cwd=REPO)."""
  return [sys.executable, '-m', 'convnet.main', '--config', config, '--workdir', str(workdir),
          *overrides]
