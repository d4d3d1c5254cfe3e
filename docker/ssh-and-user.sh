#!/usr/bin/env bash
# The last root step of both images:  docker/ssh-and-user.sh SSH_PORT USER_UID
#   sshd for multi-node horovodrun/mpirun (docs/multinode.md) on SSH_PORT, which the image's ssh
#   client also uses, with no host keys in the image: a container serving ssh makes its own
#   (ssh-keygen -A) when it starts;
#   user `hvd` (uid USER_UID) for running jobs, owning /opt/hvd_llama/runs.
set -euo pipefail
port=$1 uid=$2
mkdir -p /run/sshd
sed -i "s/^#\?Port .*/Port $port/" /etc/ssh/sshd_config
printf 'Host *\n    Port %s\n    StrictHostKeyChecking accept-new\n' "$port" \
  > /etc/ssh/ssh_config.d/hvd_llama.conf
rm -f /etc/ssh/ssh_host_*
useradd --create-home --uid "$uid" --shell /bin/bash hvd
install -d -o hvd /opt/hvd_llama/runs
