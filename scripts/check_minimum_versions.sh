#!/usr/bin/env bash
# Installs the lowest versions pyproject.toml allows of the packages convnet's code calls
# into most (jax, flax, optax, orbax-checkpoint, tensorflow-datasets: "name>=X" installed
# as "name==X"; the others as pyproject.toml asks) in a fresh venv, and runs a smoke
# subset of the tests there: those lower bounds are true only if this passes. Not part
# of `make test` (it downloads and installs a whole stack).
#
#   scripts/check_minimum_versions.sh                    # the bounds as written
#   scripts/check_minimum_versions.sh jax==0.9.2 flax==0.11.0   # try lower ones first
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-$(mktemp -d)/venv}"
PYTHON="${PYTHON:-python3}"

# One requirement per line: the pins, then the test tools of the [dev] extra as written.
mapfile -t pins < <("$PYTHON" - "$@" <<'PY'
import re, sys, tomllib
CORE = ('jax', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow-datasets')
overrides = {re.split('[=<>]', a)[0].lower(): a for a in sys.argv[1:]}
project = tomllib.load(open('pyproject.toml', 'rb'))['project']
for requirement in project['dependencies']:
  name = re.split('[=<>\[ ]', requirement)[0].lower()
  low = re.search(r'>=\s*([^,; ]+)', requirement)
  pinned = f'{name}=={low.group(1)}' if low and name in CORE else requirement.split(' ')[0]
  print(overrides.get(name) or pinned)
print(*project['optional-dependencies']['dev'], sep='\n')
PY
)
echo "installing into $VENV:" "${pins[@]}"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "${pins[@]}"
"$VENV/bin/pip" install --quiet --no-deps -e .
"$VENV/bin/pip" check || true  # Reports, for the record, what the pins leave inconsistent.
"$VENV/bin/python" -c 'import jax, flax, optax, orbax.checkpoint, tensorflow_datasets as t; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "tfds", t.__version__)'
# The smoke subset: models and kernels, a training run that resumes, checkpoints, tfds
# (mocked, and prepared in both file formats), figures and TensorBoard.
"$VENV/bin/python" -m pytest -q -x -p no:cacheprovider \
    tests/test_models.py tests/test_shapes.py tests/test_cpu.py \
    "tests/test_train.py::test_training_real_mnist_learns_and_repeats_exactly" \
    "tests/test_checkpoint.py::test_same_size_corruption_is_caught_by_the_sums_and_the_run_retrains_exactly" \
    tests/test_input_pipeline.py \
    "tests/test_visualize.py::test_every_figure_is_written_at_its_size" \
    "tests/test_visualize.py::test_tensorboard_holds_scalars_filter_grids_end_images_and_hparams"
