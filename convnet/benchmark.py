"""Benchmarks, run as commands (never as timed tests).

    python -m convnet.benchmark --config configs/keras_convnet.py [--cpu_devices=2] [--json=F]
    python -m convnet.benchmark --mode=seeds --config configs/default.py --num_seeds=2 \
        [--config.num_epochs=1]
    python -m convnet.benchmark --mode=table [--table_from=docs/benchmarks]

`train` (the default): the real trainer's compiled chunk of steps on device-resident
MNIST, timed over repeats: compile time, training images/s (min/median/max),
evaluation images/s over the 10,000 test images, peak RSS, XLA's FLOPs per
training image, the GFLOP/s that makes and its share of the GFLOP/s of 1024x1024
f32 matmuls on the same devices (their best round, timed in turn with the trainers).
With the `[bench]` extra installed, the same model on the same data and batch size is
also trained with tf.keras (`fit`, from its first step to its last) and PyTorch (a
plain loop), and the ratios are printed. The trainers take turns, one repeat each per
round, so that all of them see the same machine; convnet/peer is the median of the
rounds' ratios.

`time_to_accuracy`: trains the config once and reports the wall time from the start
(compile included) to the first epoch whose test accuracy reaches --target, split into
start-up, compile, training, and the rest (data, initialisation, evaluation,
checkpoints). The compilation cache is not used (the compile is timed afresh) unless
--compilation_cache says so: then, as convnet.main does, a second run times a rerun.

`table`: prints the markdown table of the benchmark JSON files in --table_from (the
current table of docs/performance.md is this command's output).

`seeds`: trains num_seeds seeds of one config as one compiled program (vmapped,
config.num_seeds) and then one after another (num_seeds runs with config.num_seeds=1),
and prints the wall, training and compile times of both and the speed-up.
"""

import time

PROCESS_START = time.time()  # For time_to_accuracy: the clock starts before the imports.

import datetime  # pylint: disable=wrong-import-position
import functools
import glob
import os
import platform
import resource
import subprocess
import sys
import tempfile

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from convnet import config_lib, ops, parallel, peers, train, workdir
from convnet.cpu import memory


