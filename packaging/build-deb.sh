#!/usr/bin/env bash
# Build fedge-agent_<version>_all.deb and fedge-coordinator_<version>_<arch>.deb with dpkg-deb.
#
# Usage: packaging/build-deb.sh OUTDIR
#   OUTDIR holds exactly one pure wheel, fedge-<version>-py3-none-any.whl, and at most one
#   wheel of the same version built for this platform with the coordinator's C kernel,
#   fedge-<version>-cp3*-<platform>.whl (`make dist` builds both into dist/ first). The
#   agent package ships the pure wheel (Architecture: all: one package for amd64 and arm64
#   devices); the coordinator package ships the platform wheel (Architecture: this
#   machine's, amd64 or arm64), or the pure one (all) when there is none. The packages are
#   written next to the wheels; running again overwrites them. Both packages install only
#   on amd64 and arm64 (their preinst checks): onnxruntime and torch have no wheels on
#   PyPI for other architectures, 32-bit ARM (armhf) included.
#
# Each package ships the wheel (/usr/share/fedge/wheels/<agent|coordinator>/), its systemd
# unit (/lib/systemd/system/), its example config as a conffile (/etc/fedge/), a wrapper
# (/usr/bin/fedge-<name>) and docs. Its preinst refuses architectures other than amd64 and
# arm64; its postinst creates the fedge user (and, for the agent, the fedge-clients group)
# and installs fedge[<agent|coordinator>] into /opt/fedge/venv with pip (see
# packaging/deb/postinst).
#
# Environment: DEBFULLNAME and DEBEMAIL set the Maintainer field; SOURCE_DATE_EPOCH, when
# set, fixes the timestamps inside the packages (reproducible builds).
set -euo pipefail

die() {
    echo "build-deb.sh: $*" >&2
    exit 1
}

