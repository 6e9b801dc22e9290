"""The device check: convnet on the accelerator at hand (or the CPU), in one command.

    scripts/device_check.sh OUTDIR [--smoke]

Each step runs in a process of its own, so a step that fails, crashes or hangs costs
no other, and OUTDIR/device_check.json is rewritten after each one: `backend`,
`device_kind`, `versions` and `steps: {name: {figures...} | {"error": ...}}`, with each
step's output in OUTDIR/STEP.log. The steps:

  tests             the tests that mean something on this backend: the library ops
                    against NumPy windows, 'auto' picking them, a faked-then-real GPU run,
                    sweep points vmapped in one program
  train_default     configs/default.py as shipped ('auto' kernels) to its test accuracy
  benchmark_*       convnet.benchmark's images/s for default and keras_convnet (PyTorch
                    on the same device when importable)
  time_to_accuracy  convnet.benchmark --mode=time_to_accuracy with configs/fast.py
  sweep             experiments/filters_kernel.py (20 points, one epoch each), wall time,
                    with the sweep's default points at once (one per device)
  sweep_4_at_once   the same with 4 points at once (several per device on one GPU)
  sweep_vmapped     experiments/learning_rate.py (6 points that change no shape, one
                    epoch each), wall time: one vmapped program on GPU and TPU

It needs no network: it runs on the machine's own jax, flax, optax, orbax-checkpoint and
chex, and installs the rest of what convnet imports, where missing, from the wheels in
.wheels/ (see scripts/device_check.sh). `--smoke` runs every step tiny, on any machine.
"""

import argparse
import datetime
import glob
import importlib.util
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from typing import Callable, NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = os.path.join(REPO, '.wheels')
# What convnet imports beyond the machine's jax stack: module -> distribution (its wheel).
FROM_WHEELS = {'ml_collections': 'ml-collections', 'tensorboardX': 'tensorboardX',
               'absl': 'absl-py', 'matplotlib': 'matplotlib', 'PIL': 'pillow', 'tqdm': 'tqdm'}
VERSIONS = ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda13-plugin', 'libtpu', 'flax', 'optax',
            'orbax-checkpoint', 'chex', 'numpy', 'ml-collections', 'torch')
# Printed as JSON by a process of its own: the parent never initialises an accelerator.
ENVIRONMENT = f"""
import importlib.metadata, json, platform, jax
from convnet import ops
def version(name):
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None
versions = {{name: version(name) for name in {VERSIONS!r}}}
print(json.dumps({{'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
                  'num_devices': jax.local_device_count(), 'auto_kernels': ops.resolve('auto'),
                  'versions': {{'python': platform.python_version(),
                               **{{k: v for k, v in versions.items() if v}}}}}}))
"""


class Step(NamedTuple):
  """A command and how to read its figures from OUTDIR once it has run."""
  command: Callable[[str, bool], list[str]]  # (outdir, smoke) -> argv, run in the repository
  figures: Callable[[str], dict]  # outdir -> figures; raises if the step left none
  share: float  # Of the time budget, at most.
  env: tuple[tuple[str, str], ...] = ()


def read_json(path: str):
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def test_figures(out: str) -> dict:
  suite = ET.parse(os.path.join(out, 'tests.xml')).getroot().find('testsuite')
  failed = [f'{case.get("classname")}::{case.get("name")}' for case in suite.iter('testcase')
            if case.find('failure') is not None or case.find('error') is not None]
  counts = {key: int(suite.get(key)) for key in ('tests', 'failures', 'errors', 'skipped')}
  return {**counts, 'failed': failed[:10]}


def train_figures(out: str) -> dict:
  results = read_json(os.path.join(out, 'default', 'results.json'))
  return {key: results[key] for key in (
      'test_accuracy', 'num_epochs', 'kernels', 'train_images_per_s', 'train_time_s',
      'compile_time_s', 'wall_time_s', 'device_kind')}


def benchmark_figures(name: str) -> Callable[[str], dict]:
  def figures(out: str) -> dict:
    result = read_json(os.path.join(out, f'benchmark_{name}.json'))
    rates = result['train_images_per_s']
    peers = {peer: ({'images_per_s': info['median'], 'convnet_ratio': info['convnet_ratio']}
                    if 'median' in info else info) for peer, info in result['peers'].items()}
    other = next(k for k in result if k.startswith('train_images_per_s_'))
    return {'images_per_s': rates['median'], 'images_per_s_min_max': [rates['min'], rates['max']],
            other.replace('train_', ''): result[other]['median'], 'kernels': result['ops'],
            'compile_s': result['compile_s'], 'eval_images_per_s': result['eval_images_per_s'],
            'percent_of_matmul_peak': result['percent_of_matmul_peak'], 'peers': peers}
  return figures


