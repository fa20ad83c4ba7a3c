#!/usr/bin/env bash
# A multi-node Ray cluster by hand, for keel. Run the head block on one machine, the worker block on every
# other machine, then train or submit from any machine that can reach the head.
#
# Security: the job API (dashboard, port 8265) runs arbitrary code for whoever reaches it. Keep it on
# loopback (the default below) and reach it through an SSH tunnel, or bind it to a private interface
# only; always use token authentication (RAY_AUTH_MODE=token), with one token shared by every node.
set -euo pipefail

HEAD_IP=${HEAD_IP:?set HEAD_IP to the head node\'s address on the cluster network}

# --- once: make a token and copy it to every node (and to each machine you submit from) -----------------
#   ray get-auth-token --generate        # writes ~/.ray/auth_token
#   scp ~/.ray/auth_token worker1:~/.ray/auth_token
export RAY_AUTH_MODE=token

# --- head node -----------------------------------------------------------------------------------------
ray start --head --node-ip-address "$HEAD_IP" --port 6379 \
    --dashboard-host 127.0.0.1 --dashboard-port 8265 --disable-usage-stats
# (add --num-gpus N if Ray does not detect the GPUs itself)

# --- every worker node (run there, with the same token in ~/.ray/auth_token) ----------------------------
#   RAY_AUTH_MODE=token ray start --address "$HEAD_IP:6379" --node-ip-address "$(hostname -I | cut -d' ' -f1)"

# --- then, in the foreground from the head (8 GPUs per node, 2 nodes) ----------------------------------
#   keel train configs/llama-1b.yaml --address "$HEAD_IP:6379" --nnodes 2 --nproc-per-node 8 \
#       --set train.output_dir=/shared/runs
# --- or as a job, from a laptop through an SSH tunnel to the loopback-only dashboard --------------------
#   ssh -N -L 8265:127.0.0.1:8265 user@"$HEAD_IP" &
#   RAY_AUTH_TOKEN=$(cat head-token) keel submit configs/llama-1b.yaml --address http://127.0.0.1:8265 \
#       --nnodes 2 --nproc-per-node 8 --set train.output_dir=/shared/runs
#   keel status; keel logs JOB --follow; keel stop JOB
#
# To stop this node's Ray processes only, stop the processes `ray start` launched on it (`ray stop` stops
# every Ray on the machine, including other users' clusters on shared hosts).
