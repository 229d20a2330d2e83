#!/usr/bin/env bash
# Runs a program under the deepspeed launcher, across real nodes or as emulated nodes on one machine.
#
#   scripts/launch.sh --hostfile HOSTS [--num-nodes N] [--num-gpus G] -- PROGRAM ARGS...   # real nodes (pdsh/ssh)
#   scripts/launch.sh --emulate-nodes 2 --num-gpus 2 -- PROGRAM ARGS...                     # 2 x 2 on this machine
#
# Emulation starts one launcher per logical node (--no_ssh --node_rank K) on 127.0.0.1. On GPUs each
# logical node gets its own GPUs and its own NCCL_HOSTID, so NCCL treats the nodes as separate hosts
# (cross-node traffic goes through its socket transport, not NVLink).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
EMULATE=0 NODES=1 GPUS=1 HOSTFILE="" PORT="${MASTER_PORT:-29561}"
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
if [ "$EMULATE" -eq 0 ]; then
  if [ -n "$HOSTFILE" ]; then
    exec deepspeed --hostfile "$HOSTFILE" --num_nodes "$NODES" --num_gpus "$GPUS" "$@"
  fi
  [ "$NODES" -eq 1 ] || { echo "launch.sh: more than one node needs --hostfile (or --emulate-nodes)" >&2; exit 2; }
  exec deepspeed --num_nodes 1 --num_gpus "$GPUS" "$@"
fi
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
  NCCL_HOSTID="node$k" GRACE_HOSTNAME="node$k" deepspeed --hostfile "$HOSTS" --include "$INCLUDE" --no_ssh \
    --node_rank "$k" --master_addr 127.0.0.1 --master_port "$PORT" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
