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

HOSTS=() SLOTS=() HOSTS_REMOTE=() ADDRS=() NP="" CONTROLLER="" IFACE="" SSH_PORT="" CONTAINER="" DRY_RUN=0 CONFIG="" OVERRIDES=()

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
# absolute paths, which remote ranks need since they do not start in this directory. The
# hosts first (one ssh each), then the config (a dry run, which imports TensorFlow).
check_launch() {
  local slots err
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
  check_hosts  # first: a host's refusal takes seconds, the dry run below imports TensorFlow
  # The config and its overrides, before any rank starts (a rank would find the same error
  # after horovodrun's start-up, in the middle of every rank's output).
  local check=("$PYTHON")
  [ -n "$CONTAINER" ] && check=(apptainer exec "$CONTAINER" python)
  err=$("${check[@]}" -m hvd_llama.train --config "$CONFIG" "${OVERRIDES[@]}" --dry-run \
        --processes "$NP" 2>&1 >/dev/null) || die "${err##*$'\n'}"
}

# What a remote host reports to check_hosts, one item per line: its name ("name HOST"), each
# path it lacks ("missing PATH"), "noimport" when its python finds no horovod.tensorflow or
# hvd_llama (found, not imported: that would take seconds), its IPv4 addresses ("addr IFACE
# ADDRESS/PREFIX"), or "noip" without iproute2's `ip`. Arguments: the python to try ("" with
# --container), then the paths that must exist.
# shellcheck disable=SC2016  # expanded on the remote host
PROBE='echo "name $(hostname)"
py=$1; shift
for path in "$@"; do test -e "$path" || echo "missing $path"; done
if [ -n "$py" ] && [ -x "$py" ]; then
  "$py" -c "import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in (\"horovod.tensorflow\", \"hvd_llama\")))" \
    2>/dev/null || echo noimport
fi
PATH=$PATH:/usr/sbin:/sbin
command -v ip >/dev/null || { echo noip; exit 0; }
ip -o -4 addr show | while read -r _ dev _ cidr _; do echo "addr $dev $cidr"; done'

# ssh_fix HOST OUTPUT: what to do about HOST's failed `ssh -o BatchMode=yes`, from ssh's words.
ssh_fix() {
  local host=$1 last=${2//$'\r'/}  # ssh ends some of its lines with CR LF
  last=${last##*$'\n'}
  case $2 in
    *"IDENTIFICATION HAS CHANGED"*)
      echo "its ssh host key is not the one in known_hosts; if the node was reinstalled, remove the old key (ssh-keygen -R $host) and connect once to accept the new one" ;;
    *"Host key verification failed"*)
      echo "its ssh host key is unknown here; connect once (ssh $host) to accept it" ;;
    *"Permission denied"*)
      echo "ssh refused the login without a password ($last); add your public key to the node's ~/.ssh/authorized_keys" ;;
    *)
      echo "unreachable over ssh${SSH_PORT:+ (port $SSH_PORT)} ($last); is it up, and does 'ssh${SSH_PORT:+ -p $SSH_PORT} $host true' work from $(hostname)?" ;;
  esac
}

