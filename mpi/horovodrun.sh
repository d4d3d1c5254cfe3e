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
train_command

export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# horovodrun --mpi builds its own mpirun line; OpenMPI also reads its settings from OMPI_MCA_*.
for ((i = 0; i < ${#KEEPALIVE[@]}; i += 2)); do
  export "OMPI_MCA_${KEEPALIVE[i]}=${KEEPALIVE[i + 1]}"
done
cmd=(horovodrun -np "$NP" -H "$(host_list)")
[ -n "$CONTROLLER" ] && cmd+=("--$CONTROLLER")
[ -n "$SSH_PORT" ] && cmd+=(-p "$SSH_PORT")
# --network-interfaces picks Gloo's and Horovod's MPI transport; NCCL reads its own variable.
[ -n "$IFACE" ] && { cmd+=(--network-interfaces "$IFACE"); export NCCL_SOCKET_IFNAME=$IFACE; }
launch "${cmd[@]}" "${TRAIN[@]}"
