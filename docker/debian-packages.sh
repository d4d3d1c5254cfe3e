#!/usr/bin/env bash
# Install the Debian packages hvd_llama builds against, skipping those already present.
# Used by the Makefile (before pip builds mpi4py), by docker/horovod/build.sh, and by the images.
#   OpenMPI: mpi4py and Horovod's MPI controller.
#   highwayhash, farmhash: TF 2.21's public headers include them without shipping them.
#   cmake, g++, make, patch: the Horovod build.
set -euo pipefail
pkgs=(libopenmpi-dev openmpi-bin libhighwayhash-dev libfarmhash-dev cmake g++ make patch)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
echo "debian-packages.sh: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
