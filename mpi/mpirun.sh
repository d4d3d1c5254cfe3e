#!/usr/bin/env bash
# Launch hvd_llama.train with OpenMPI's mpirun, in the form Horovod's docs give, after the same
# checks as mpi/horovodrun.sh.
#
#   mpi/mpirun.sh --hostfile mpi/hostfile configs/llama-7b.yaml run.dir=/shared/runs/7b
#   mpi/mpirun.sh -H node1:8,node2:8 --container hvd_llama.sif configs/small.yaml
#
# Options and checks: mpi/common.sh. Unlike horovodrun, mpirun forwards only the variables named
# with -x: PATH, LD_LIBRARY_PATH and every HOROVOD_*, NCCL_*, TF_* and KERAS_* variable set here.
set -euo pipefail
LAUNCHER=mpi/mpirun.sh
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
[ "$CONTROLLER" = gloo ] && die "--gloo is horovodrun's; mpirun always runs Horovod's MPI controller"
check_launch
train_command

export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
[ -n "$IFACE" ] && export NCCL_SOCKET_IFNAME=$IFACE
# -bind-to none: each rank's TF thread pools use the cores they need; -map-by slot: consecutive
# ranks fill a host first; ob1 without openib: the TCP/shared-memory transports, since NCCL
# (not MPI) carries the tensors on GPUs.
cmd=(mpirun -np "$NP" -H "$(host_list)" -bind-to none -map-by slot -mca pml ob1 -mca btl ^openib)
[ "$(id -u)" = 0 ] && cmd+=(--allow-run-as-root)
[ -n "$SSH_PORT" ] && cmd+=(-mca plm_rsh_args "-p $SSH_PORT")
[ -n "$IFACE" ] && cmd+=(-mca btl_tcp_if_include "$IFACE" -mca oob_tcp_if_include "$IFACE")
for ((i = 0; i < ${#KEEPALIVE[@]}; i += 2)); do cmd+=(-mca "${KEEPALIVE[i]}" "${KEEPALIVE[i + 1]}"); done
for var in PATH LD_LIBRARY_PATH $(compgen -e | grep -E '^(HOROVOD|NCCL|TF|KERAS)_' || true); do
  [ -n "${!var:-}" ] && cmd+=(-x "$var")
done
launch "${cmd[@]}" "${TRAIN[@]}"
