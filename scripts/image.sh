#!/usr/bin/env bash
# The container image, built and checked as users run it.
#
#   scripts/image.sh build [--binary PATH | --from-source] [--local-base] [--tag TAG]
#                          [--playwright 0|1] [-- EXTRA BUILD ARGS]
#   scripts/image.sh test  [--binary PATH]
#
# `build` builds the Dockerfile with docker where its daemon answers (`docker info`), else with
# podman. The binary comes prebuilt from the host (`--binary`, default target/release/machine,
# else the debug binary a test build made) and is copied into the build context; `--from-source`
# builds it in the Rust image instead. `--local-base` builds on a Debian 12 base made here with
# debootstrap (cached under $MACHINE_IMAGE_CACHE, default /var/cache/machine-image), for
# machines that cannot reach an image registry; without it the bases are the Dockerfile's
# (debian:bookworm-slim; `-- --build-arg BASE=nvidia/cuda:...` picks a CUDA base).
#
# `test` builds the image on the local base with podman and runs it: PID 1 is `machine`,
# `/ready` in local mode and against a Redis on this host, a simulation job completes, orphans
# leave no zombie, the HEALTHCHECK command answers, `podman stop -t <drain + 10>` ends it with
# exit code 0, and a ComfyUI baked with `machine install` (from a fixture repository, never
# upstream) starts without installing. It ends with `container: N passed, N failed` and exits 1
# on a failure; where podman cannot run a container it says why and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${MACHINE_IMAGE_CACHE:-/var/cache/machine-image}
BASE_TAG=localhost/machine-base:bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The drain (worker.drain) the containers run with, and the stop timeout it needs.
DRAIN_SECS=30
STOP_SECS=$((DRAIN_SECS + 10))
# crun fails where cgroups are in hybrid mode, and some VMs refuse podman's default limits.
PODMAN_RUN_FLAGS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

log() { echo "image: $*" >&2; }
die() { echo "image: $*" >&2; exit 1; }

podman_() {
    if command -v runc >/dev/null 2>&1; then
        podman --runtime runc "$@"
    else
        podman "$@"
    fi
}

# The engine `build` uses: docker only where its daemon answers.
engine() {
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        echo docker
    elif command -v podman >/dev/null 2>&1; then
        echo podman
    else
        die "neither a working docker (docker info) nor podman found"
    fi
}

# The host binary to put in the image: the release build, else the debug one.
default_binary() {
    local t=${CARGO_TARGET_DIR:-target}
    for b in "$t/release/machine" "$t/debug/machine"; do
        [ -x "$b" ] && { echo "$b"; return; }
    done
    die "no binary in $t/release or $t/debug: run cargo build --release, or pass --binary / --from-source"
}

# A Debian 12 minbase made with debootstrap and imported as $BASE_TAG; the tarball is cached,
# so a second run (or a fresh podman store) reuses it without the network.
local_base() {
    local eng=$1
    if $eng image exists "$BASE_TAG" 2>/dev/null || $eng image inspect "$BASE_TAG" >/dev/null 2>&1; then
        return
    fi
    local tar=$CACHE/bookworm-minbase.tar
    if [ ! -s "$tar" ]; then
        command -v debootstrap >/dev/null 2>&1 || die "debootstrap is missing (scripts/test-deps.sh installs it)"
        mkdir -p "$CACHE"
        local root
        root=$(mktemp -d)
        log "debootstrap --variant=minbase bookworm (cached in $tar)"
        debootstrap --variant=minbase bookworm "$root" "$DEBIAN_MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
            || { rm -rf "$root"; die "debootstrap failed, see $CACHE/debootstrap.log"; }
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        tar -C "$root" -cf "$tar.part" . && mv "$tar.part" "$tar"
        rm -rf "$root"
    fi
    log "importing $tar as $BASE_TAG"
    $eng import "$tar" "$BASE_TAG" >/dev/null 2>&1 || die "$eng import $tar failed"
}

