#!/usr/bin/env bash
# The one way hvd_llama gets Horovod: the Makefile calls it now, the Docker images later.
#
#   docker/horovod/build.sh [PYTHON]
#
# Debian packages come from ../debian-packages.sh.
# Horovod 0.28.1 (its last release) does not build against TensorFlow >= 2.19 as published,
# so this builds it from the PyPI sdist with the patches beside this script, against the
# TensorFlow already installed for PYTHON (default: python3), with TensorFlow + MPI + Gloo
# (+ NCCL when HOROVOD_GPU_OPERATIONS=NCCL). The wheel is cached, keyed by Horovod version,
# TF version, GPU ops and the patches, so a second setup skips the ~6-minute build.
set -euo pipefail

PY=${1:-python3}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
GPU_OPS=${HOROVOD_GPU_OPERATIONS:-}
here=$(cd "$(dirname "$0")" && pwd)
cache=${HVD_LLAMA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvd_llama/wheels}

bash "$here/../debian-packages.sh"

tf_version=$("$PY" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null) \
  || { echo "build.sh: TensorFlow is not importable by $PY; install it first" >&2; exit 1; }
key=$( { echo "$HOROVOD_VERSION $tf_version gpu=$GPU_OPS"; cat "$here"/*.patch; } \
       | sha256sum | cut -c1-16)
wheel_dir="$cache/horovod-$HOROVOD_VERSION-tf$tf_version-$key"

if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
  echo "build.sh: building Horovod $HOROVOD_VERSION for TF $tf_version (no cached wheel at $wheel_dir)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
    "horovod==$HOROVOD_VERSION" -d "$work"
  tar -xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
  src="$work/horovod-$HOROVOD_VERSION"
  for p in "$here"/*.patch; do  # in name order: keras3-N- patches build on each other
    patch -s --batch -d "$src" -p1 < "$p" >/dev/null 2>&1 \
      || { echo "build.sh: $(basename "$p") does not apply to Horovod $HOROVOD_VERSION" >&2; exit 1; }
  done
  # CMAKE_POLICY_VERSION_MINIMUM: the bundled gloo declares a cmake minimum that cmake 4 rejects.
  env HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
      HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
      ${GPU_OPS:+HOROVOD_GPU_OPERATIONS=$GPU_OPS} \
      CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS="-j$(nproc)" \
      "$PY" -m pip wheel -q --no-build-isolation --no-deps "$src" -w "$work/wheel"
  # Publish the cache entry with one rename so an interrupted build never looks complete.
  mkdir -p "$cache"
  rm -rf "$wheel_dir.partial"
  mv "$work/wheel" "$wheel_dir.partial"
  mv "$wheel_dir.partial" "$wheel_dir"
fi

# Replace any other Horovod build, then add the runtime deps named in the wheel's metadata.
"$PY" -m pip install -q --force-reinstall --no-deps "$wheel_dir"/horovod-*.whl
"$PY" -m pip install -q "$wheel_dir"/horovod-*.whl

bindir=$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")
report=$(TF_CPP_MIN_LOG_LEVEL=3 "$bindir/horovodrun" --check-build 2>/dev/null)
echo "$report"
want=("TensorFlow" "MPI" "Gloo")
[ "$GPU_OPS" = NCCL ] && want+=("NCCL")
for w in "${want[@]}"; do
  grep -q "\[X\] $w" <<<"$report" || { echo "build.sh: horovodrun --check-build lacks $w" >&2; exit 1; }
done
echo "build.sh: Horovod $HOROVOD_VERSION ready ($wheel_dir)"
