#!/usr/bin/env bash
# make image-test: build docker/Dockerfile.cpu through its `test` stage, which trains
# configs/tiny.yaml under mpi/horovodrun.sh (Gloo) and mpi/mpirun.sh as build steps, so a broken
# image fails to build. It needs no Docker engine: podman builds with chroot isolation (podman
# run is refused on machines like this one), on a Debian 12 base made here with debootstrap
# since no registry image can be pulled. Root only (debootstrap, podman's storage).
# The base gets this machine's CA certificates and a pip.conf that uses them, as a site's own
# base image would: where TLS goes through a proxy with its own CA, pip in the image needs it.
set -euo pipefail
cd "$(dirname "$0")/.."
# debootstrap and the chroot it calls live in /usr/sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"
base=localhost/debian-bookworm:base
bash docker/debian-packages.sh podman debootstrap
if ! podman image exists "$base"; then
  root=$(mktemp -d) log=$(mktemp)
  trap 'rm -rf "$root" "$log"' EXIT
  echo "image-test.sh: making $base with debootstrap"
  debootstrap --variant=minbase bookworm "$root" > "$log" 2>&1 || { tail -5 "$log" >&2; exit 1; }
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp /etc/ssl/certs/ca-certificates.crt "$root/usr/local/share/ca-certificates/host.crt"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$root/etc/pip.conf"
  tar -C "$root" -c . | podman import - "$base" > /dev/null
fi
start=$SECONDS
# Each RUN gets a random hostname that its /etc/hosts does not resolve (docker run's and
# BuildKit's do), and Gloo segfaults looking it up: use this host's name, mapped to loopback.
podman build --format docker --isolation chroot --target test -t hvd_llama:cpu-test \
  --uts host --add-host "$(hostname):127.0.0.1" \
  --build-arg BASE_IMAGE="$base" -f docker/Dockerfile.cpu .
podman image prune -f > /dev/null  # the untagged images of earlier builds (about 4 GB each)
echo "image-test.sh: Dockerfile.cpu built and trained tiny inside in $((SECONDS - start)) s"