# build [options]: builds the image; prints its tag on stdout.
build() {
    local binary="" from_source=0 local=0 tag=localhost/machine:latest playwright=1 eng
    local extra=()
    while [ $# -gt 0 ]; do
        case $1 in
            --binary) binary=$2; shift 2 ;;
            --from-source) from_source=1; shift ;;
            --local-base) local=1; shift ;;
            --tag) tag=$2; shift 2 ;;
            --playwright) playwright=$2; shift 2 ;;
            --engine) eng=$2; shift 2 ;;
            --) shift; extra=("$@"); break ;;
            *) die "build: unknown option $1" ;;
        esac
    done
    eng=${eng:-$(engine)}
    local args=(--build-arg "PLAYWRIGHT=$playwright")
    if [ "$from_source" = 0 ]; then
        [ -n "$binary" ] || binary=$(default_binary)
        [ -x "$binary" ] || die "--binary $binary is not an executable file"
        # The context excludes target/ (.dockerignore); the binary travels under .image/.
        mkdir -p .image
        cp -f "$binary" .image/machine
        args+=(--build-arg SOURCE=.image --build-arg BINARY=machine)
    fi
    if [ "$local" = 1 ]; then
        local_base "$eng"
        args+=(--build-arg "BASE=$BASE_TAG" --build-arg "BUILD_BASE=$BASE_TAG")
    fi
    local cmd=("$eng")
    if [ "$eng" = podman ]; then
        cmd=(podman_)
        # The docker format keeps HEALTHCHECK, STOPSIGNAL and friends (OCI drops HEALTHCHECK).
        args+=(--format docker "${PODMAN_RUN_FLAGS[@]}")
    fi
    log "building $tag with $eng${binary:+ from $binary}"
    "${cmd[@]}" build --network host -f Dockerfile -t "$tag" "${args[@]}" "${extra[@]}" . >&2
    local size
    size=$("$eng" image inspect "$tag" --format '{{.Size}}')
    log "$tag: $((size / 1000000)) MB"
    echo "$tag"
}

# ---- test ----

PASSED=0
FAILED=0
CONTAINERS=()
TMP=""
REDIS_PID=""

pass() { PASSED=$((PASSED + 1)); echo "container: ok: $*"; }
fail() { FAILED=$((FAILED + 1)); echo "container: FAILED: $*"; }