[[ $# -eq 1 ]] || die "usage: $0 OUTDIR (a directory holding the fedge wheel)"
outdir=$1
[[ -d $outdir ]] || die "$outdir is not a directory"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (Debian/Ubuntu: apt-get install dpkg)"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")

shopt -s nullglob
wheels=("$outdir"/fedge-*-py3-none-any.whl)
platform_wheels=("$outdir"/fedge-*-cp3*-linux_*.whl)
shopt -u nullglob
if [[ ${#wheels[@]} -ne 1 ]]; then
    die "expected exactly one fedge-*-py3-none-any.whl in $outdir, found ${#wheels[@]}" \
        "${wheels[*]:-}"
fi
if [[ ${#platform_wheels[@]} -gt 1 ]]; then
    die "expected at most one platform wheel fedge-*-cp3*-linux_*.whl in $outdir," \
        "found ${#platform_wheels[@]}: ${platform_wheels[*]}"
fi
wheel=${wheels[0]}
wheel_name=$(basename "$wheel")
py_version=${wheel_name#fedge-}
py_version=${py_version%-py3-none-any.whl}

# The coordinator's wheel: the platform one (with the C kernel) when there is one.
coordinator_wheel=$wheel
coordinator_arch=all
if [[ ${#platform_wheels[@]} -eq 1 ]]; then
    coordinator_wheel=${platform_wheels[0]}
    platform_name=$(basename "$coordinator_wheel")
    [[ $platform_name == "fedge-$py_version-"* ]] ||
        die "the platform wheel $platform_name is not version $py_version"
    case $platform_name in
        *_x86_64.whl) coordinator_arch=amd64 ;;
        *_aarch64.whl) coordinator_arch=arm64 ;;
        *_armv7l.whl)
            die "$platform_name is for 32-bit ARM (armhf), where the coordinator cannot be" \
                "installed: torch and onnxruntime have no wheels for it. Build on amd64 or" \
                "arm64, or remove it from $outdir to package the pure wheel (Architecture: all)"
            ;;
        *) die "no Debian architecture known for $platform_name" ;;
    esac
fi

# PEP 440 -> Debian: pre-releases and dev releases sort before the release, which Debian
# spells with "~" (1.0rc1 -> 1.0~rc1, 1.0.dev2 -> 1.0~dev2); a local "+label" stays.
deb_version() {
    local public=${1%%+*} local_part=
    [[ $1 == *+* ]] && local_part=+${1#*+}
    [[ $public == *'!'* ]] && die "version epochs ($1) are not supported"
    public=$(sed -E 's/\.?(a|b|rc|dev)([0-9]+)/~\1\2/g' <<<"$public")
    printf '%s%s\n' "$public" "$local_part"
}
version=$(deb_version "$py_version")
[[ $version =~ ^[0-9][A-Za-z0-9.+~]*$ ]] || die "cannot turn wheel version $py_version into a Debian version"

maintainer="${DEBFULLNAME:-Fedge maintainers} <${DEBEMAIL:-fedge@localhost}>"
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT

# Fill @NAME@ placeholders in a template.
render() { # template dest mode name extra wheel-name arch
    sed -e "s|@PACKAGE@|fedge-$4|g" -e "s|@EXTRA@|$5|g" -e "s|@BIN@|fedge-$4|g" \
        -e "s|@VERSION@|$version|g" -e "s|@WHEEL@|$6|g" -e "s|@ARCH@|$7|g" "$1" >"$2"
    chmod "$3" "$2"
}

build_package() { # name (agent|coordinator), other package's name, one-line summary, description
    local name=$1 other=$2 summary=$3 description=$4
    local pkg=fedge-$name root=$staging/fedge-$name arch=all pkg_wheel=$wheel
    if [[ $name == coordinator ]]; then
        arch=$coordinator_arch pkg_wheel=$coordinator_wheel
    fi
    local pkg_wheel_name deb=$outdir/${pkg}_${version}_$arch.deb
    pkg_wheel_name=$(basename "$pkg_wheel")

    install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" \
        "$root/etc/fedge" "$root/usr/share/fedge/wheels/$name" "$root/usr/share/doc/$pkg"
    install -m 0644 "$pkg_wheel" "$root/usr/share/fedge/wheels/$name/$pkg_wheel_name"
    install -m 0644 "$repo/systemd/$pkg.service" "$root/lib/systemd/system/$pkg.service"
    install -m 0644 "$here/$name.toml" "$root/etc/fedge/$name.toml"
    render "$here/deb/wrapper" "$root/usr/bin/$pkg" 0755 "$name" "$name" "$pkg_wheel_name" "$arch"
    for doc in README.md docs/operations.md docs/configuration.md docs/architecture.md; do
        install -m 0644 "$repo/$doc" "$root/usr/share/doc/$pkg/$(basename "$doc")"
    done
    cat >"$root/usr/share/doc/$pkg/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: fedge

Files: *
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
    chmod 0644 "$root/usr/share/doc/$pkg/copyright"
    if [[ $name == coordinator ]]; then
        # The broker configuration, as an example: it needs certificates before it can run.
        install -d -m 0755 "$root/usr/share/fedge/mosquitto"
        install -m 0644 "$here/mosquitto/fedge.conf" "$here/mosquitto/fedge.acl" \
            "$root/usr/share/fedge/mosquitto/"
    fi

    local size
    size=$(du -sk --apparent-size --exclude=DEBIAN "$root" | cut -f1)
    cat >"$root/DEBIAN/control" <<CONTROL
Package: $pkg
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: python3 (>= 3.11), python3-venv
Breaks: fedge-$other (<< $version), fedge-$other (>> $version)
Section: net
Priority: optional
Description: $summary
$description
 .
 The Python code is installed at configure time into /opt/fedge/venv (shared by
 fedge-agent and fedge-coordinator, which must have the same version): fedge from
 the wheel shipped here, fedge[$name]'s dependencies with pip from PyPI, or from
 the index named by PIP_INDEX_URL / PIP_EXTRA_INDEX_URL when set. Only amd64 and
 arm64 machines are supported: PyPI has no onnxruntime for other architectures.
CONTROL
    echo "/etc/fedge/$name.toml" >"$root/DEBIAN/conffiles"
    for script in preinst postinst prerm postrm; do
        render "$here/deb/$script" "$root/DEBIAN/$script" 0755 "$name" "$name" \
            "$pkg_wheel_name" "$arch"
    done
    chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles"
    if [[ -n ${SOURCE_DATE_EPOCH:-} ]]; then
        find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    fi
    rm -f "$deb"
    dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
    built+=("$deb")
}

built=()
build_package agent coordinator \
    "Fedge edge agent: keeps a device online with a Fedge fleet" \
    " fedge-agent runs on each device of a Fedge (edge-cloud federated learning)
 fleet. Over one MQTT session (TLS or mutual TLS) it publishes a retained
 presence status with a Last Will, periodic health telemetry (CPU, memory, load),
 and answers commands from the coordinator. It runs as a systemd service
 (Type=notify, with a watchdog) under the fedge user."
build_package coordinator agent \
    "Fedge cloud coordinator: device registry and HTTP API for a Fedge fleet" \
    " fedge-coordinator runs in the cloud next to the fleet's MQTT broker. It keeps
 the device registry (presence and latest telemetry, in SQLite), counts rejected
 messages by reason, and serves /healthz, /metrics (Prometheus) and /v1/devices.
 An example Mosquitto configuration (mutual TLS, per-device ACL) is in
 /usr/share/fedge/mosquitto/.
 .
 fedge[coordinator] depends on torch. From PyPI on x86_64 pip installs the CUDA
 build; for a CPU-only host install with
 PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu set."

echo "build-deb.sh: built Debian packages $version from $wheel and $coordinator_wheel:"
for deb in "${built[@]}"; do
    printf '  %s (%s KiB)\n' "$deb" "$(( $(stat -c %s "$deb") / 1024 ))"
done
here_path() { [[ $1 == /* ]] && echo "$1" || echo "./$1"; }
echo "Install with: sudo apt-get install $(here_path "${built[0]}")  (or the coordinator's)"
