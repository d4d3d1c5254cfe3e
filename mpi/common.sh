# shellcheck shell=bash disable=SC2034  # the variables set here are read by the sourcing script
# Sourced by mpi/horovodrun.sh and mpi/mpirun.sh: one argument syntax, one set of checks made
# before any rank starts, so both launchers refuse the same bad input with the same message.
#
#   (-H HOST:SLOTS[,HOST:SLOTS...] | --hostfile FILE) [-np N] [--gloo | --mpi] [--iface NAME]
#   [--ssh-port PORT] [--container IMAGE.sif] [--dry-run] CONFIG [section.key=value ...]
#
# A hostfile has OpenMPI's form, "node1 slots=8" per line ('#' starts a comment). -np defaults
# to every slot. Remote hosts must accept ssh without a password (BatchMode); the config, the
# Python (or, with --container, the Apptainer image) must exist at the same path on every host.
# --gloo/--mpi pick horovodrun's controller (mpirun.sh is always MPI).
# Environment: PYTHON (default: the python on PATH), NCCL_DEBUG (default WARN).

HOSTS=() SLOTS=() NP="" CONTROLLER="" IFACE="" SSH_PORT="" CONTAINER="" DRY_RUN=0 CONFIG="" OVERRIDES=()

die() { echo "$LAUNCHER: $*" >&2; exit 2; }

# usage: the one-line synopsis; --help prints it to stdout and exits 0, a missing CONFIG prints
# it to stderr and exits 2.
usage() {
  echo "usage: $LAUNCHER (-H HOST:SLOTS[,...] | --hostfile FILE) [-np N] [--iface NAME]" \
       "[--gloo | --mpi] [--ssh-port PORT] [--container IMAGE.sif] [--dry-run] CONFIG [section.key=value ...]"
}

is_local() {
  case $1 in localhost | 127.* | "$(hostname)" | "$(hostname -f 2>/dev/null)") return 0 ;; esac
  return 1
}

# add_host NAME SLOTS WHERE: one entry, refused when the host (or another name for this
# machine) is already listed, since the launchers would start that host's ranks twice.
add_host() {
  local name=$1 slots=$2 where=$3 key=$1 i
  [[ $slots =~ ^[1-9][0-9]*$ ]] || die "$where: slots '$slots' for $name is not a positive integer"
  is_local "$name" && key=localhost
  for i in "${!HOSTS[@]}"; do
    local other=${HOSTS[$i]}
    is_local "$other" && other=localhost
    [ "$other" = "$key" ] && die "$where: host $name is listed twice (as ${HOSTS[$i]} before)"
  done
  HOSTS+=("$name") SLOTS+=("$slots")
}

read_hostfile() {
  local file=$1 n=0 line name slots
  [ -f "$file" ] || die "hostfile $file: no such file"
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    line=${line%%#*}
    [[ $line =~ ^[[:space:]]*$ ]] && continue
    if [[ $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([^[:space:]]+)[[:space:]]*$ ]]; then
      name=${BASH_REMATCH[1]} slots=${BASH_REMATCH[2]}
    elif [[ $line =~ ^[[:space:]]*([^[:space:]=]+)[[:space:]]*$ ]]; then
      name=${BASH_REMATCH[1]} slots=1
    else
      die "hostfile $file line $n: expected 'HOST slots=N', got '$line'"
    fi
    add_host "$name" "$slots" "hostfile $file line $n"
  done < "$file"
  [ ${#HOSTS[@]} -gt 0 ] || die "hostfile $file lists no host"
}

read_hostlist() {
  local entry entries
  IFS=, read -ra entries <<< "$1"
  for entry in "${entries[@]}"; do
    [[ $entry == *:* ]] || die "-H $1: '$entry' is not HOST:SLOTS"
    add_host "${entry%%:*}" "${entry##*:}" "-H $1"
  done
}

parse_args() {
  local hostlist="" hostfile=""
  while [ $# -gt 0 ]; do
    case $1 in
      -H | --hostfile | -np | --iface | --ssh-port | --container)
        [ -n "${2:-}" ] || die "$1 needs a value" ;;
    esac
    case $1 in
      -H) hostlist=$2; shift 2 ;;
      --hostfile) hostfile=$2; shift 2 ;;
      -np) NP=$2; shift 2 ;;
      --gloo | --mpi) CONTROLLER=${1#--}; shift ;;
      --iface) IFACE=$2; shift 2 ;;
      --ssh-port) SSH_PORT=$2; shift 2 ;;
      --container) CONTAINER=$2; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      -*) die "unknown option $1 (see --help)" ;;
      *) break ;;
    esac
  done
  [ $# -ge 1 ] || { usage >&2; exit 2; }
  CONFIG=$1; shift
  OVERRIDES=("$@")
  if [ -n "$hostlist" ] && [ -n "$hostfile" ]; then die "give -H or --hostfile, not both"; fi
  if [ -n "$hostfile" ]; then read_hostfile "$hostfile"
  elif [ -n "$hostlist" ]; then read_hostlist "$hostlist"
  else die "no hosts: give -H HOST:SLOTS[,...] or --hostfile FILE"; fi
}

