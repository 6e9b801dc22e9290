"""A sweep's table and plots, from nothing but the files on disk.

    python -m convnet.report --workdir runs/fk

reads sweep.json and every point's results.json and metrics.jsonl, and writes
results.csv, results.md, heatmap.png (test accuracy over the first two swept
keys), accuracy_vs_params.png and curves.png. Points whose only difference is
`seed` are pooled into one row. Unfinished points are listed as pending.
"""

import ast
import csv
import io
import os
import sys

import numpy as np
from absl import app, flags

from convnet import visualize
from convnet import workdir as workdir_lib

COLUMNS = ('test_accuracy', 'test_accuracy_std', 'num_seeds', 'test_loss', 'num_params',
           'flops_per_image', 'train_images_per_s', 'wall_time_s', 'status')


def _points(sweep_dir: str) -> list[dict]:
  path = os.path.join(sweep_dir, 'sweep.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {sweep_dir} is not a sweep directory')
  return workdir_lib.read_json(path)


def collect(sweep_dir: str) -> list[dict]:
  """One dict per point (seeds pooled): its overrides, then the COLUMNS."""
  groups = {}
  for point in _points(sweep_dir):
    overrides = {k: v for k, v in point['overrides'].items() if k != 'seed'}
    key = repr(sorted(overrides.items()))
    group = groups.setdefault(key, {'overrides': overrides, 'runs': [], 'names': []})
    group['names'].append(point['name'])
    results_path = os.path.join(sweep_dir, point['name'], 'results.json')
    if os.path.exists(results_path):
      group['runs'].append(workdir_lib.read_json(results_path))
  rows = []
  for group in groups.values():
    row = dict(group['overrides'])
    runs = group['runs']
    row['names'] = group['names']
    if len(runs) < len(group['names']):
      row.update({column: None for column in COLUMNS}, status='pending')
      rows.append(row)
      continue
    accuracies = [a for r in runs for a in r.get('test_accuracy_per_seed', [r['test_accuracy']])]
    losses = [x for r in runs for x in r.get('test_loss_per_seed', [r['test_loss']])]
    row.update(
        test_accuracy=float(np.mean(accuracies)),
        test_accuracy_std=float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
        num_seeds=len(accuracies), test_loss=float(np.mean(losses)),
        num_params=runs[0]['num_params'], flops_per_image=runs[0]['flops_per_image'],
        train_images_per_s=float(np.mean([r['train_images_per_s'] for r in runs])),
        wall_time_s=float(sum(r['wall_time_s'] for r in runs)), status='done')
    rows.append(row)
  return rows


def swept_keys(rows: list[dict]) -> list[str]:
  return [k for k in rows[0] if k not in COLUMNS and k != 'names'] if rows else []


def _cell(key: str, value) -> str:
  if value is None:
    return ''
  if key in ('test_accuracy', 'test_accuracy_std'):
    return f'{100 * value:.2f}'
  if key == 'flops_per_image':
    return f'{value / 1e6:.1f}M'
  if key == 'test_loss':
    return f'{value:.4f}'
  if key in ('train_images_per_s', 'wall_time_s'):
    return f'{value:,.0f}'
  if isinstance(value, float):  # A swept value as given: a learning rate of 3e-4 is not 0.
    return f'{value:g}'
  if isinstance(value, (list, tuple)):
    return '-'.join(str(v) for v in value)
  return f'{value:,}' if isinstance(value, int) else str(value)


def markdown_table(rows: list[dict]) -> str:
  keys = swept_keys(rows)
  header = keys + ['test accuracy % (mean ± std)', 'seeds', 'test loss', 'params',
                   'FLOPs/image (train)', 'train images/s (all seeds)', 'wall time s', 'status']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for row in rows:
    accuracy = _cell('test_accuracy', row['test_accuracy'])
    if row['test_accuracy'] is not None and row['num_seeds'] > 1:  # One seed: no spread.
      accuracy += f' ± {_cell("test_accuracy_std", row["test_accuracy_std"])}'
    cells = ([_cell(k, row[k]) for k in keys] + [accuracy] +
             [_cell(k, row[k]) for k in COLUMNS[2:]])
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def write_csv(path: str, rows: list[dict]) -> None:
  keys = swept_keys(rows)
  text = io.StringIO(newline='')
  writer = csv.writer(text)
  writer.writerow(keys + list(COLUMNS))
  for row in rows:
    writer.writerow([_cell(k, row[k]) if k in keys else row[k] for k in keys] +
                    ['' if row[k] is None else row[k] for k in COLUMNS])
  workdir_lib.write_text(path, text.getvalue())


def _numeric(values) -> list:
  """Per-block 1-tuples (from JSON, lists) as their number, for axes and labels."""
  return [v[0] if isinstance(v, (list, tuple)) and len(v) == 1 else v for v in values]


