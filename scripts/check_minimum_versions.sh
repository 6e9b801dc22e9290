#!/usr/bin/env bash
# Installs the lowest versions pyproject.toml allows of the packages convnet's code calls
# into most (jax, flax, optax, orbax-checkpoint, tensorflow-datasets, absl-py: "name>=X"
# installed as "name==X"; the others as pyproject.toml asks) in a fresh venv, and runs a
# subset of the tests there: those lower bounds are true only if this passes. With
# --colab, the versions Colab's runtimes ship instead (tests/colab/tpu.txt) and the
# accelerator path's tests alone. With --newest, the newest release of each package (what
# a new install on Python 3.12+ gets: jax 0.11 left Python 3.11, where `make test` runs)
# and the tests of the accelerator path and of the CPU kernels. Both on Python 3.13 where
# pyenv has it. `.ci/run` runs all three; each downloads and installs a whole stack, so
# none is part of `make test`.
#
#   scripts/check_minimum_versions.sh                    # the bounds as written
#   scripts/check_minimum_versions.sh --colab            # Colab's jax 0.7.2, flax 0.11.2, ...
#   scripts/check_minimum_versions.sh --newest           # the newest releases
#   scripts/check_minimum_versions.sh jax==0.9.2 flax==0.11.0   # try lower ones first
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=bounds
if [[ "${1:-}" == --colab || "${1:-}" == --newest ]]; then
  MODE="${1#--}"
  shift
  python313="$(pyenv prefix 3.13 2>/dev/null | head -n1)/bin/python3.13"
  [[ -x "$python313" ]] || python313=python3
  PYTHON="${PYTHON:-$python313}"
fi
VENV="${VENV:-$(mktemp -d)/venv}"
PYTHON="${PYTHON:-python3}"

# One requirement per line: the pins, then the test tools (the [dev] extra as written; with
# --colab and --newest only pytest's: their tests prepare no tfds data and run no notebook).
mapfile -t pins < <("$PYTHON" - "$MODE" "$@" <<'PY'
import re, sys, tomllib
CORE = ('jax', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow-datasets', 'absl-py')
mode, overrides = sys.argv[1], {re.split('[=<>]', a)[0].lower(): a for a in sys.argv[2:]}
project = tomllib.load(open('pyproject.toml', 'rb'))['project']
pytest = [r for r in project['optional-dependencies']['dev'] if r.startswith('pytest')]
if mode == 'newest':
  pins = project['dependencies'] + pytest
elif mode == 'colab':  # The runtime's name==version lines, but its TPU library and torch's wheel URL.
  pins = [line.strip() for line in open('tests/colab/tpu.txt')
          if '==' in line and not line.startswith(('#', 'libtpu'))] + pytest
else:
  pins = []
  for requirement in project['dependencies']:
    name = re.split(r'[=<>\[ ]', requirement)[0].lower()
    low = re.search(r'>=\s*([^,; ]+)', requirement)
    pins.append(f'{name}=={low.group(1)}' if low and name in CORE else requirement.split(' ')[0])
  pins += project['optional-dependencies']['dev']
for pin in pins:
  name = re.split('[=<>; ]', pin)[0].lower()
  print(overrides.pop(name, pin))
for pin in overrides.values():  # Versions named on the command line that pyproject lacks.
  print(pin)
PY
)
# uv installs a whole stack several times faster than pip (CI builds three of them); it
# comes from the package index into a venv of its own.
tools="$(mktemp -d)/tools"
python3 -m venv "$tools"
"$tools/bin/pip" install --quiet uv
uv_pip() { "$tools/bin/uv" pip "$1" --python "$VENV/bin/python" "${@:2}"; }
echo "installing into $VENV ($("$PYTHON" --version)):" "${pins[@]}"
"$tools/bin/uv" venv --quiet --seed --python "$PYTHON" "$VENV"  # With pip, as a venv has.
uv_pip install --quiet "${pins[@]}"
if [[ $MODE == colab ]]; then  # As the notebook installs it: what the runtime has stays.
  uv_pip freeze | grep '==' > "$VENV/keep_runtime.txt"
  uv_pip install --quiet -e . -c "$VENV/keep_runtime.txt"
else
  uv_pip install --quiet --no-deps -e .
fi
uv_pip check || true  # Reports, for the record, what the pins leave inconsistent.
"$VENV/bin/python" -c 'import jax, flax, optax, orbax.checkpoint, tensorflow_datasets as t; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "tfds", t.__version__)'

# The accelerator path: the library ops against NumPy and 'auto' under a faked GPU and
# TPU (test_ops), trained under a faked GPU (2 seeds, BatchNorm, shifted images, 1 and 2
# devices), pmap against jit, the CLI on 8 devices and on 1, SIGTERM, SIGKILL and resume,
# sweep points vmapped in one program.
tests=(
    tests/test_models.py tests/test_ops.py
    "tests/test_train.py::test_what_auto_runs_on_a_gpu_trains_seeds_batchnorm_and_shifted_images"
    "tests/test_train.py::test_pmap_over_two_devices_equals_one_device_on_the_same_global_batches[xla]"
    "tests/test_train.py::test_jit_with_sharding_equals_pmap[xla]"
    "tests/test_main.py::test_cli_trains_the_library_ops_two_seeds_on_shifted_images_on_8_devices_and_1"
    "tests/test_checkpoint.py::test_sigterm_then_sigkill_then_rerun_equals_an_uninterrupted_run_bitwise[xla]"
    "tests/test_vmapped_points.py::test_points_vmapped_on_the_library_ops_equal_each_alone"
)
if [[ $MODE != colab ]]; then  # The CPU kernels, which a CPU runs.
  tests+=(tests/test_cpu.py)
fi
if [[ $MODE == bounds ]]; then  # And the rest of what the bounds promise: a run that
  # repeats, checkpoints, tfds (mocked, and prepared in both file formats), figures.
  tests+=(
    tests/test_shapes.py tests/test_input_pipeline.py
    "tests/test_train.py::test_training_real_mnist_learns_and_repeats_exactly"
    "tests/test_checkpoint.py::test_same_size_corruption_is_caught_by_the_sums_and_the_run_retrains_exactly"
    "tests/test_visualize.py::test_every_figure_is_written_at_its_size"
    "tests/test_visualize.py::test_tensorboard_holds_scalars_filter_grids_end_images_and_hparams"
  )
fi
"$VENV/bin/python" -m pytest -q -x -p no:cacheprovider -n 2 --dist loadfile "${tests[@]}"
