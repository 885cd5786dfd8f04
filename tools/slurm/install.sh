#!/usr/bin/env bash
# Install the Debian packages behind the local test Slurm cluster (slurm_cluster.py beside this).
#
# Idempotent: when every package is already installed it only says so and exits (well under a
# second). Needs root and apt (Debian/Ubuntu). Exit codes: 0 ok, 2 cannot install here (not root,
# no apt-get), 1 apt failed.
#
# Package maintainer scripts are kept from starting services (there is no systemd here, and the
# test harness starts every daemon itself with a private config) by a policy-rc.d that exits 101;
# any policy-rc.d that was already there is put back afterwards.
set -euo pipefail

PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

say() { echo "[slurm-install] $*"; }

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == installed ]] || missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
    say "already installed: ${PACKAGES[*]}"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    say "cannot install ${missing[*]}: needs root (running as $(id -un))" >&2
    exit 2
fi
if ! command -v apt-get >/dev/null 2>&1; then
    say "cannot install ${missing[*]}: apt-get not found (not a Debian-like system)" >&2
    exit 2
fi

POLICY=/usr/sbin/policy-rc.d
BACKUP=""
if [[ -e $POLICY ]]; then
    BACKUP=$(mktemp /usr/sbin/policy-rc.d.llmpipe-backup.XXXXXX)
    cp -p "$POLICY" "$BACKUP"
fi
restore_policy() {
    if [[ -n $BACKUP ]]; then
        mv -f "$BACKUP" "$POLICY"
    else
        rm -f "$POLICY"
    fi
}
trap restore_policy EXIT
printf '#!/bin/sh\n# written by tools/slurm/install.sh: do not start services\nexit 101\n' >"$POLICY"
chmod 755 "$POLICY"
say "policy-rc.d installed: package scripts will not start services"

export DEBIAN_FRONTEND=noninteractive
apt_install() {
    apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# Refresh the package lists only when needed: none at all, or a package without an install
# candidate; a failed install (stale lists pointing at removed .debs) is retried once after one.
needs_update=0
if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    needs_update=1
else
    for pkg in "${missing[@]}"; do
        cand=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
        if [[ -z $cand || $cand == "(none)" ]]; then
            needs_update=1
            break
        fi
    done
fi
if ((needs_update)); then
    say "apt-get update (package lists missing or lack ${missing[*]})"
    apt-get update -q
fi

say "apt-get install ${missing[*]}"
if ! apt_install; then
    if ((needs_update)); then
        exit 1
    fi
    say "install failed; retrying once after apt-get update"
    apt-get update -q
    apt_install
fi
say "installed: $(dpkg-query -W -f='${Package} ${Version}\n' "${PACKAGES[@]}" | tr '\n' ' ')"