def sweep_figures(name: str) -> Callable[[str], dict]:
  def figures(out: str) -> dict:
    points = [read_json(path) for path in glob.glob(os.path.join(out, name, '*',
                                                                 'results.json'))]
    if not points:
      raise ValueError('no point finished')
    return {'points': len(points),
            'best_test_accuracy': max(p['test_accuracy'] for p in points),
            'train_s': sum(p['train_time_s'] for p in points),
            'compile_s': sum(p['compile_time_s'] for p in points)}
  return figures


def sweep_step(name: str, share: float, experiment: str = 'filters_kernel',
               points_at_once: int = 0, smoke_workers: int = 20) -> Step:
  """An experiment's sweep, one epoch a point (smoke: worker 0 of smoke_workers, on 512
  images)."""
  return Step(
      lambda out, smoke: [
          PYTHON, '-m', 'convnet.sweep', '--config', f'experiments/{experiment}.py',
          '--workdir', os.path.join(out, name), '--config.num_epochs=1',
          *([f'--points_at_once={points_at_once}'] if points_at_once else []),
          *([*SMOKE_DATA, f'--num_workers={smoke_workers}', '--worker_index=0'] if smoke
            else [])],
      sweep_figures(name), share)


PYTHON = sys.executable
SMOKE_DATA = ['--config.data.num_train=512']
STEPS = {
    # Full float32 precision for the comparisons with NumPy: on Ampere and later GPUs,
    # XLA's default precision multiplies float32 in TF32.
    'tests': Step(
        lambda out, smoke: [PYTHON, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                            f'--junitxml={os.path.join(out, "tests.xml")}', 'tests/test_ops.py',
                            *(['-k', 'auto_picks or vmapped'] if smoke else [
                                'tests/test_models.py', 'tests/test_train.py::test_what_auto_runs_on_a_gpu_'
                                'trains_seeds_batchnorm_and_shifted_images[1]',
                                'tests/test_vmapped_points.py::test_points_vmapped_on_the_library_'
                                'ops_equal_each_alone'])],
        test_figures, 0.25, (('JAX_DEFAULT_MATMUL_PRECISION', 'highest'),)),
    'train_default': Step(
        lambda out, smoke: [PYTHON, '-m', 'convnet.main', '--config',
                            'configs/default.py' + (':smoke' if smoke else ''),
                            '--workdir', os.path.join(out, 'default'),
                            *(SMOKE_DATA if smoke else [])],
        train_figures, 0.15),
    **{f'benchmark_{name}': Step(
        lambda out, smoke, name=name: [
            PYTHON, '-m', 'convnet.benchmark', '--config', f'configs/{name}.py',
            '--json', os.path.join(out, f'benchmark_{name}.json'),
            *(['--steps=2', '--repeats=1', '--peers=false', *SMOKE_DATA] if smoke
              else ['--repeats=5'])],
        benchmark_figures(name), 0.12) for name in ('default', 'keras_convnet')},
    'time_to_accuracy': Step(
        lambda out, smoke: [PYTHON, '-m', 'convnet.benchmark', '--mode=time_to_accuracy',
                            '--config', 'configs/fast.py',
                            '--json', os.path.join(out, 'time_to_accuracy.json'),
                            *(['--config.num_epochs=1', '--target=0.2', *SMOKE_DATA]
                              if smoke else [])],
        lambda out: read_json(os.path.join(out, 'time_to_accuracy.json')), 0.12),
    'sweep': sweep_step('sweep', 0.25),
    'sweep_4_at_once': sweep_step('sweep_4_at_once', 0.2, points_at_once=4),
    'sweep_vmapped': sweep_step('sweep_vmapped', 0.1, experiment='learning_rate',
                                smoke_workers=3),
}