cleanup() {
    for c in "${CONTAINERS[@]}"; do
        podman_ rm -f -t 0 "$c" >/dev/null 2>&1 || true
    done
    [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null || true
    [ -n "$TMP" ] && rm -rf "$TMP"
    rm -rf .image
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start NAME IMAGE PORT [podman run args...]: runs the image detached on the host's network
# (loopback ports only, each on its own health port).
start() {
    local name=$1 image=$2 port=$3
    shift 3
    CONTAINERS+=("$name")
    podman_ rm -f -t 0 "$name" >/dev/null 2>&1 || true
    # podman complains on stderr that it has no systemd to time the HEALTHCHECK: kept in a log.
    if ! podman_ run -d --name "$name" --network host "${PODMAN_RUN_FLAGS[@]}" \
        -e MACHINE_HEALTH_PORT="$port" -e LOG_FORMAT=text "$@" "$image" >/dev/null 2>"$TMP/podman.log"; then
        cat "$TMP/podman.log"
        return 1
    fi
}

# wait_ready PORT SECS: /ready answers 200 within SECS.
wait_ready() {
    local deadline=$((SECONDS + $2))
    while [ $SECONDS -lt $deadline ]; do
        curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$1/ready" 2>/dev/null && return 0
        sleep 0.5
    done
    return 1
}

# run_job NAME: a simulation job submitted inside the container completes within 60 s.
run_job() {
    local id deadline=$((SECONDS + 60))
    id=$(podman_ exec "$1" machine jobs submit --service simulation --payload '{"duration_ms": 300}') || return 1
    while [ $SECONDS -lt $deadline ]; do
        if podman_ exec "$1" machine jobs show --json "$id" 2>/dev/null | grep -Eq '"status": ?"completed"'; then
            return 0
        fi
        sleep 0.5
    done
    podman_ exec "$1" machine jobs show "$id" >&2 || true
    return 1
}

# stop_cleanly NAME: `podman stop -t <drain + 10>` ends it and its own exit code is 0.
stop_cleanly() {
    local start=$SECONDS code
    podman_ stop -t "$STOP_SECS" "$1" >/dev/null || return 1
    code=$(podman_ inspect "$1" --format '{{.State.ExitCode}}')
    echo "container: $1 stopped in $((SECONDS - start)) s, exit code $code"
    [ "$code" = 0 ]
}

show_logs() {
    echo "---- logs of $1 (last 40 lines)"
    podman_ logs "$1" 2>&1 | tail -40
    echo "----"
}

check_local_mode() {
    local image=$1 c=machine-check-local port
    port=$(free_port)
    # A service whose shell leaves 50 orphans behind: they are reparented to PID 1, which must
    # reap them.
    cat >"$TMP/orphans.toml" <<'EOF'
[services.orphans]
command = ["/bin/sh", "-c", "i=0; while [ $i -lt 50 ]; do (sleep 0.2 &); i=$((i+1)); done; exec sleep 1000"]
restart = "never"
EOF
    start "$c" "$image" "$port" -v "$TMP/orphans.toml:/etc/machine/orphans.toml:ro" \
        -e MACHINE_CONFIG=/etc/machine/orphans.toml -e WORKER_CONNECTORS=simulation:1 \
        || { fail "local mode: podman run failed"; return; }
    local t0=$SECONDS
    if wait_ready "$port" 90; then
        pass "local mode: /ready 200 after $((SECONDS - t0)) s"
    else
        fail "local mode: /ready not 200 within 90 s"
        show_logs "$c"
        return
    fi
    local pid1
    pid1=$(podman_ exec "$c" cat /proc/1/comm) || true
    [ "$pid1" = machine ] && pass "PID 1 is machine" || fail "PID 1 is '$pid1', not machine"
    run_job "$c" && pass "local mode: a simulation job completed" || fail "local mode: the simulation job did not complete"
    sleep 2
    local ps zombies
    ps=$(podman_ exec "$c" ps -eo pid,stat,comm) || true
    zombies=$(echo "$ps" | awk '$2 ~ /^Z/' | wc -l)
    if echo "$ps" | grep -q 'sleep' && [ "$zombies" = 0 ]; then
        pass "orphans leave no zombie"
    else
        fail "zombies: $zombies (or the orphan service did not run):"$'\n'"$ps"
    fi
    if podman_ healthcheck run "$c"; then
        pass "the HEALTHCHECK (machine status --check) answers healthy"
    else
        fail "the HEALTHCHECK failed"
        podman_ exec "$c" machine status --check || true
    fi
    stop_cleanly "$c" && pass "podman stop -t $STOP_SECS: exit code 0" || { fail "podman stop: not a clean exit"; show_logs "$c"; }
}

check_external_redis() {
    local image=$1 c=machine-check-redis port rport
    port=$(free_port)
    rport=$(free_port)
    redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no >"$TMP/redis.log" 2>&1 &
    REDIS_PID=$!
    start "$c" "$image" "$port" -e HUB_REDIS_URL="redis://127.0.0.1:$rport" -e WORKER_CONNECTORS=simulation:1 \
        || { fail "host Redis: podman run failed"; return; }
    local t0=$SECONDS
    if wait_ready "$port" 90; then
        pass "host Redis: /ready 200 after $((SECONDS - t0)) s"
    else
        fail "host Redis: /ready not 200 within 90 s"
        show_logs "$c"
        return
    fi
    run_job "$c" && pass "host Redis: a simulation job completed" || fail "host Redis: the simulation job did not complete"
    stop_cleanly "$c" && pass "host Redis: stopped with exit code 0" || { fail "host Redis: not a clean exit"; show_logs "$c"; }
}

# The installer tests' fixture ComfyUI: a git repository whose requirements are a local
# pure-Python package (pip needs no index) and whose main.py answers HTTP like ComfyUI.
make_fixture() {
    local f=$1/fixture src=$1/src
    mkdir -p "$f/tinypkg/tinypkg" "$src"
    echo "VALUE = 42" >"$f/tinypkg/tinypkg/__init__.py"
    printf '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n' >"$f/tinypkg/pyproject.toml"
    cat >"$f/tinypkg/backend.py" <<'EOF'
import base64, hashlib, os, zipfile

NAME, VERSION = "tinypkg", "0.1.0"
HERE = os.path.dirname(os.path.abspath(__file__))


def get_requires_for_build_wheel(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = f"{NAME}-{VERSION}-py3-none-any.whl"
    info = f"{NAME}-{VERSION}.dist-info"
    with open(os.path.join(HERE, NAME, "__init__.py"), "rb") as f:
        init = f.read()
    files = {
        f"{NAME}/__init__.py": init,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tiny\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return name
EOF
    cat >"$src/main.py" <<'EOF'
import http.server, sys

if "--quick-test-for-ci" in sys.argv:
    sys.exit(0)
port = int(sys.argv[sys.argv.index("--port") + 1])


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
EOF
    echo "tinypkg @ file:///fixture/tinypkg" >"$src/requirements.txt"
    mkdir -p "$src/models/checkpoints" && touch "$src/models/checkpoints/put_checkpoints_here"
    : >"$f/nodes.toml"
    git -C "$src" init --quiet --initial-branch=main
    git -C "$src" add -A
    git -C "$src" -c user.name=t -c user.email=t@t commit --quiet -m init
    git clone --quiet --bare "$src" "$f/comfy.git"
    git -C "$src" rev-parse HEAD
}

check_baked_comfyui() {
    local image=$1 c=machine-check-baked port ctx=$TMP/bake commit baked=localhost/machine-check-baked:latest
    mkdir -p "$ctx"
    commit=$(make_fixture "$ctx") || { fail "the fixture ComfyUI repository could not be made"; return; }
    cat >"$ctx/Containerfile" <<EOF
FROM $image
COPY fixture /fixture
ENV WORKER_CONNECTORS=comfyui COMFYUI_REPO_URL=/fixture/comfy.git COMFYUI_REF=$commit \\
    COMFYUI_NODES_FILE=/fixture/nodes.toml COMFYUI_EXTRA_PACKAGES=none
RUN ["machine", "install"]
EOF
    local t0=$SECONDS
    if podman_ build --format docker --network none "${PODMAN_RUN_FLAGS[@]}" -t "$baked" "$ctx" >"$TMP/bake.log" 2>&1; then
        pass "machine install baked ComfyUI into a derived image in $((SECONDS - t0)) s"
    else
        fail "machine install in a derived image failed:"$'\n'"$(tail -30 "$TMP/bake.log")"
        return
    fi
    port=$(free_port)
    start "$c" "$baked" "$port" -e COMFYUI_BASE_PORT="$(free_port)" \
        || { fail "baked: podman run failed"; return; }
    t0=$SECONDS
    local deadline=$((SECONDS + 90)) logs=""
    while [ $SECONDS -lt $deadline ]; do
        logs=$(podman_ logs "$c" 2>&1) || true
        echo "$logs" | grep -q 'installer=comfyui.*up to date\|up to date.*installer=comfyui' && break
        sleep 0.5
    done
    if echo "$logs" | grep -q 'up to date, nothing to do' && ! echo "$logs" | grep -q 'installed in'; then
        pass "the baked image starts without installing (comfyui: up to date)"
    else
        fail "the baked image did not find its install up to date"
        show_logs "$c"
    fi
    if wait_ready "$port" 90; then
        pass "the baked ComfyUI is ready after $((SECONDS - t0)) s"
    else
        fail "the baked ComfyUI is not ready within 90 s"
        show_logs "$c"
    fi
    stop_cleanly "$c" && pass "baked: stopped with exit code 0" || { fail "baked: not a clean exit"; show_logs "$c"; }
    podman_ rmi -f "$baked" >/dev/null 2>&1 || true
}

skip() {
    echo "container: skipped: $*"
    exit 0
}

test_image() {
    local binary=""
    while [ $# -gt 0 ]; do
        case $1 in
            --binary) binary=$2; shift 2 ;;
            *) die "test: unknown option $1" ;;
        esac
    done
    command -v podman >/dev/null 2>&1 || skip "podman is not installed (scripts/test-deps.sh installs it)"
    local why
    why=$(podman info 2>&1 >/dev/null) || skip "podman cannot run here: $why"
    TMP=$(mktemp -d)
    trap cleanup EXIT
    local t0=$SECONDS tag=localhost/machine-check:latest
    local_base podman
    why=$(podman_ run --rm "${PODMAN_RUN_FLAGS[@]}" "$BASE_TAG" true 2>&1) \
        || skip "podman cannot run a container here: $why"
    if build --engine podman --local-base --playwright 0 --tag "$tag" ${binary:+--binary "$binary"} >/dev/null 2>"$TMP/build.log"; then
        pass "image built in $((SECONDS - t0)) s"
    else
        fail "the image did not build:"$'\n'"$(tail -30 "$TMP/build.log")"
        echo "container: $PASSED passed, $FAILED failed"
        exit 1
    fi
    local size
    size=$(podman image inspect "$tag" --format '{{.Size}}')
    echo "container: image size $((size / 1000000)) MB (binary $(($(stat -c %s .image/machine) / 1000000)) MB)"
    check_local_mode "$tag"
    check_external_redis "$tag"
    check_baked_comfyui "$tag"
    echo "container: checks took $((SECONDS - t0)) s"
    echo "container: $PASSED passed, $FAILED failed"
    [ "$FAILED" = 0 ]
}

case ${1:-} in
    build) shift; build "$@" ;;
    test) shift; test_image "$@" ;;
    *) die "usage: scripts/image.sh build|test [options] (see the top of this script)" ;;
esac
