#!/usr/bin/env bash
# Install Debian packages, skipping those already present: by default the ones hvd_llama builds
# against. Used by the Makefile (before pip builds mpi4py), by docker/horovod/build.sh, by the
# images (through make setup), and with other names by docker/image-test.sh.
#   docker/debian-packages.sh [PACKAGE...]
#   OpenMPI: mpi4py and Horovod's MPI controller; ssh: how horovodrun and mpirun start remote ranks.
#   iproute2: the launch scripts' interface check (`ip`).
#   Not by default: openssh-server, whose sshd the two-node tests run in their namespaces (on a
#   machine with systemd, Debian's package also starts a system sshd): `make two-nodes` and CI
#   install it by name.
#   highwayhash, farmhash: TF 2.21's public headers include them without shipping them.
#   cmake, g++, make, patch: the Horovod build.
#   python3-venv, python3-dev: `make setup` with Debian's own python3 (venv, and the headers
#   the Horovod build compiles against).
set -euo pipefail
pkgs=("$@")
[ $# -gt 0 ] || pkgs=(libopenmpi-dev openmpi-bin openssh-client iproute2 libhighwayhash-dev
                     libfarmhash-dev cmake g++ make patch python3-venv python3-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
echo "debian-packages.sh: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
