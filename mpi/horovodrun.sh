#!/usr/bin/env bash
# Launch hvd_llama.train with horovodrun after checking hosts, slots, ssh and paths.
#
#   mpi/horovodrun.sh --hostfile mpi/hostfile configs/llama-7b.yaml run.dir=/shared/runs/7b
#   mpi/horovodrun.sh -H node1:8,node2:8 --gloo --iface ib0 configs/small.yaml
#
# Options and checks: mpi/common.sh. horovodrun forwards this shell's environment to every rank.
set -euo pipefail
LAUNCHER=mpi/horovodrun.sh
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
check_launch
# Gloo looks up this host's name and crashes (SIGSEGV in hvd.init) when it does not resolve.
if [ "$CONTROLLER" = gloo ] && ! getent hosts "$(hostname)" > /dev/null; then
  die "this host's name $(hostname) does not resolve (add it to /etc/hosts); Gloo needs it"
fi
train_command

export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
cmd=(horovodrun -np "$NP" -H "$(host_list)")
[ -n "$CONTROLLER" ] && cmd+=("--$CONTROLLER")
[ -n "$SSH_PORT" ] && cmd+=(-p "$SSH_PORT")
# --network-interfaces picks Gloo's and Horovod's MPI transport; NCCL reads its own variable.
[ -n "$IFACE" ] && { cmd+=(--network-interfaces "$IFACE"); export NCCL_SOCKET_IFNAME=$IFACE; }
launch "${cmd[@]}" "${TRAIN[@]}"
