#!/usr/bin/env bash
# Start, inspect or stop a local multi-node Ray cluster on ONE machine: a head node and
# N worker nodes, each a separate `ray start` (its own raylet, ports and CPU count), so
# that tokmarg's actors really spread over several Ray nodes without a second machine.
#
#   cluster/local_cluster.sh start [N_WORKERS]   # head + N_WORKERS worker nodes (default 1)
#   cluster/local_cluster.sh status
#   cluster/local_cluster.sh stop
#
# Run `cluster/local_cluster.sh` with no arguments for the settings (environment variables).
set -euo pipefail

RAY_BIN="${RAY:-ray}"
HEAD_PORT="${TOKMARG_RAY_PORT:-6379}"
NODE_CPUS="${TOKMARG_NODE_CPUS:-1}"
NODE_GPUS="${TOKMARG_NODE_GPUS:-0}"
HEAD_CPUS="${TOKMARG_HEAD_CPUS:-$NODE_CPUS}"
HEAD_GPUS="${TOKMARG_HEAD_GPUS:-$NODE_GPUS}"
DASHBOARD_PORT="${TOKMARG_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${TOKMARG_CLIENT_PORT:-10001}"
PORT_BASE="${TOKMARG_PORT_BASE:-20000}"
OBJECT_STORE_MB="${TOKMARG_OBJECT_STORE_MB:-512}"
TEMP_DIR="${TOKMARG_RAY_TEMP_DIR:-/tmp/tokmarg_ray_${HEAD_PORT}}"
START_TIMEOUT="${TOKMARG_START_TIMEOUT:-60}"
STOP_TIMEOUT="${TOKMARG_STOP_TIMEOUT:-15}"
# Every process of this cluster inherits this variable; `stop` finds them by it.
MARKER="TOKMARG_LOCAL_RAY_CLUSTER=${TEMP_DIR}"
ADDRESS="127.0.0.1:${HEAD_PORT}"

