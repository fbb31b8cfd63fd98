#!/usr/bin/env bash
# Install callbridge as a systemd service from this checkout. Run as root; safe to run again
# (upgrades the code and the venv, never touches an existing /etc/callbridge/callbridge.toml).
#
#   sudo scripts/install.sh [--prefix DIR] [--python PYTHON] [--no-enable] [--dry-run]
#   scripts/install.sh --print-config   (the config a new install writes, on stdout; compare yours)
#
# What it does:
#   1. system user and group "callbridge" (no login, no home)
#   2. copies the project to PREFIX (default /opt/callbridge), makes PREFIX/.venv, pip install .
#   3. /var/lib/callbridge/{media,recordings} (the unit's StateDirectory) and /etc/callbridge
#   4. /etc/callbridge/callbridge.toml from scripts/callbridge.toml.example, mode 0640, if absent,
#      with state_dir set to /var/lib/callbridge (operator commands then use the service's store)
#   5. adds the "freeswitch" user (if any) to the callbridge group, so FreeSWITCH reads media and
#      writes recordings in /var/lib/callbridge
#   6. the unit to /etc/systemd/system, daemon-reload, enable (start it yourself)
set -euo pipefail

PREFIX=/opt/callbridge
PYTHON=python3
DRY_RUN=0
ENABLE=1
NAME=callbridge
CONF_DIR=/etc/callbridge
CONF_FILE=$CONF_DIR/callbridge.toml
STATE_DIR=/var/lib/callbridge
UNIT_DIR=/etc/systemd/system
# FreeSWITCH's Event Socket config, read for its password (FS_CONF=... for a FreeSWITCH installed elsewhere).
FS_CONF=${FS_CONF:-/etc/freeswitch/autoload_configs/event_socket.conf.xml}
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# The config a new install writes: the example with state_dir pinned to the unit's StateDirectory
# (a command run outside the unit has no $STATE_DIRECTORY, and "" would mean ./state: another store),
# and FreeSWITCH's own Event Socket password when its config holds a plain one.
render_config() {
    local password="" edits
    if [ -r "$FS_CONF" ]; then
        password=$(sed -n 's/.*name="password"[[:space:]]*value="\([^"]*\)".*/\1/p' "$FS_CONF" | head -n 1)
    fi
    edits=(-e "s#^state_dir = \"\"\$#state_dir = \"$STATE_DIR\"#")
    if [ -n "$password" ] && [[ "$password" =~ ^[A-Za-z0-9._~+-]+$ ]]; then
        edits+=(-e "s/^password = \"ClueCon\"\$/password = \"$password\"/")
        case "$password" in
            ClueCon|CHANGE_ME*)
                echo "    warning: FreeSWITCH's Event Socket password in $FS_CONF is still '$password';" \
                    "set a secret one there and as [esl] password in $CONF_FILE" >&2 ;;
        esac
    else
        echo "    note: set [esl] password in $CONF_FILE to FreeSWITCH's event_socket password" >&2
    fi
    sed "${edits[@]}" "$SRC/scripts/callbridge.toml.example"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        --no-enable) ENABLE=0; shift ;;
        --dry-run|-n) DRY_RUN=1; shift ;;
        --print-config) render_config; exit 0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$PREFIX" in
    /*) PREFIX=${PREFIX%/} ;;
    *) echo "install.sh: --prefix must be an absolute path, got $PREFIX" >&2; exit 2 ;;
esac

say() { printf '==> %s\n' "$*"; }
# Run a command, or only show it with --dry-run.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '    would run:'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

if [ "$DRY_RUN" = 1 ]; then
    say "dry run: nothing is changed"
elif [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (sudo $0), or use --dry-run to see what it would do" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "install.sh: $PYTHON is missing or older than Python 3.11 (use --python)" >&2
    exit 1
fi
umask 022

say "1. user and group $NAME"
if getent group "$NAME" >/dev/null; then
    echo "    group $NAME exists"
else
    run groupadd --system "$NAME"
fi
if getent passwd "$NAME" >/dev/null; then
    echo "    user $NAME exists"
else
    run useradd --system --gid "$NAME" --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "callbridge daemon" "$NAME"
fi

say "2. code in $PREFIX, venv in $PREFIX/.venv"
run install -d -m 0755 "$PREFIX"
if [ "$SRC" != "$PREFIX" ]; then
    # Replace the packages whole, so modules deleted upstream do not linger.
    for dir in daemon webapi freeswitch scripts; do
        run rm -rf "${PREFIX:?}/$dir"
    done
    if [ "$DRY_RUN" = 1 ]; then
        echo "    would copy $SRC to $PREFIX (without .git, .venv, state, caches)"
    else
        tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./state --exclude=./.state \
            --exclude='*.egg-info' --exclude=__pycache__ --exclude=./build --exclude=./.pytest_cache \
            --exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.hypothesis -cf - . \
            | tar -C "$PREFIX" --no-same-owner -xf -
    fi
fi
VERSION='import sys; print("%d.%d" % sys.version_info[:2])'
if [ -x "$PREFIX/.venv/bin/python" ] \
        && [ "$("$PREFIX/.venv/bin/python" -c "$VERSION")" = "$("$PYTHON" -c "$VERSION")" ]; then
    echo "    venv exists"
else
    # None yet, or one made with another Python than --python names: made (again) with that one.
    run rm -rf "${PREFIX:?}/.venv"
    run "$PYTHON" -m venv "$PREFIX/.venv"
fi
run "$PREFIX/.venv/bin/python" -m pip install --quiet --upgrade pip
# pip builds in PREFIX/build: left from the last install, it would carry modules deleted upstream along.
run rm -rf "${PREFIX:?}/build"
run "$PREFIX/.venv/bin/python" -m pip install --quiet "$PREFIX"
# The service runs from PREFIX on a read-only file system: compile now, or Python recompiles every start.
run "$PREFIX/.venv/bin/python" -m compileall -q "$PREFIX/daemon" "$PREFIX/webapi" "$PREFIX/freeswitch"
# Spoken messages use the libespeak-ng bundled with the package (tts_engine = "bundled", the default); the
# system's espeak-ng is needed only with tts_engine = "espeak-ng".
if ! command -v espeak-ng >/dev/null 2>&1; then
    echo "    note: no system espeak-ng; spoken messages use the bundled one (tts_engine = \"espeak-ng\" would need apt-get install espeak-ng)"
fi

say "3. folders: $STATE_DIR (state), $CONF_DIR (config)"
# 0750: the callbridge group (FreeSWITCH) may enter and read media. recordings is 2770: FreeSWITCH
# writes the recordings there, and setgid keeps them in the callbridge group so the API can serve them.
run install -d -o "$NAME" -g "$NAME" -m 0750 "$STATE_DIR" "$STATE_DIR/media"
run install -d -o "$NAME" -g "$NAME" -m 2770 "$STATE_DIR/recordings"
run install -d -o root -g "$NAME" -m 0750 "$CONF_DIR"

say "4. config $CONF_FILE"
if [ -e "$CONF_FILE" ]; then
    echo "    $CONF_FILE exists: kept as it is (compare with: scripts/install.sh --print-config)"
    if grep -qx 'state_dir = ""' "$CONF_FILE" 2>/dev/null; then
        echo "    note: set state_dir = \"$STATE_DIR\" in it, or commands run outside the unit use ./state"
    fi
else
    if [ "$DRY_RUN" = 1 ]; then
        echo "    would write $CONF_FILE (root:$NAME, mode 0640): scripts/install.sh --print-config shows it"
    else
        tmp=$(mktemp)
        trap 'rm -f "$tmp"' EXIT
        render_config >"$tmp"
        install -o root -g "$NAME" -m 0640 "$tmp" "$CONF_FILE"
    fi
fi

say "5. FreeSWITCH access to media and recordings"
if getent passwd freeswitch >/dev/null; then
    if id -nG freeswitch | tr ' ' '\n' | grep -qx "$NAME"; then
        echo "    freeswitch is in group $NAME"
    else
        run usermod -a -G "$NAME" freeswitch
        echo "    restart FreeSWITCH so it gets the new group: systemctl restart freeswitch"
    fi
else
    echo "    no freeswitch user here (FreeSWITCH on another host: use media_mode = \"http\")"
fi

say "6. systemd unit $UNIT_DIR/$NAME.service"
if [ "$DRY_RUN" = 1 ]; then
    echo "    would install scripts/callbridge.service with /opt/callbridge replaced by $PREFIX (mode 0644)"
else
    sed "s#/opt/callbridge#$PREFIX#g" "$SRC/scripts/callbridge.service" >"$UNIT_DIR/$NAME.service.tmp"
    chmod 0644 "$UNIT_DIR/$NAME.service.tmp"
    mv -f "$UNIT_DIR/$NAME.service.tmp" "$UNIT_DIR/$NAME.service"
fi
if command -v systemctl >/dev/null 2>&1; then
    run systemctl daemon-reload
    if [ "$ENABLE" = 1 ]; then
        run systemctl enable "$NAME"
    fi
else
    echo "    systemctl not found: run 'systemctl daemon-reload && systemctl enable $NAME' on the target"
fi

if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$NAME" 2>/dev/null; then
    # Not restarted here: the operator picks the moment (calls in FreeSWITCH go on, and the new start
    # takes them over; only new requests wait for the few seconds of the restart).
    echo "    $NAME is running the previous version: restart it to run this one (systemctl restart $NAME)"
fi
say "done. Next: edit $CONF_FILE, then: systemctl start $NAME; journalctl -u $NAME -f"
echo "    add an endpoint: sudo -u $NAME $PREFIX/.venv/bin/python -m daemon --config $CONF_FILE endpoint add ..."
