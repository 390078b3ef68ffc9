#!/usr/bin/env bash
# Installs mededge as a systemd service on one box: a dedicated user, the data and config
# directories, a virtual environment under /opt/mededge, and the hardened unit.
# Idempotent: run it again to upgrade the code; existing config and data are never touched.
#
#   sudo deploy/systemd/install.sh [--extras LIST] [--no-start]
#
# Options:
#   --extras LIST   pip extras to install (default: edge; e.g. "edge,tensorrt")
#   --pip-args ARGS extra arguments for pip, e.g. "--no-index --find-links /media/wheels"
#   --no-start      install and enable, but do not (re)start the service
#   --destdir DIR   stage every file under DIR instead of / (packaging, tests): no user is
#                   created, no ownership changed, systemctl not called
#   --no-venv       do not create or update the virtual environment
set -euo pipefail

SOURCE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PREFIX=/opt/mededge
DATA_DIR=/var/lib/mededge
CONF_DIR=/etc/mededge
UNIT_DIR=/etc/systemd/system
SERVICE_USER=mededge
PYTHON="${PYTHON:-python3}"
EXTRAS=edge
PIP_ARGS=""
START=1
VENV=1
DESTDIR=""

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --extras) EXTRAS="$2"; shift 2 ;;
        --pip-args) PIP_ARGS="$2"; shift 2 ;;
        --no-start) START=0; shift ;;
        --destdir) DESTDIR="$(realpath -m "$2")"; shift 2 ;;
        --no-venv) VENV=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
done

log() { echo "install.sh: $*"; }

if [[ -z "$DESTDIR" && "$(id -u)" -ne 0 ]]; then
    echo "install.sh: run as root (or use --destdir DIR to stage)" >&2
    exit 1
fi

# 1. The service user: a system account with no login shell and no home of its own.
if [[ -z "$DESTDIR" ]] && ! getent passwd "$SERVICE_USER" >/dev/null; then
    log "creating system user $SERVICE_USER"
    useradd --system --user-group --home-dir "$DATA_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "mededge service" "$SERVICE_USER"
fi
# Access to the GPU device nodes where the distribution gives them a group.
if [[ -z "$DESTDIR" ]]; then
    for group in video render; do
        if getent group "$group" >/dev/null; then
            usermod --append --groups "$group" "$SERVICE_USER"
        fi
    done
fi

# 2. Directories: code (root-owned, read-only to the service), config (readable by the
#    service), data (the only place it writes).
install -d -m 0755 "$DESTDIR$PREFIX"
install -d -m 0750 "$DESTDIR$CONF_DIR"
install -d -m 0750 "$DESTDIR$DATA_DIR" "$DESTDIR$DATA_DIR/models"
install -d -m 0755 "$DESTDIR$UNIT_DIR"
if [[ -z "$DESTDIR" ]]; then
    chown "root:$SERVICE_USER" "$CONF_DIR"
    chown "$SERVICE_USER:$SERVICE_USER" "$DATA_DIR" "$DATA_DIR/models"
fi

# 3. Config: installed once from the example; an existing file is the site's and stays.
if [[ ! -e "$DESTDIR$CONF_DIR/mededge.yaml" ]]; then
    log "installing $CONF_DIR/mededge.yaml (edit it: destinations, peers)"
    install -m 0640 "$SOURCE_DIR/deploy/mededge.example.yaml" "$DESTDIR$CONF_DIR/mededge.yaml"
    if [[ -z "$DESTDIR" ]]; then
        chown "root:$SERVICE_USER" "$CONF_DIR/mededge.yaml"
    fi
fi
install -d -m 0755 "$DESTDIR$PREFIX/deploy"
install -m 0644 "$SOURCE_DIR/deploy/README.md" "$DESTDIR$PREFIX/deploy/README.md"

# 4. The virtual environment; re-running upgrades mededge in place.
if [[ "$VENV" -eq 1 ]]; then
    if [[ ! -x "$DESTDIR$PREFIX/venv/bin/python" ]]; then
        log "creating $PREFIX/venv with $PYTHON"
        # JetPack's TensorRT Python bindings live in the system site-packages.
        "$PYTHON" -m venv --system-site-packages "$DESTDIR$PREFIX/venv"
    fi
    log "installing mededge[$EXTRAS] from $SOURCE_DIR"
    # shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
    "$DESTDIR$PREFIX/venv/bin/pip" install --quiet $PIP_ARGS "$SOURCE_DIR[$EXTRAS]"
fi

# 5. The unit, with this installation's paths.
sed -e "s#/opt/mededge#$PREFIX#g" -e "s#/var/lib/mededge#$DATA_DIR#g" \
    -e "s#/etc/mededge#$CONF_DIR#g" -e "s#^User=.*#User=$SERVICE_USER#" \
    -e "s#^Group=.*#Group=$SERVICE_USER#" \
    "$SOURCE_DIR/deploy/systemd/mededge.service" > "$DESTDIR$UNIT_DIR/mededge.service.new"
chmod 0644 "$DESTDIR$UNIT_DIR/mededge.service.new"
mv -f "$DESTDIR$UNIT_DIR/mededge.service.new" "$DESTDIR$UNIT_DIR/mededge.service"

if [[ -n "$DESTDIR" ]]; then
    log "staged under $DESTDIR"
    exit 0
fi
systemctl daemon-reload
systemctl enable mededge.service
if [[ "$START" -eq 1 ]]; then
    systemctl restart mededge.service
    log "started; follow with: journalctl -fu mededge"
else
    log "installed; start with: systemctl start mededge"
fi