usage() {
    cat >&2 <<EOF
usage: $0 start [N_WORKERS] | status | stop | kill-node I

  start [N]  start a head node and N worker nodes (default 1) on this machine, each a separate
             Ray node (\`ray start\`) with its own ports; print the address for
             \`tokmarg eval --address ${ADDRESS}\`.
  status     show the nodes of the running cluster (\`ray status\`).
  kill-node I  SIGKILL worker node I (1..N): its raylet and every process it started, as when a
             machine is lost; the rest of the cluster keeps running.
  stop       stop every process of this cluster, and only those: processes are found by the
             ${MARKER%%=*} variable they inherit (Linux /proc). Other Ray clusters
             on this machine are left alone. Without /proc it falls back to \`ray stop\`,
             which stops ALL Ray processes of this user on the machine.

Settings (environment variables, defaults in brackets):
  RAY                      ray executable [ray on PATH: ${RAY_BIN}]
  TOKMARG_RAY_PORT         head (GCS) port [6379]; the address is 127.0.0.1:PORT
  TOKMARG_NODE_CPUS        CPUs each node advertises [1]
  TOKMARG_NODE_GPUS        GPUs each node advertises [0]
  TOKMARG_HEAD_CPUS        CPUs the head advertises [TOKMARG_NODE_CPUS]; 0 keeps work off it
  TOKMARG_HEAD_GPUS        GPUs the head advertises [TOKMARG_NODE_GPUS]
  TOKMARG_DASHBOARD_PORT   dashboard / job API port, bound to 127.0.0.1 only [8265]
  TOKMARG_CLIENT_PORT      Ray client server port of the head [10001]
  TOKMARG_PORT_BASE        node i (head = 0) uses ports BASE+100*i .. BASE+100*i+99 for its
                           node manager (+0), object manager (+1), dashboard agent http (+2)
                           and grpc (+3), metrics export (+4), runtime-env agent (+5) and
                           worker processes (+10..+99) [20000]
  TOKMARG_OBJECT_STORE_MB  object store size per node in MiB [512]
  TOKMARG_RAY_TEMP_DIR     Ray temp/log dir of this cluster [/tmp/tokmarg_ray_PORT]
  TOKMARG_START_TIMEOUT    seconds to wait for all nodes to register [60]
  TOKMARG_STOP_TIMEOUT     seconds between SIGTERM and SIGKILL on stop [15]
  RAY_AUTH_MODE            token authentication [token]; the token is ~/.ray/auth_token
                           (created with \`ray get-auth-token --generate\` if missing),
                           or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH. Clients that connect with
                           an explicit address need RAY_AUTH_MODE=token in their environment.
EOF
}

die() {
    echo "local_cluster.sh: error: $*" >&2
    exit 1
}

is_uint() {
    [[ "$1" =~ ^[0-9]+$ ]]
}

# PIDs of the processes of this cluster: those that carry MARKER in their environment, plus
# all their descendants. (Processes that rename themselves, such as ray::DashboardAgent,
# ray::IDLE workers or the dashboard's module processes, overwrite their /proc/PID/environ,
# so they are found through their parent: the raylet or dashboard that started them.)
# Never lists this script, its ancestors or zombies.
cluster_pids() {
    local environ pid marked=""
    for environ in /proc/[0-9]*/environ; do
        pid="${environ#/proc/}"
        pid="${pid%/environ}"
        if grep -qzxF -- "$MARKER" "$environ" 2>/dev/null; then
            marked+="${pid} "
        fi
    done
    [[ -n "$marked" ]] || return 0
    if ! command -v ps >/dev/null 2>&1; then
        tr ' ' '\n' <<<"$marked" | grep -vx -e "$$" -e '' || true
        return 0
    fi
    ps -e -o pid= -o ppid= -o stat= | awk -v roots="$marked" -v self="$$" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
        { parent[$1] = $2; if ($3 ~ /^Z/) skip[$1] = 1 }
        END {
            changed = 1
            while (changed) {
                changed = 0
                for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 }
            }
            for (p = self; p != "" && p != "0" && !(p in skip); p = parent[p]) skip[p] = 1
            for (p in keep) if (!(p in skip)) print p
        }'
}

have_proc() {
    [[ -r /proc/self/environ ]]
}

# Ports of node i (0 = head) as `ray start` options.
node_port_args() {
    local base=$((PORT_BASE + 100 * $1))
    echo "--node-manager-port $((base)) --object-manager-port $((base + 1))" \
        "--dashboard-agent-listen-port $((base + 2)) --dashboard-agent-grpc-port $((base + 3))" \
        "--metrics-export-port $((base + 4)) --runtime-env-agent-port $((base + 5))" \
        "--min-worker-port $((base + 10)) --max-worker-port $((base + 99))"
}

# Number of alive nodes according to `ray status` (0 if it cannot tell).
alive_nodes() {
    "$RAY_BIN" status --address "$ADDRESS" 2>/dev/null |
        awk '/^Active:/ {a = 1; next} /^(Pending|Recent failures):/ {a = 0} a && / node_[0-9a-f]+/ {n++} END {print n + 0}' || true
}

ensure_token() {
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
    if [[ "$RAY_AUTH_MODE" == "token" ]]; then
        # Creates ~/.ray/auth_token only if no token exists (env or file); prints nothing we need.
        "$RAY_BIN" get-auth-token --generate >/dev/null 2>&1 || die "could not create a Ray auth token"
    else
        echo "local_cluster.sh: WARNING: RAY_AUTH_MODE=${RAY_AUTH_MODE}: token authentication is OFF;" \
            "anyone who can reach this machine's Ray ports can run code on it." >&2
    fi
}

# Those of the given PIDs that still run (zombies count as gone: only their parent can reap them).
running_of() {
    (($# > 0)) || return 0
    ps -o pid= -o stat= -p "$(tr ' ' ',' <<<"$*")" 2>/dev/null | awk '$2 !~ /^Z/ {print $1}' || true
}

# SIGTERM the given PIDs, wait up to $1 seconds, then SIGKILL the ones still running.
terminate() {
    local timeout="$1" left waited=0
    shift
    (($# > 0)) || return 0
    kill -TERM "$@" 2>/dev/null || true
    while ((waited < timeout * 4)); do
        left="$(running_of "$@")"
        [[ -z "$left" ]] && return 0
        sleep 0.25
        waited=$((waited + 1))
    done
    left="$(running_of "$@" | tr '\n' ' ')"
    if [[ -n "${left// /}" ]]; then
        echo "local_cluster.sh: SIGKILL to processes still running after ${timeout}s: ${left}" >&2
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null || true
    fi
}

stop_cluster() {
    if ! have_proc || ! command -v ps >/dev/null 2>&1; then
        echo "local_cluster.sh: no /proc or ps here; falling back to \`ray stop\`" \
            "(stops ALL Ray processes of this user on this machine)" >&2
        "$RAY_BIN" stop
        return
    fi
    local all
    all="$(cluster_pids | tr '\n' ' ')"
    if [[ -z "${all// /}" ]]; then
        echo "local_cluster.sh: no cluster running for ${TEMP_DIR} (port ${HEAD_PORT})"
        rm -f "${TEMP_DIR}/tokmarg_cluster.env"
        return
    fi
    # The order `ray stop` uses: raylets first (their agents and workers fate-share with them),
    # then everything else, the GCS last. The set is fixed now: once a raylet is gone, its
    # renamed children are no longer reachable through it.
    local raylets=() gcs=() others=() pid comm
    # shellcheck disable=SC2086
    while read -r pid comm; do
        case "$comm" in
        raylet) raylets+=("$pid") ;;
        gcs_server) gcs+=("$pid") ;;
        *) others+=("$pid") ;;
        esac
    done < <(ps -o pid= -o comm= -p "$(tr ' ' ',' <<<"${all% }")" 2>/dev/null || true)
    local per=$(((STOP_TIMEOUT + 2) / 3))
    terminate "$per" "${raylets[@]}"
    terminate "$per" "${others[@]}"
    terminate "$per" "${gcs[@]}"
    # Anything the cluster started meanwhile (a worker a raylet forked while we listed).
    local late
    late="$(cluster_pids | tr '\n' ' ')"
    # shellcheck disable=SC2086
    [[ -z "${late// /}" ]] || terminate 2 $late
    rm -f "${TEMP_DIR}/tokmarg_cluster.env"
    local n=$((${#raylets[@]} + ${#others[@]} + ${#gcs[@]}))
    echo "local_cluster.sh: stopped ${n} process(es) of the cluster at ${ADDRESS} (logs kept in ${TEMP_DIR})"
}

start_cluster() {
    local n_workers="${1:-1}"
    is_uint "$n_workers" || die "N_WORKERS must be a non-negative integer, got '${n_workers}'"
    for v in HEAD_PORT NODE_CPUS NODE_GPUS HEAD_CPUS HEAD_GPUS DASHBOARD_PORT CLIENT_PORT PORT_BASE OBJECT_STORE_MB \
        START_TIMEOUT STOP_TIMEOUT; do
        is_uint "${!v}" || die "${v} must be a non-negative integer, got '${!v}'"
    done
    command -v "$RAY_BIN" >/dev/null 2>&1 || die "ray executable not found: '${RAY_BIN}' (set RAY or PATH)"
    if have_proc && [[ -n "$(cluster_pids)" ]]; then
        die "a cluster is already running for ${TEMP_DIR} (port ${HEAD_PORT}); run '$0 stop' first"
    fi
    ensure_token
    mkdir -p "$TEMP_DIR"
    # Ray processes (and so job entrypoints such as `tokmarg eval` or `python`) find their
    # executables first next to this `ray`, i.e. in the same environment.
    local ray_dir
    ray_dir="$(dirname "$(command -v "$RAY_BIN")")"

    local common=(--temp-dir "$TEMP_DIR" --object-store-memory $((OBJECT_STORE_MB * 1024 * 1024))
        --disable-usage-stats)
    local node=(--num-cpus "$NODE_CPUS" --num-gpus "$NODE_GPUS")
    local log="${TEMP_DIR}/tokmarg_node_0.log"
    echo "local_cluster.sh: starting head node (port ${HEAD_PORT}, ${HEAD_CPUS} CPU, ${HEAD_GPUS} GPU, log ${log})"
    # shellcheck disable=SC2046
    if ! env "$MARKER" PATH="${ray_dir}:${PATH}" "$RAY_BIN" start --head --port "$HEAD_PORT" "${common[@]}" \
        --num-cpus "$HEAD_CPUS" --num-gpus "$HEAD_GPUS" \
        --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
        --ray-client-server-port "$CLIENT_PORT" $(node_port_args 0) >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        stop_cluster >/dev/null 2>&1 || true
        die "the head node did not start (full log: ${log})"
    fi
    local i
    for ((i = 1; i <= n_workers; i++)); do
        log="${TEMP_DIR}/tokmarg_node_${i}.log"
        echo "local_cluster.sh: starting worker node ${i}/${n_workers} (${NODE_CPUS} CPU, log ${log})"
        # shellcheck disable=SC2046
        if ! env "$MARKER" PATH="${ray_dir}:${PATH}" "$RAY_BIN" start --address "$ADDRESS" "${common[@]}" \
            "${node[@]}" $(node_port_args "$i") >"$log" 2>&1; then
            tail -n 20 "$log" >&2
            stop_cluster >/dev/null 2>&1 || true
            die "worker node ${i} did not start (full log: ${log})"
        fi
    done

    local want=$((n_workers + 1)) have=0 waited=0
    while ((waited < START_TIMEOUT)); do
        have="$(alive_nodes)"
        ((have >= want)) && break
        sleep 1
        waited=$((waited + 1))
    done
    if ((have < want)); then
        stop_cluster >/dev/null 2>&1 || true
        die "only ${have} of ${want} nodes registered within ${START_TIMEOUT}s; stopped (logs in ${TEMP_DIR})"
    fi

    {
        echo "TOKMARG_RAY_ADDRESS=${ADDRESS}"
        echo "TOKMARG_RAY_NODES=${want}"
        echo "TOKMARG_DASHBOARD=http://127.0.0.1:${DASHBOARD_PORT}"
    } >"${TEMP_DIR}/tokmarg_cluster.env"

    cat <<EOF

Ray cluster running on this machine: 1 head + ${n_workers} worker node(s), ${NODE_CPUS} CPU each (${want} nodes).
  address:   ${ADDRESS}
  dashboard: http://127.0.0.1:${DASHBOARD_PORT}   (127.0.0.1 only; token auth: RAY_AUTH_MODE=${RAY_AUTH_MODE})
  logs:      ${TEMP_DIR}

Use it (the client needs RAY_AUTH_MODE=token in its environment to send the token):
  export RAY_AUTH_MODE=token
  tokmarg eval --address ${ADDRESS} --models ... --out runs/local
  ray job submit --address http://127.0.0.1:${DASHBOARD_PORT} --working-dir . -- tokmarg eval --address auto ...
Stop it:
  $0 stop

TOKMARG_RAY_ADDRESS=${ADDRESS}
EOF
}

# SIGKILL worker node $1: its raylet (found by its node-manager port) and all its descendants.
kill_node() {
    local i="$1"
    is_uint "$i" && ((i >= 1)) || die "kill-node takes a worker node number (1..N), got '${i}'"
    have_proc && command -v ps >/dev/null 2>&1 || die "kill-node needs /proc and ps"
    local port=$((PORT_BASE + 100 * i)) raylet="" pid
    for pid in $(cluster_pids); do
        if tr '\0' ' ' <"/proc/${pid}/cmdline" 2>/dev/null | grep -q -- "raylet.*--node_manager_port=${port}\b"; then
            raylet="$pid"
        fi
    done
    [[ -n "$raylet" ]] || die "no worker node ${i} (node manager port ${port}) in the cluster at ${ADDRESS}"
    local tree
    tree="$(ps -e -o pid= -o ppid= | awk -v root="$raylet" '
        { parent[$1] = $2 } END {
            keep[root] = 1; changed = 1
            while (changed) { changed = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 } }
            for (p in keep) print p }' | tr '\n' ' ')"
    # shellcheck disable=SC2086
    kill -KILL $tree 2>/dev/null || true
    echo "local_cluster.sh: killed worker node ${i} (raylet ${raylet} and $(($(wc -w <<<"$tree") - 1)) process(es) it started)"
}

status_cluster() {
    if have_proc && [[ -z "$(cluster_pids)" ]]; then
        echo "local_cluster.sh: no cluster running for ${TEMP_DIR} (port ${HEAD_PORT})"
        return 1
    fi
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
    local dashboard="http://127.0.0.1:${DASHBOARD_PORT}"
    if [[ -r "${TEMP_DIR}/tokmarg_cluster.env" ]]; then
        dashboard="$(sed -n 's/^TOKMARG_DASHBOARD=//p' "${TEMP_DIR}/tokmarg_cluster.env")"
    fi
    echo "address: ${ADDRESS}   dashboard: ${dashboard}   nodes alive: $(alive_nodes)"
    "$RAY_BIN" status --address "$ADDRESS"
}

case "${1:-}" in
start)
    (($# <= 2)) || { usage; exit 2; }
    start_cluster "${2:-1}"
    ;;
kill-node)
    (($# == 2)) || { usage; exit 2; }
    kill_node "$2"
    ;;
stop)
    (($# == 1)) || { usage; exit 2; }
    stop_cluster
    ;;
status)
    (($# == 1)) || { usage; exit 2; }
    status_cluster
    ;;
-h | --help | help)
    usage
    exit 0
    ;;
*)
    usage
    exit 2
    ;;
esac