def plot_heatmap(path: str, rows: list[dict]) -> bool:
  """Test accuracy over the first two swept keys; False (nothing drawn) unless the sweep
  has every combination of their values: a zipped sweep's would be mostly empty."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  keys = swept_keys(rows)
  if len(keys) < 2:
    return False
  x_key, y_key = keys[1], keys[0]
  cells = [(repr(_numeric([r[x_key]])[0]), repr(_numeric([r[y_key]])[0])) for r in rows]
  xs, ys = (sorted({cell[i] for cell in cells}, key=_sort_key) for i in (0, 1))
  if len(set(cells)) < len(xs) * len(ys):
    return False
  grid = np.full((len(ys), len(xs)), np.nan)
  for row, (x, y) in zip(rows, cells):
    if row['test_accuracy'] is not None:
      grid[ys.index(y), xs.index(x)] = 100 * row['test_accuracy']
  fig, ax = plt.subplots(figsize=(1.3 * len(xs) + 2.5, 0.8 * len(ys) + 1.8))
  image = ax.imshow(grid, cmap='viridis', aspect='auto')
  for (i, j), value in np.ndenumerate(grid):
    if np.isfinite(value):
      ax.text(j, i, f'{value:.2f}', ha='center', va='center',
              color='white' if value < np.nanmean(grid) else 'black')
  ax.set_xticks(range(len(xs)), [_tick(x) for x in xs])
  ax.set_yticks(range(len(ys)), [_tick(y) for y in ys])
  ax.set_xlabel(x_key)
  ax.set_ylabel(y_key)
  ax.set_title('MNIST test accuracy % (mean over seeds)')
  fig.colorbar(image, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def _sort_key(text: str):
  """Values (as repr) in their natural order: numbers, then lists by their numbers, then
  the rest as text; never 16 before 8."""
  value = ast.literal_eval(text)
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return (0, (value,), '')
  if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
    return (1, tuple(value), '')
  return (2, (), str(value))


def _tick(text: str) -> str:
  value = ast.literal_eval(text)
  return str(value) if not isinstance(value, str) else value


def _label(row: dict) -> str:
  return ', '.join(f'{k.split(".")[-1]}={_cell(k, row[k])}' for k in swept_keys([row]))


def plot_accuracy_vs_params(path: str, rows: list[dict]) -> None:
  """Accuracy (mean ± std over seeds) vs parameters; one colour per value of the last swept
  key, each point labelled with the other swept values."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  done = [r for r in rows if r['test_accuracy'] is not None]
  keys = swept_keys(rows)
  group_key = keys[-1] if keys else None
  groups = {}
  for row in done:
    groups.setdefault(_cell(group_key, row[group_key]) if group_key else '', []).append(row)
  fig, ax = plt.subplots(figsize=(7, 5))
  for value, group in groups.items():
    ax.errorbar([r['num_params'] for r in group], [100 * r['test_accuracy'] for r in group],
                yerr=[100 * r['test_accuracy_std'] for r in group], fmt='o-', capsize=3,
                label=f'{group_key.split(".")[-1]}={value}' if group_key else None)
    for row in group:
      label = ', '.join(_cell(k, row[k]) for k in keys[:-1])
      ax.annotate(label, (row['num_params'], 100 * row['test_accuracy']), fontsize=7,
                  xytext=(3, 3), textcoords='offset points')
  ax.set_xscale('log')
  ax.set_xlabel('parameters' + (f' (points labelled by {", ".join(keys[:-1])})'
                                if len(keys) > 1 else ''))
  ax.set_ylabel('test accuracy % (mean ± std over seeds)')
  if group_key and groups:  # No finished point: nothing to name.
    ax.legend(fontsize=8)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_curves(path: str, sweep_dir: str, rows: list[dict]) -> None:
  """Training curves of every point (its first seed's run)."""
  visualize.plot_curves(path, [
      (_label(row), workdir_lib.read_jsonl(os.path.join(sweep_dir, row['names'][0],
                                                        'metrics.jsonl'))) for row in rows])


def write(sweep_dir: str, rows: list[dict]) -> list[str]:
  """Writes the table and the plots into sweep_dir; returns the paths written."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  paths = [os.path.join(sweep_dir, name) for name in
           ('results.csv', 'results.md', 'accuracy_vs_params.png', 'curves.png')]
  write_csv(paths[0], rows)
  with open(paths[1], 'w') as f:
    f.write(markdown_table(rows) + '\n')
  plot_accuracy_vs_params(paths[2], rows)
  plot_curves(paths[3], sweep_dir, rows)
  heatmap = os.path.join(sweep_dir, 'heatmap.png')
  if plot_heatmap(heatmap, rows):
    paths.append(heatmap)
  return paths


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  sweep_dir = flags.FLAGS.workdir
  try:
    rows = collect(sweep_dir)
  except (FileNotFoundError, workdir_lib.RecordError) as e:
    sys.exit(f'error: {e}')
  paths = write(sweep_dir, rows)
  print(markdown_table(rows))
  print('wrote ' + ', '.join(paths))


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'A sweep directory (python -m convnet.sweep --workdir).')
  flags.mark_flag_as_required('workdir')
  app.run(main)
