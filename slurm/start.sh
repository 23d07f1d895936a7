#!/usr/bin/env bash
# Start a real Slurm cluster (Debian's slurm-wlm) on this machine: a controller with real
# accounting (slurmdbd + MariaDB) and CHATFORGE_SLURM_NODES compute nodes, each in its own
# network namespace with its own address and hostname, so that a multi-node job really
# rendezvous over a network (MASTER_ADDR=n1 resolves on every node).
#
#   bash slurm/start.sh            # idempotent: starts only what is not running
#   source /tmp/chatforge-slurm/env.sh && sinfo    # clients: wrappers first on PATH
#   bash slurm/stop.sh             # stops only what this script started
#
# Needs root (namespaces, apt). Everything lives under CHATFORGE_SLURM_DIR. Facts behind the
# choices below: docs/slurm.md, "Why it is built this way" (e.g. why slurmd is started with
# nsenter+unshare and not `ip netns exec`).
set -euo pipefail

BASE=${CHATFORGE_SLURM_DIR:-/tmp/chatforge-slurm}
NODES=${CHATFORGE_SLURM_NODES:-2}
# Advertised per node (SlurmdParameters=config_overrides): more CPUs than the machine has so
# that several ranks fit on one node; jobs on CPU then share the real cores.
CPUS=${CHATFORGE_SLURM_CPUS:-4}
MEM_MB=${CHATFORGE_SLURM_MEM_MB:-8000}
NS=${CHATFORGE_SLURM_NS:-cfslurm}        # prefix of the namespace names
NET=${CHATFORGE_SLURM_NET:-10.200.0}     # /24 inside the namespaces only
CLUSTER=chatforge
CTL_ADDR=$NET.1
CLIENTS="sbatch srun salloc squeue scontrol scancel sinfo sacct sacctmgr sstat sprio sshare"

ETC=$BASE/etc RUN=$BASE/run LOG=$BASE/log PIDS=$BASE/pids STATE=$BASE/state BIN=$BASE/bin

log() { echo "slurm/start: $*" >&2; }

# A pid file names a live process: not missing, not a zombie (PID 1 here reaps lazily, so
# `kill -0` would call a dead daemon alive).
alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ -r "/proc/$pid/stat" ] || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmdbd >/dev/null || missing+=(slurmdbd)
  command -v mariadbd >/dev/null || missing+=(mariadb-server)
  command -v nsenter >/dev/null || missing+=(util-linux)
  command -v ip >/dev/null || missing+=(iproute2)
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  }
}

node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "n$i"; done; }

make_dirs() {
  mkdir -p "$ETC" "$LOG" "$PIDS" "$STATE/ctld" "$BIN" "$BASE/mysql"
  mkdir -p "$RUN/munge"
  # munged refuses a socket directory without execute permission for all.
  chmod 755 "$BASE" "$RUN" "$RUN/munge"
  local n
  for n in $(node_names); do mkdir -p "$STATE/$n"; done
}

write_hosts() {
  {
    echo "127.0.0.1 localhost"
    echo "$CTL_ADDR ctl"
    local i
    for ((i = 1; i <= NODES; i++)); do echo "$NET.$((10 + i)) n$i"; done
  } >"$ETC/hosts"
}

