#!/usr/bin/env bash
# Runs a program under the deepspeed launcher, across real nodes or as emulated nodes on one machine.
#
#   scripts/launch.sh --hostfile HOSTS [--num-nodes N] [--num-gpus G] -- PROGRAM ARGS...   # real nodes (pdsh/ssh)
#   scripts/launch.sh --emulate-nodes 2 --num-gpus 2 -- PROGRAM ARGS...                     # 2 x 2 on this machine
#
# Emulation starts one launcher per logical node (--no_ssh --node_rank K) on 127.0.0.1. On GPUs each
# logical node gets its own GPUs and its own NCCL_HOSTID, so NCCL treats the nodes as separate hosts
# (cross-node traffic goes through its socket transport, not NVLink).
# OMP_NUM_THREADS, unless set, becomes this machine's cores / local ranks (at least 1): the launcher leaves
# it unset, and every rank's torch then takes all cores, so ranks sharing a machine fight over them.
# GRACE_DEEPSPEED names the launcher command (default: deepspeed), e.g. for a wrapper.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
EMULATE=0 NODES=1 GPUS=1 HOSTFILE="" PORT="${MASTER_PORT:-29561}"
LAUNCHER="${GRACE_DEEPSPEED:-deepspeed}"
while [ $# -gt 0 ]; do
  case "$1" in
    --emulate-nodes) EMULATE="$2"; shift 2 ;;
    --num-nodes) NODES="$2"; shift 2 ;;
    --num-gpus) GPUS="$2"; shift 2 ;;
    --hostfile) HOSTFILE="$2"; shift 2 ;;
    --master-port) PORT="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "launch.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "launch.sh: give the program after --" >&2; exit 2; }
threads_for() {  # threads_for LOCAL_RANKS: this machine's cores shared among that many ranks
  local cores
  cores="$(nproc 2>/dev/null || echo 1)"
  echo $((cores / $1 > 1 ? cores / $1 : 1))
}
if [ "$EMULATE" -eq 0 ]; then
  [ -n "${OMP_NUM_THREADS:-}" ] || export OMP_NUM_THREADS="$(threads_for "$GPUS")"
  if [ -n "$HOSTFILE" ]; then
    # pdsh carries only a few variables to the nodes; DeepSpeed's environment file carries the rest (the
    # nodes are taken to have this machine's cores). The user's own file is kept, ours adds to it.
    ENVFILE="$(mktemp)"
    trap 'rm -f "$ENVFILE"' EXIT
    name="${DS_ENV_FILE:-.deepspeed_env}"
    case "$name" in /*) places=("$name") ;; *) places=("$HOME/$name" "./$name") ;; esac  # where DeepSpeed looks
    [ "${places[0]}" != "${places[1]:-}" ] && ! [ "$HOME" -ef . ] || places=("${places[0]}")
    for f in "${places[@]}"; do
      [ ! -f "$f" ] || { cat "$f"; [ -z "$(tail -c1 "$f")" ] || echo; } >> "$ENVFILE"  # ends each with a newline
    done
    grep -q "^OMP_NUM_THREADS=" "$ENVFILE" || echo "OMP_NUM_THREADS=$OMP_NUM_THREADS" >> "$ENVFILE"
    DS_ENV_FILE="$ENVFILE" "$LAUNCHER" --hostfile "$HOSTFILE" --num_nodes "$NODES" --num_gpus "$GPUS" "$@"
    exit $?
  fi
  [ "$NODES" -eq 1 ] || { echo "launch.sh: more than one node needs --hostfile (or --emulate-nodes)" >&2; exit 2; }
  exec "$LAUNCHER" --num_nodes 1 --num_gpus "$GPUS" "$@"
fi
# Every emulated node's ranks share this machine.
[ -n "${OMP_NUM_THREADS:-}" ] || export OMP_NUM_THREADS="$(threads_for $((EMULATE * GPUS)))"
HOSTS="$(mktemp)"
trap 'rm -f "$HOSTS"' EXIT
INCLUDE=""
for ((k = 0; k < EMULATE; k++)); do
  echo "node$k slots=$((EMULATE * GPUS))" >> "$HOSTS"  # every GPU id of the machine is a valid slot
  devices=$(seq -s, $((k * GPUS)) $(((k + 1) * GPUS - 1)))
  INCLUDE="${INCLUDE:+$INCLUDE@}node$k:$devices"
done
pids=()
for ((k = 0; k < EMULATE; k++)); do
  NCCL_HOSTID="node$k" GRACE_HOSTNAME="node$k" "$LAUNCHER" --hostfile "$HOSTS" --include "$INCLUDE" --no_ssh \
    --node_rank "$k" --master_addr 127.0.0.1 --master_port "$PORT" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
