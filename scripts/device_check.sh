#!/usr/bin/env bash
# The device check: convnet on the GPU or TPU at hand, in one command, offline, in under 8
# minutes on one GPU; --smoke runs every step tiny (on a CPU, under 2 minutes). Writes
# OUTDIR/device_check.json and prints its table (scripts/device_check.py says what it runs).
#
#   scripts/device_check.sh OUTDIR [--smoke]
#
# It uses the machine's own jax, flax, optax, orbax-checkpoint and chex (PYTHON, default
# python3, is the interpreter that has them). What else convnet imports, where that
# machine lacks it, is installed from .wheels/ (git-ignored); fill it beforehand on a
# machine with a network (pure-Python wheels: any platform will do):
#
#   pip download --no-deps --only-binary=:all: -d .wheels ml-collections tensorboardX
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/device_check.py "$@"