# check_hosts: every remote host answers ssh in batch mode with a known host key, is not a
# second name of a host listed before, has the config and the python (or image) at the same
# path, a python that finds Horovod and hvd_llama; and with several hosts, the network
# (IPv4, on hosts that have `ip`): --iface must name an interface this host and every remote
# host have, the remote addresses on it reachable from this host; without
# --iface, mpirun.sh refuses a remote address this host cannot reach (or that is its own
# too, as Docker's bridge is on every host), which OpenMPI would try and hang on (horovodrun
# tests the interfaces itself and keeps those that connect).
check_hosts() {
  local ssh=(ssh -o BatchMode=yes -o ConnectTimeout=10) host out line need py i j rc
  local names=() listed=()  # each host's own name, and how the host list names it
  [ -n "$SSH_PORT" ] && ssh+=(-p "$SSH_PORT")
  for host in "${HOSTS[@]}"; do
    is_local "$host" && { names+=("$(hostname)") listed+=("$host"); break; }
  done
  need=("$CONFIG")
  if [ -n "$CONTAINER" ]; then need+=("$CONTAINER") py=""; else need+=("$PYTHON") py=$PYTHON; fi
  for i in "${!HOSTS[@]}"; do
    host=${HOSTS[$i]}
    is_local "$host" && continue
    # shellcheck disable=SC2029  # the arguments are quoted for the remote shell, here
    rc=0
    out=$("${ssh[@]}" "$host" "bash -s -- $(printf '%q ' "$py" "${need[@]}")" 2>&1 \
          <<< "$PROBE") || rc=$?
    [ "$rc" = 255 ] && die "host $host: $(ssh_fix "$host" "$out")"  # ssh's own failure
    [ "$rc" = 0 ] || die "host $host: the check there failed (${out##*$'\n'})"
    while IFS= read -r line; do
      case $line in
        "missing "*) die "host $host: ${line#missing } does not exist there (use a shared file system or the same image on every host)" ;;
        noimport) die "host $host: $PYTHON there finds no horovod.tensorflow or hvd_llama; install the same environment at the same path on every host (or use --container)" ;;
      esac
    done <<< "$out"
    local name
    name=$(sed -n 's/^name //p' <<< "$out")
    for j in "${!names[@]}"; do
      [ -n "$name" ] && [ "${names[$j]}" = "$name" ] \
        && die "host $host is the machine listed as ${listed[$j]} (both are $name)"
    done
    names+=("$name") listed+=("$host") HOSTS_REMOTE+=("$host")
    if grep -qx noip <<< "$out"; then ADDRS+=(noip)
    else ADDRS+=("$(grep '^addr ' <<< "$out" | cut -d' ' -f2- | tr ' ' '=' | tr '\n' ' ')"); fi
  done
  [ ${#HOSTS_REMOTE[@]} -gt 0 ] && check_network
  return 0
}

# OpenMPI notices a lost host by keepalives on mpirun's connections to its daemons, by default
# after 5 minutes of silence and 9 probes 20 s apart; until then the job hangs on a dead node.
# These probe after 10 s, every 5 s, 3 times: a host cut off ends the job within about 30 s.
KEEPALIVE=(oob_tcp_keepalive_time 10 oob_tcp_keepalive_intvl 5 oob_tcp_keepalive_probes 3)

# reachable ADDRESS: something at ADDRESS answers a TCP connection to the ssh port from here
# (a refusal is an answer), within 3 seconds.
reachable() {
  local out
  out=$(LC_ALL=C timeout 3 bash -c "exec 3<>/dev/tcp/$1/${SSH_PORT:-22}" 2>&1) \
    || [[ $out == *refused* ]]
}

# check_network: see check_hosts. ADDRS[i] holds "IFACE=ADDRESS/PREFIX ..." of HOSTS_REMOTE[i],
# or "noip" where that host has no `ip` (not checked there).
check_network() {
  local mine i entry dev ip why PATH=$PATH:/usr/sbin:/sbin  # where Debian keeps `ip`
  command -v ip >/dev/null || return 0
  mine=" $(ip -o -4 addr show | awk '{sub("/.*", "", $4); print $4}' | tr '\n' ' ') "
  if [ -n "$IFACE" ] && ! ip -o -4 addr show dev "$IFACE" 2>/dev/null | grep -q inet; then
    die "host $(hostname) (this one): no interface $IFACE with an IPv4 address"
  fi
  for i in "${!HOSTS_REMOTE[@]}"; do
    local host=${HOSTS_REMOTE[$i]} devs=() bad="" good=()
    [ "${ADDRS[$i]}" = noip ] && continue
    for entry in ${ADDRS[$i]}; do
      dev=${entry%%=*} ip=${entry#*=}; ip=${ip%%/*}
      [[ $dev == lo || $ip == 127.* ]] && continue
      devs+=("$dev")
      [ -n "$IFACE" ] && [ "$dev" != "$IFACE" ] && continue
      if [[ $mine == *" $ip "* ]]; then why="it is $(hostname)'s own address too"
      elif ! reachable "$ip"; then why="no answer on port ${SSH_PORT:-22} from $(hostname)"
      else good+=("$dev"); continue; fi
      [ -z "$bad" ] && bad="its $dev address $ip cannot be reached from $(hostname) ($why)"
    done
    if [ -n "$IFACE" ]; then
      [ ${#good[@]} -gt 0 ] && continue
      [ -n "$bad" ] && die "host $host: $bad; --iface must name the interface of the network between the hosts"
      die "host $host: no interface $IFACE with an IPv4 address (it has: ${devs[*]:-none})"
    fi
    if [ -n "$bad" ] && [ "$LAUNCHER" = mpi/mpirun.sh ] && [ ${#devs[@]} -gt 0 ]; then
      die "host $host: $bad, and mpirun would try it and hang; give --iface${good[0]:+ ${good[0]}} (the interface of the network between the hosts)"
    fi
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