total_slots() { local s t=0; for s in "${SLOTS[@]}"; do t=$((t + s)); done; echo "$t"; }

# host_list: the hosts as HOST:SLOTS,... (the form both horovodrun and mpirun take with -H).
host_list() {
  local i out=()
  for i in "${!HOSTS[@]}"; do out+=("${HOSTS[$i]}:${SLOTS[$i]}"); done
  (IFS=,; echo "${out[*]}")
}

# check_launch: everything that can be known before a rank starts. Sets PYTHON and CONFIG to
# absolute paths, which remote ranks need since they do not start in this directory.
check_launch() {
  local slots host err
  slots=$(total_slots)
  NP=${NP:-$slots}
  [[ $NP =~ ^[1-9][0-9]*$ ]] || die "-np '$NP' is not a positive integer"
  [ "$NP" -le "$slots" ] || die "-np $NP exceeds the $slots slots of $(host_list)"
  [ -f "$CONFIG" ] || die "config $CONFIG: no such file"
  CONFIG=$(realpath "$CONFIG")
  if [ -n "$CONTAINER" ]; then
    [ -f "$CONTAINER" ] || die "container image $CONTAINER: no such file"
    CONTAINER=$(realpath "$CONTAINER")
    command -v apptainer >/dev/null || die "--container needs apptainer on PATH"
    PYTHON=python  # the image's, on the PATH its %environment sets
  else
    PYTHON=$(command -v "${PYTHON:-python}") || die "no python on PATH (set PYTHON=...)"
  fi
  # The config and its overrides, before any rank starts (a rank would find the same error
  # after horovodrun's start-up, in the middle of every rank's output).
  local check=("$PYTHON")
  [ -n "$CONTAINER" ] && check=(apptainer exec "$CONTAINER" python)
  err=$("${check[@]}" -m hvd_llama.train --config "$CONFIG" "${OVERRIDES[@]}" --dry-run \
        --processes "$NP" 2>&1 >/dev/null) || die "${err##*$'\n'}"
  local ssh=(ssh -o BatchMode=yes -o ConnectTimeout=10)
  [ -n "$SSH_PORT" ] && ssh+=(-p "$SSH_PORT")
  for host in "${HOSTS[@]}"; do
    is_local "$host" && continue
    err=$("${ssh[@]}" "$host" true 2>&1 >/dev/null) \
      || die "host $host: unreachable over ssh${SSH_PORT:+ (port $SSH_PORT)}: ${err##*$'\n'}"
    local need=("$CONFIG") path
    if [ -n "$CONTAINER" ]; then need+=("$CONTAINER"); else need+=("$PYTHON"); fi
    for path in "${need[@]}"; do
      # shellcheck disable=SC2029  # the path is meant to expand here, on the launching host
      "${ssh[@]}" "$host" test -e "$(printf %q "$path")" \
        || die "host $host: $path does not exist there (use a shared file system or the same image on every host)"
    done
  done
}

# train_command: sets TRAIN, what every rank runs.
train_command() {
  TRAIN=()
  [ -n "$CONTAINER" ] && TRAIN+=(apptainer exec --nv "$CONTAINER")
  TRAIN+=("$PYTHON" -m hvd_llama.train --config "$CONFIG" "${OVERRIDES[@]}")
}

# launch CMD...: print the command line; run it unless --dry-run.
launch() {
  printf '%q ' "$@"; echo
  [ "$DRY_RUN" = 1 ] && exit 0
  exec "$@"
}