def run_step(name: str, step: Step, out: str, smoke: bool, timeout: float) -> dict:
  """{figures..., 'seconds'} or {..., 'error'}: a failed step is recorded, never raised."""
  log_path = os.path.join(out, f'{name}.log')
  start = time.time()
  try:
    with open(log_path, 'w', encoding='utf-8') as log:
      # A compilation cache of the step's own: no compile time is another step's cache hit.
      env = {**os.environ, 'CONVNET_CACHE': os.path.join(out, 'jax_cache', name),
             **dict(step.env)}
      returncode = subprocess.run(step.command(out, smoke), cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
  except subprocess.TimeoutExpired:
    returncode = f'timed out after {timeout:.0f} s'
  except OSError as e:
    returncode = f'could not start: {e}'
  result = {'seconds': round(time.time() - start, 1)}
  try:
    result.update(step.figures(out))
  except (OSError, ValueError, KeyError, StopIteration, AttributeError) as e:
    if returncode == 0:
      returncode = f'it left no figures ({type(e).__name__}: {e})'
  if returncode != 0:
    with open(log_path, encoding='utf-8', errors='replace') as log:
      last = [line.strip() for line in log if line.strip()][-1:]
    how = f'exit code {returncode}' if isinstance(returncode, int) else returncode
    result['error'] = f'{how}; {name}.log ends: {last[0] if last else "(empty)"}'
  return result


def environment(out: str) -> dict:
  """Backend, device kind and versions, from a process of its own."""
  done = subprocess.run([PYTHON, '-c', ENVIRONMENT], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  with open(os.path.join(out, 'environment.log'), 'w', encoding='utf-8') as log:
    log.write(done.stdout + done.stderr)
  if done.returncode:
    return {'environment_error': (done.stderr.strip().splitlines() or ['(no output)'])[-1]}
  return json.loads(done.stdout.strip().splitlines()[-1])


def install_missing() -> list[str]:
  """pip-installs from .wheels/ what convnet imports and this machine lacks (offline)."""
  missing = [dist for module, dist in FROM_WHEELS.items()
             if importlib.util.find_spec(module) is None]
  if missing:
    done = subprocess.run([PYTHON, '-m', 'pip', 'install', '--quiet', '--no-index',
                           '--find-links', WHEELS, *missing], capture_output=True, text=True)
    if done.returncode:
      sys.exit(f'error: {", ".join(missing)} not installed and not installable from {WHEELS} '
               f'({(done.stderr.strip().splitlines() or ["?"])[-1]}); fill it as '
               'scripts/device_check.sh says')
  return missing


def summary(value) -> str:
  """A figure as the table shows it."""
  if isinstance(value, float):
    return f'{value:,.4g}' if abs(value) < 1e4 else f'{value:,.0f}'
  if isinstance(value, dict):
    return '{' + ', '.join(f'{k}: {summary(v)}' for k, v in value.items()) + '}'
  if isinstance(value, list):
    return '[' + ', '.join(summary(v) for v in value[:6]) + (', ...' if len(value) > 6 else '') + ']'
  return str(value)


def table(report: dict) -> str:
  """The report as a markdown table: one row per step."""
  rows = [f'device check: {report.get("device_kind", "?")} ({report.get("backend", "?")}), '
          f'jax {report.get("versions", {}).get("jax", "?")}, {report["date_utc"]} UTC'
          + (' [smoke]' if report['smoke'] else ''), '',
          '| step | s | result |', '|---|---|---|']
  for name, result in report['steps'].items():
    figures = {k: v for k, v in result.items() if k not in ('seconds', 'error')}
    text = f'**error**: {result["error"]} ' if 'error' in result else ''
    rows.append(f'| {name} | {result["seconds"]:.0f} | {text}'
                + '; '.join(f'{k} {summary(v)}' for k, v in figures.items()) + ' |')
  return '\n'.join(rows)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('outdir', help='a new or empty directory for the report and logs')
  parser.add_argument('--smoke', action='store_true', help='every step tiny (CPU: ~2 min)')
  parser.add_argument('--budget_s', type=float, default=None,
                      help='time for all steps (default: 460; smoke 600, as its steps share a '
                           'CPU with whatever else runs, such as the test suite); each step '
                           'may take its share of it, at most what is left, before it is '
                           'stopped')
  args = parser.parse_args(argv)
  out = os.path.abspath(args.outdir)
  if os.path.exists(out) and os.listdir(out):
    sys.exit(f'error: {out} is not empty: the device check writes into a new directory')
  budget = args.budget_s or (600 if args.smoke else 460)
  installed = install_missing()
  os.makedirs(out, exist_ok=True)
  start = time.time()
  report = {'date_utc': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M'),
            'smoke': args.smoke, 'installed_from_wheels': installed, **environment(out),
            'steps': {}}
  path = os.path.join(out, 'device_check.json')
  for name, step in STEPS.items():
    left = budget - (time.time() - start)
    print(f'== {name} ...', flush=True)
    report['steps'][name] = run_step(name, step, out, args.smoke,
                                     timeout=max(min(step.share * budget, left), 10))
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=1)
  report['total_s'] = round(time.time() - start, 1)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1)
  print(table(report))
  print(f'written: {path}')
  return int(any('error' in result for result in report['steps'].values()))


if __name__ == '__main__':
  sys.exit(main())