def matmul_gflops(devices, n: int = 1024, repeats: int = 20) -> float:
  """The best GFLOP/s of n x n float32 matmuls on all `devices` at once: the
  practical peak of the cores those devices share out."""
  a = jax.random.normal(jax.random.key(0), (len(devices), n, n))
  matmul = jax.pmap(lambda x: x @ x, devices=devices)
  matmul(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()  # Blocking each time: no pile-up on forced CPU devices.
    best = min(best, time.perf_counter() - start)
  return len(devices) * 2 * n ** 3 / best / 1e9


def training_timer(spec: config_lib.Spec, data, steps: int) -> dict:
  """The trainer's own compiled chunk of `steps` steps, parallelised as spec.parallel
  says: its compile time, evaluation images/s, XLA's FLOPs per training image, and
  `repeat`, which runs the chunk once more and returns its training images/s."""
  devices, _ = parallel.participating_devices(spec.num_devices)
  steps_per_epoch = train.check_data(spec, data)
  _, _, state, data_keys, dropout_keys = train.init_run(spec, data.train.images.shape[1:],
                                                        steps_per_epoch)
  flops = train.training_flops_per_image(
      spec.model, train.first_seed(state), data.train.images.shape[1:])
  state, data_keys, dropout_keys = jax.device_put((state, data_keys, dropout_keys),
                                                  parallel.replicated(devices))
  images, labels = (parallel.replicate(x, devices) for x in data.train)
  perms = jax.device_put(train.epoch_permutations(data_keys, 0, len(data.train.labels)),
                         parallel.replicated(devices))
  start = time.perf_counter()
  chunk = parallel.compile_now(train.parallel_train_chunk(
      steps, steps_per_epoch, spec.batch_size, data.mean, data.std, devices,
      how=spec.parallel, micro_batch_size=spec.micro_batch_size,
      augment=(spec.data.augment, spec.data.augment_pixels),
      label_smoothing=spec.label_smoothing),
      state, images, labels, perms, dropout_keys, {})
  compile_s = time.perf_counter() - start
  state, _ = chunk(state, images, labels, perms, dropout_keys, {})  # Warm-up.
  jax.block_until_ready(state)
  test = [parallel.put_on_devices(x, devices) for x in
          train.shard_for_eval(data.test, spec.eval_batch_size, len(devices))]
  evaluate = parallel.compile_now(train.parallel_evaluate(data.mean, data.std, devices,
                                                          spec.parallel), state, *test)
  jax.block_until_ready(evaluate(state, *test))
  start = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(evaluate(state, *test))
  eval_rate = 3 * len(data.test.labels) * spec.num_seeds / (time.perf_counter() - start)

  def repeat() -> float:
    nonlocal state
    start = time.perf_counter()
    state, metrics = chunk(state, images, labels, perms, dropout_keys, {})
    jax.device_get(metrics)
    return steps * spec.batch_size * spec.num_seeds / (time.perf_counter() - start)
  return {'compile_s': compile_s, 'eval_images_per_s': eval_rate, 'flops_per_image': flops,
          'num_devices': len(devices), 'repeat': repeat}


def interleave(runs: dict, repeats: int) -> dict:
  """{name: min/median/max/all images/s}, running each of `runs` once per round, so all
  of them share the machine's slow and fast phases (a shared VM drifts
  within minutes, which made the ratios of one-after-another timings wander)."""
  rates = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      rates[name].append(run())
  return {name: summary(r) for name, r in rates.items()}


def summary(rates: list[float]) -> dict:
  """min / median / max of a list of images/s, and all of it in round order."""
  return {'min': min(rates), 'median': float(np.median(rates)), 'max': max(rates),
          'all': list(rates)}


def ratio_per_round(ours: dict, theirs: dict) -> float:
  """The median over rounds of ours / theirs in the same round: timings seconds apart,
  so the machine's drift between rounds cancels (a ratio of two medians can pair a
  fast phase of one trainer with a slow phase of the other)."""
  return float(np.median(np.divide(ours['all'], theirs['all'])))


def run_benchmark(config, steps: int, repeats: int, with_peers: bool) -> dict:
  """The `train` mode: config.parallel's timings, the other parallel form's training
  images/s, the peers', the matmul peak and the machine."""
  spec = train.validate(config)
  data = train.load_data(spec)
  result = training_timer(spec, data, steps)
  other = config.copy_and_resolve_references()
  other.parallel = 'jit' if config.parallel == 'pmap' else 'pmap'
  runs = {'convnet': result.pop('repeat'),
          other.parallel: training_timer(train.validate(other), data, steps)['repeat']}
  peer_runs, skipped = (peers.trainers(spec, data, steps) if with_peers else
                        ({}, {name: '--peers=false' for name in peers.NAMES}))
  # The peak is measured in every round too, its best kept: once, it can fall in a slow phase.
  peak = functools.partial(matmul_gflops, parallel.participating_devices(spec.num_devices)[0],
                           repeats=5)
  rates = interleave({**runs, **peer_runs, 'matmul': peak}, repeats)
  result['parallel'] = spec.parallel
  result['train_images_per_s'] = rates['convnet']
  result['train_images_per_s_' + other.parallel] = rates[other.parallel]
  result['matmul_peak_gflops'] = rates['matmul']['max']
  result['achieved_gflops'] = result['flops_per_image'] * result['train_images_per_s'][
      'median'] / 1e9
  result['percent_of_matmul_peak'] = 100 * result['achieved_gflops'] / result[
      'matmul_peak_gflops']
  result['peers'] = {
      name: {**rates[name], 'convnet_ratio': ratio_per_round(rates['convnet'], rates[name])}
      if name in rates else {'skipped': skipped[name]} for name in peers.NAMES}
  if with_peers and 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    result['peers_note'] = ('XLA_FLAGS forces several CPU devices in this process and '
                            'TensorFlow reads it too (its fit runs slower so); '
                            'compare with peers timed in a 1-device run')
  result['peak_rss_mb'] = peak_rss_mb()
  result['machine'] = machine()
  return result


def machine() -> dict:
  return {'cpu': cpu_model() or platform.processor() or platform.machine(),
          'cores': os.cpu_count(), 'jax': jax.__version__,
          'device_kind': jax.devices()[0].device_kind, 'python': platform.python_version()}


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo ('' where there is none): speeds here are
  only comparable on the same model."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as cpuinfo:
      for line in cpuinfo:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return ''


def peak_rss_mb() -> float:
  """This process's peak resident memory: /proc's VmHWM where there is one, since
  ru_maxrss also counts the peak of the parent that started the process (fork + exec:
  a benchmark run from a 10 GB test session reported 10 GB)."""
  try:
    with open('/proc/self/status', encoding='ascii') as status:
      for line in status:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_benchmark(name: str, result: dict) -> None:
  rates = result['train_images_per_s']
  print(f'{name}: {result["num_devices"]} device(s), compile {result["compile_s"]:.1f} s')
  print(f'  train images/s   min {rates["min"]:,.0f}  median {rates["median"]:,.0f}  max '
        f'{rates["max"]:,.0f}  (parallel={result["parallel"]})')
  for how in ('pmap', 'jit'):
    if 'train_images_per_s_' + how in result:
      other = result['train_images_per_s_' + how]
      print(f'  parallel={how:<5}   min {other["min"]:,.0f}  median {other["median"]:,.0f}  max '
            f'{other["max"]:,.0f}')
  print(f'  eval images/s    {result["eval_images_per_s"]:,.0f}')
  print(f'  FLOPs/train image {result["flops_per_image"] / 1e6:.1f} M -> '
        f'{result["achieved_gflops"]:.1f} GFLOP/s = {result["percent_of_matmul_peak"]:.0f}% of '
        f'the {result["matmul_peak_gflops"]:.0f} GFLOP/s of 1024x1024 matmuls')
  print(f'  peak RSS         {result["peak_rss_mb"]:,.0f} MB (malloc keeps freed memory: '
        f'{result.get("keep_freed_memory", False)})')
  for peer, info in result['peers'].items():
    if 'skipped' in info:
      print(f'  {peer:<16} skipped: {info["skipped"]}')
    else:
      print(f'  {peer:<16} median {info["median"]:,.0f} images/s; convnet/{peer} = '
            f'{info["convnet_ratio"]:.2f} (median of the rounds\' ratios; '
            f'{rates["median"] / info["median"]:.2f} from the medians)')
  if 'peers_note' in result:
    print(f'  note: {result["peers_note"]}')


def provenance(config_file: str, config) -> dict:
  """What a benchmark JSON needs to stand on its own in a table: which config, kernels,
  commit and time."""
  try:
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                            text=True, check=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = ''
  return {'config': config_file, 'ops': ops.resolve(config.model.ops),
          'commit': commit,
          'date_utc': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M')}


TABLE_HEADER = ('| config | run (UTC) | commit | kernels | devices | convnet train '
                'images/s, median (min-max) | tf.keras | PyTorch | convnet / tf.keras | '
                'convnet / PyTorch | % of matmul peak | eval images/s |\n' + '|---' * 12 + '|')


def markdown_table(paths: list[str]) -> str:
  """One table per CPU (lscpu's model name: speeds compare only on one) of benchmark JSON
  files (`--json`), a row each, in the order given."""
  runs = [workdir.read_json(path) for path in paths]
  tables = []
  for cpu in dict.fromkeys(r['machine']['cpu'] for r in runs):
    rows = [f'**{cpu}**', '', TABLE_HEADER]
    for r in (r for r in runs if r['machine']['cpu'] == cpu):
      rates, peers_ = r['train_images_per_s'], r['peers']
      peer = lambda name, key: (f'{peers_[name][key]:,.{2 if key == "convnet_ratio" else 0}f}'
                                if key in peers_.get(name, {}) else '')
      rows.append(
          f'| `{r["config"]}` | {r["date_utc"]} | {r["commit"]} | {r["ops"]} | '
          f'{r["num_devices"]} | **{rates["median"]:,.0f}** ({rates["min"]:,.0f}-'
          f'{rates["max"]:,.0f}) | {peer("tf.keras", "median")} | {peer("pytorch", "median")} | '
          f'{peer("tf.keras", "convnet_ratio")} | {peer("pytorch", "convnet_ratio")} | '
          f'{r["percent_of_matmul_peak"]:.0f}% of {r["matmul_peak_gflops"]:.0f} GFLOP/s | '
          f'{r["eval_images_per_s"]:,.0f} |')
    tables.append('\n'.join(rows))
  return '\n\n'.join(tables)


def timed_run(config, run_dir: str) -> dict:
  start = time.time()
  results = train.train_and_evaluate(config, run_dir)
  return {'wall_s': time.time() - start, 'train_s': results['train_time_s'],
          'compile_s': results['compile_time_s'],
          'test_accuracy_per_seed': results.get('test_accuracy_per_seed',
                                                [results['test_accuracy']])}


def compare_seeds(config, num_seeds: int) -> dict:
  """Wall/train/compile times of num_seeds seeds vmapped in one program vs one by one."""
  with tempfile.TemporaryDirectory() as tmp:
    together = config.copy_and_resolve_references()
    together.num_seeds = num_seeds
    vmapped = timed_run(together, os.path.join(tmp, 'together'))
    runs = []
    for i in range(num_seeds):
      alone = config.copy_and_resolve_references()
      alone.num_seeds, alone.seed = 1, config.seed + i
      runs.append(timed_run(alone, os.path.join(tmp, f'seed{alone.seed}')))
  sequential = {key: sum(r[key] for r in runs) for key in ('wall_s', 'train_s', 'compile_s')}
  sequential['test_accuracy_per_seed'] = [r['test_accuracy_per_seed'][0] for r in runs]
  return {'num_seeds': num_seeds, 'vmapped': vmapped, 'sequential': sequential,
          'wall_speedup': sequential['wall_s'] / vmapped['wall_s'],
          'train_speedup': sequential['train_s'] / vmapped['train_s']}


def time_to_accuracy(config, target: float) -> dict:
  """Wall time from the process's start (imports, data, compile included) to the end of
  the first epoch whose test accuracy reaches `target`."""
  with tempfile.TemporaryDirectory() as tmp:
    before_run = time.time() - PROCESS_START  # Imports and flag parsing, already spent.
    results = train.train_and_evaluate(config, tmp)
    tests = [r for r in workdir.read_jsonl(os.path.join(tmp, 'metrics.jsonl'))
             if 'test_accuracy' in r]
  reached = next((r for r in tests if r['test_accuracy'] >= target), None)
  seconds, parts = None, {}
  if reached:
    seconds = before_run + reached['time_s']
    parts = {'start_up_s': before_run, 'compile_s': results['compile_time_s'],
             'train_s': reached['train_time_s']}
    parts['other_s'] = seconds - sum(parts.values())  # Data, init, evaluation, checkpoints.
  return {'target': target, 'reached': reached is not None, 'seconds': seconds, **parts,
          'epoch': reached['epoch'] if reached else None,
          'accuracy_by_epoch': [r['test_accuracy'] for r in tests],
          'seconds_by_epoch': [before_run + r['time_s'] for r in tests]}


def print_seeds(result: dict) -> None:
  print(f'{result["num_seeds"]} seeds          wall s   train s   compile s   test accuracy')
  for name in ('vmapped', 'sequential'):
    r = result[name]
    accuracy = ', '.join(f'{100 * a:.2f}' for a in r['test_accuracy_per_seed'])
    print(f'{name:<16} {r["wall_s"]:7.1f} {r["train_s"]:9.1f} {r["compile_s"]:11.1f}   {accuracy}')
  print(f'vmapped is {result["wall_speedup"]:.2f}x the speed of sequential in wall time, '
        f'{result["train_speedup"]:.2f}x in training time')


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  if CPU_DEVICES.value:  # Before any jax call, as in convnet.main.
    parallel.force_cpu_devices(CPU_DEVICES.value)
  # As train.train_and_evaluate does; for the whole process, peers included.
  kept_freed_memory = KEEP_FREED_MEMORY.value and memory.keep_freed_memory()
  if MODE.value not in ('train', 'seeds', 'time_to_accuracy', 'table'):
    sys.exit(f'error: unknown --mode={MODE.value}; known: train, seeds, time_to_accuracy, table')
  if MODE.value == 'table':
    paths = sorted(glob.glob(os.path.join(TABLE_FROM.value, '*.json')))
    if not paths:
      sys.exit(f'error: no benchmark JSON files in {TABLE_FROM.value} (--table_from)')
    print(markdown_table(paths))
    return
  try:
    if MODE.value == 'time_to_accuracy':
      cache = parallel.compilation_cache_dir() if COMPILATION_CACHE.value else ''
      if cache:
        parallel.use_compilation_cache(cache)
      result = {**time_to_accuracy(CONFIG.value, TARGET.value), 'compilation_cache': cache,
                'seed': CONFIG.value.seed, 'machine': machine(),
                **provenance(flags.FLAGS['config'].config_filename, CONFIG.value)}
      print(f'{100 * TARGET.value:.1f}% test accuracy: ' + (
          f'{result["seconds"]:.1f} s from the start, at epoch {result["epoch"]}: '
          f'{result["start_up_s"]:.1f} s start-up (imports), {result["compile_s"]:.1f} s '
          f'compile, {result["train_s"]:.1f} s training, {result["other_s"]:.1f} s data, '
          f'initialisation, evaluation and checkpoints'
          if result['reached'] else 'not reached')
          + (f' (compilation cache {cache})' if cache else ''))
    elif MODE.value == 'seeds':
      result = compare_seeds(CONFIG.value, NUM_SEEDS.value)
      print_seeds(result)
    else:
      result = run_benchmark(CONFIG.value, STEPS.value, REPEATS.value, PEERS.value)
      result['keep_freed_memory'] = kept_freed_memory
      result.update(provenance(flags.FLAGS['config'].config_filename, CONFIG.value))
      print_benchmark(flags.FLAGS['config'].config_filename, result)
  except train.USER_ERRORS as e:
    sys.exit(f'error: {e}')
  if JSON.value:
    workdir.write_json(JSON.value, result)


if __name__ == '__main__':
  CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py', 'Config file.',
                                           lock_config=True)
  MODE = flags.DEFINE_string('mode', 'train', 'What to measure: train | seeds | '
                             'time_to_accuracy; or table: print the table of --table_from.')
  TARGET = flags.DEFINE_float('target', 0.99, 'time_to_accuracy: the test accuracy to reach.')
  STEPS = flags.DEFINE_integer('steps', 100, 'train: steps per timed repeat.', lower_bound=1)
  REPEATS = flags.DEFINE_integer(
      'repeats', 15, 'train: timed rounds, one repeat of each trainer per round. Shared '
      'and cloud machines have slow phases of a few seconds; with few rounds, repeats '
      'caught in one decide the median.', lower_bound=1)
  PEERS = flags.DEFINE_bool('peers', True, 'train: also time tf.keras and PyTorch if installed.')
  COMPILATION_CACHE = flags.DEFINE_bool(
      'compilation_cache', False, 'time_to_accuracy: keep and load compiled programs in '
      '$CONVNET_CACHE (default ~/.cache/convnet/jax), as convnet.main does; run twice to time '
      'a rerun.')
  NUM_SEEDS = flags.DEFINE_integer('num_seeds', 2, 'seeds mode: how many seeds.')
  JSON = flags.DEFINE_string('json', '', 'Also write the result to this JSON file.')
  TABLE_FROM = flags.DEFINE_string('table_from', 'docs/benchmarks', 'table: the directory of '
                                   'benchmark JSON files to print as a markdown table.')
  KEEP_FREED_MEMORY = flags.DEFINE_bool(
      'keep_freed_memory', True, 'train: let malloc keep freed blocks for reuse, as the '
      'trainer does on a CPU (cpu/memory.py); the peers share the process, so they get it '
      "too. false = glibc's defaults, under which PyTorch page-faults its activations in "
      'afresh every step (docs/performance.md).')
  CPU_DEVICES = flags.DEFINE_integer('cpu_devices', 0, 'Split the CPU into this many XLA '
                                     'devices, as convnet.main --cpu_devices does.',
                                     lower_bound=0)
  app.run(main, flags_parser=config_lib.parse_flags)