write_slurm_conf() {
  local n i
  cat >"$ETC/slurm.conf" <<EOF
# Written by slurm/start.sh; edits are overwritten on the next start.
ClusterName=$CLUSTER
SlurmctldHost=ctl($CTL_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job restarts in ~12 s instead of ~140 s.
AuthInfo=socket=$RUN/munge/munge.sock,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=1
DependencyParameters=kill_invalid_depend
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
KillWait=5
MailProg=/bin/true
JobRequeue=1
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/%n
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd.%n.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.%n.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTL_ADDR
AccountingStoragePass=$RUN/munge/munge.sock
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
EOF
  for ((i = 1; i <= NODES; i++)); do
    echo "NodeName=n$i NodeAddr=$NET.$((10 + i)) CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN" \
      >>"$ETC/slurm.conf"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$ETC/slurm.conf"
  cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$RUN/munge/munge.sock
DbdHost=ctl
DbdAddr=$CTL_ADDR
SlurmUser=root
PidFile=$RUN/slurmdbd.daemon.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=chatforge
StorageLoc=slurm_acct_db
EOF
  # slurmdbd refuses a config readable by others (it holds the database password).
  chmod 600 "$ETC/slurmdbd.conf"
}

write_wrappers() {
  local cmd
  for cmd in $CLIENTS; do
    cat >"$BIN/$cmd" <<EOF
#!/bin/sh
# chatforge dev cluster: run $cmd in the controller's network namespace (start.sh wrote this).
export SLURM_CONF=$ETC/slurm.conf
# Inside a job the node's namespace already reaches the controller.
[ -n "\${SLURM_JOB_ID:-}" ] && exec /usr/bin/$cmd "\$@"
exec nsenter --net=/run/netns/$NS-ctl /usr/bin/$cmd "\$@"
EOF
    chmod 755 "$BIN/$cmd"
  done
  cat >"$BASE/env.sh" <<EOF
# source this file: Slurm client commands (and submitit) then talk to the dev cluster.
export PATH=$BIN:\$PATH
export SLURM_CONF=$ETC/slurm.conf
export CHATFORGE_SLURM_DIR=$BASE
EOF
}

# One veth per namespace into a bridge that lives in its own namespace (the host's network
# stays untouched).
setup_network() {
  local br=$NS-br names=(ctl) addrs=($CTL_ADDR) i
  for ((i = 1; i <= NODES; i++)); do names+=("n$i"); addrs+=("$NET.$((10 + i))"); done
  if [ ! -e "/run/netns/$br" ]; then
    ip netns add "$br"
    echo "$br" >>"$BASE/netns"
    ip -n "$br" link add br0 type bridge
    ip -n "$br" link set br0 up
    ip -n "$br" link set lo up
  fi
  for i in "${!names[@]}"; do
    local ns=$NS-${names[$i]}
    [ -e "/run/netns/$ns" ] && continue
    ip netns add "$ns"
    echo "$ns" >>"$BASE/netns"
    ip link add "v$i-$NS" type veth peer name eth0 netns "$ns"
    ip link set "v$i-$NS" netns "$br"
    ip -n "$br" link set "v$i-$NS" master br0 up
    ip -n "$ns" addr add "${addrs[$i]}/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
}

# Start a daemon in the foreground of its own session, in namespace $1 with hostname $2
# (and our /etc/hosts); its pid (exec keeps it) goes to pid file $3.
spawn() {
  local ns=$1 host=$2 pidfile=$3
  shift 3
  if [ -z "$ns" ]; then
    setsid "$@" </dev/null >>"$LOG/$(basename "$pidfile" .pid).out" 2>&1 &
  else
    setsid nsenter --net="/run/netns/$ns" unshare --mount --uts -- sh -c \
      'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"' \
      "$ETC/hosts" "$host" "$@" </dev/null >>"$LOG/$(basename "$pidfile" .pid).out" 2>&1 &
  fi
  echo $! >"$pidfile"
}

wait_for() {
  local what=$1 tries=$2
  shift 2
  local i
  for ((i = 0; i < tries; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  log "timed out waiting for $what; logs in $LOG"
  return 1
}

start_munge() {
  alive "$PIDS/munged.pid" && return 0
  if [ ! -s "$ETC/munge.key" ]; then
    dd if=/dev/urandom bs=1024 count=1 of="$ETC/munge.key" status=none
    chmod 400 "$ETC/munge.key"
  fi
  rm -f "$RUN/munge/munge.sock"
  spawn "" "" "$PIDS/munged.pid" munged --foreground --force --socket="$RUN/munge/munge.sock" \
    --key-file="$ETC/munge.key" --pid-file="$RUN/munge/munged.pid" \
    --log-file="$LOG/munged.log" --seed-file="$STATE/munged.seed"
  wait_for munged 50 test -S "$RUN/munge/munge.sock"
}

mysql_ctl() {
  nsenter --net="/run/netns/$NS-ctl" mariadb --socket="$RUN/mysqld.sock" -uroot "$@"
}

start_mariadb() {
  alive "$PIDS/mariadbd.pid" && return 0
  local fresh=0
  if [ ! -d "$BASE/mysql/mysql" ]; then
    mysql_install_db --user=root --datadir="$BASE/mysql" --auth-root-authentication-method=socket \
      >"$LOG/mysql_install_db.log" 2>&1
    fresh=1
  fi
  # TCP on 127.0.0.1 inside the controller's namespace: no clash with a host MariaDB.
  spawn "" "" "$PIDS/mariadbd.pid" nsenter --net="/run/netns/$NS-ctl" mariadbd --user=root \
    --datadir="$BASE/mysql" --socket="$RUN/mysqld.sock" --pid-file="$RUN/mariadbd.pid" \
    --bind-address=127.0.0.1 --port=3306 --log-error="$LOG/mariadb.log" \
    --innodb-buffer-pool-size=32M --skip-name-resolve
  wait_for mariadbd 150 mysql_ctl -e "select 1"
  if [ "$fresh" = 1 ]; then
    mysql_ctl -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'chatforge';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  fi
}

start_slurmdbd() {
  alive "$PIDS/slurmdbd.pid" && return 0
  spawn "$NS-ctl" ctl "$PIDS/slurmdbd.pid" env SLURM_CONF="$ETC/slurm.conf" slurmdbd -D
  wait_for slurmdbd 150 nsenter --net="/run/netns/$NS-ctl" bash -c "echo > /dev/tcp/$CTL_ADDR/6819"
}

start_slurmctld() {
  alive "$PIDS/slurmctld.pid" && return 0
  spawn "$NS-ctl" ctl "$PIDS/slurmctld.pid" slurmctld -D -f "$ETC/slurm.conf"
  wait_for slurmctld 150 "$BIN/scontrol" ping
}

start_slurmd() {
  local n
  for n in $(node_names); do
    alive "$PIDS/slurmd.$n.pid" && continue
    spawn "$NS-$n" "$n" "$PIDS/slurmd.$n.pid" slurmd -D -f "$ETC/slurm.conf" -N "$n"
  done
}

nodes_idle() {
  local states
  states=$("$BIN/sinfo" -h -N -o "%t" 2>/dev/null) || return 1
  [ "$(echo "$states" | grep -cE '^(idle|alloc|mix)$')" -eq "$NODES" ]
}

main() {
  [ "$(id -u)" = 0 ] || { log "needs root (network namespaces, daemons as root)"; exit 1; }
  local t0=$SECONDS
  install_packages
  make_dirs
  write_hosts
  write_slurm_conf
  write_wrappers
  setup_network
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd
  # Nodes that were DOWN (a previous slurmd was stopped) come back on their own with
  # ReturnToService=2; resume covers a node drained by hand.
  "$BIN/scontrol" update nodename="n[1-$NODES]" state=resume >/dev/null 2>&1 || true
  wait_for "$NODES idle nodes" 300 nodes_idle
  log "cluster '$CLUSTER' up with $NODES nodes in $((SECONDS - t0)) s"
  cat <<EOF
Slurm dev cluster is up ($NODES nodes: $(node_names | tr '\n' ' ')). Point clients at it:
  source $BASE/env.sh        # puts wrappers for $CLIENTS first on PATH
  sinfo; chatforge cluster=slurm cluster.nodes=2 ...
Stop it: bash $(cd "$(dirname "$0")" && pwd)/stop.sh
EOF
}

main "$@"
