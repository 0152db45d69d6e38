#!/usr/bin/env bash
# Debian package check: build the .deb with cargo-deb, install it with
# dpkg -i, check what an operator gets, then purge it.
#
# Passes when the installed config passes `mailmoat check-config`, the
# "mailmoat" system user exists and owns /var/lib/mailmoat, the /etc files
# are conffiles, the unit is installed but not enabled, and the service
# user can read its config and lists and write its state directory. Purge
# must then leave no file behind.
#
# Run as root on Debian (installs cargo-deb, and adduser/binutils when
# missing). Refuses to run where a mailmoat package is already installed.
# The system user is removed at the end only if this script created it
# (the package itself keeps it on purge, as Debian does).
set -euo pipefail
cd "$(dirname "$0")/../.."

say() { echo "deb-check: $*" >&2; }
fail() {
    echo "deb-check: FAIL: $*"
    exit 1
}

[[ $(id -u) -eq 0 ]] || fail "must run as root (installs the package)"
export PATH="$PATH:/usr/sbin:/sbin:$HOME/.cargo/bin"

# "install ok installed", or "deinstall ok config-files" (removed, its
# conffiles kept): either way the purge at the end would destroy them.
if dpkg-query -W -f='${Status}' mailmoat 2>/dev/null | grep -qE ' (installed|config-files)$'; then
    fail "a mailmoat package (or its config files) is installed here; this check would replace it"
fi

# --- the packaged unit is ops/mailmoat.service with the package's paths ------
normalize_unit() {
    grep -v -e '^#' -e '^$' -e '^DynamicUser=' -e '^User=' -e '^Group=' "$1" |
        sed 's|/usr/local/bin/|/usr/bin/|g'
}
if ! drift=$(diff <(normalize_unit ops/mailmoat.service) <(normalize_unit ops/debian/mailmoat.service)); then
    fail "ops/debian/mailmoat.service drifted from ops/mailmoat.service (beyond paths and the user):
$drift"
fi

# --- tools -------------------------------------------------------------------
missing=()
command -v adduser >/dev/null || missing+=(adduser)
command -v objcopy >/dev/null || missing+=(binutils) # separate debug symbols
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; then
        timeout 600 apt-get update -q >/dev/null
        timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi
if ! cargo deb --version >/dev/null 2>&1; then
    say "installing cargo-deb"
    timeout 1200 cargo install cargo-deb --locked --version '^3.8' --quiet
fi

# --- build -------------------------------------------------------------------
say "building the package ($(cargo deb --version))"
deb=$(cargo deb --quiet | tail -n1)
[[ -f $deb ]] || fail "cargo deb printed no package path (got '$deb')"
say "built $deb"

# --- install -----------------------------------------------------------------
user_existed=0
getent passwd mailmoat >/dev/null && user_existed=1
installed=0
cleanup() {
    set +e
    if ((installed)); then
        dpkg --purge mailmoat >/dev/null
    fi
    if ((!user_existed)) && getent passwd mailmoat >/dev/null; then
        deluser --system --quiet mailmoat >/dev/null 2>&1
        getent group mailmoat >/dev/null && delgroup --system --quiet mailmoat >/dev/null 2>&1
    fi
}
trap cleanup EXIT

installed=1
dpkg -i "$deb" >/tmp/mailmoat-deb-check.log 2>&1 ||
    fail "dpkg -i: $(cat /tmp/mailmoat-deb-check.log)"
rm -f /tmp/mailmoat-deb-check.log

# --- what the operator gets --------------------------------------------------
[[ -x /usr/bin/mailmoat ]] || fail "no /usr/bin/mailmoat"
checked=$(/usr/bin/mailmoat check-config -c /etc/mailmoat/mailmoat.toml 2>&1 >/dev/null) ||
    fail "mailmoat check-config rejects the installed /etc/mailmoat/mailmoat.toml: $checked"
say "$(/usr/bin/mailmoat --version): check-config accepts /etc/mailmoat/mailmoat.toml"

id mailmoat >/dev/null 2>&1 || fail "no mailmoat user"
[[ $(getent passwd mailmoat | cut -d: -f7) == */nologin ]] || fail "the mailmoat user has a login shell"
owner=$(stat -c '%U:%G %a' /var/lib/mailmoat) || fail "no /var/lib/mailmoat"
[[ $owner == "mailmoat:mailmoat 750" ]] || fail "/var/lib/mailmoat is $owner, want mailmoat:mailmoat 750"
say "user $(id mailmoat); /var/lib/mailmoat $owner"

conffiles=$(dpkg-query -W -f='${Conffiles}' mailmoat)
for f in /etc/mailmoat/mailmoat.toml /etc/mailmoat/blocklist.txt /etc/mailmoat/allowlist.txt; do
    [[ -f $f ]] || fail "$f not installed"
    grep -q " $f " <<<"$conffiles" || fail "$f is not a conffile"
done

unit=/usr/lib/systemd/system/mailmoat.service
[[ -f $unit ]] || unit=/lib/systemd/system/mailmoat.service
[[ -f $unit ]] || fail "no systemd unit installed"
grep -q '^ExecStart=/usr/bin/mailmoat run -c /etc/mailmoat/mailmoat.toml$' "$unit" ||
    fail "$unit does not run /usr/bin/mailmoat with /etc/mailmoat/mailmoat.toml"
grep -q '^User=mailmoat$' "$unit" || fail "$unit does not run as the mailmoat user"
if [[ -e /etc/systemd/system/multi-user.target.wants/mailmoat.service ]]; then
    fail "the package enabled mailmoat.service: it would take port 25 before the receiver moved"
fi
# systemd-analyze exits 0 on unknown keys and the like; any output is a finding.
if command -v systemd-analyze >/dev/null; then
    verify=$(systemd-analyze verify "$unit" 2>&1) || fail "systemd-analyze verify $unit: $verify"
    [[ -z $verify ]] || fail "systemd-analyze verify $unit: $verify"
fi

# The service user reads its config and lists (no warning: every list
# parses) and writes its state directory.
warnings=$(runuser -u mailmoat -- /usr/bin/mailmoat blocklist check 192.0.2.7 \
    -c /etc/mailmoat/mailmoat.toml 2>&1 >/dev/null) ||
    fail "mailmoat blocklist check as the mailmoat user: $warnings"
[[ -z $warnings ]] || fail "the installed lists, read as the mailmoat user, give warnings: $warnings"
runuser -u mailmoat -- touch /var/lib/mailmoat/.deb-check ||
    fail "the mailmoat user cannot write /var/lib/mailmoat"

# --- purge leaves nothing -----------------------------------------------------
dpkg --purge mailmoat >/dev/null || fail "dpkg --purge mailmoat"
installed=0
for f in /usr/bin/mailmoat /etc/mailmoat /var/lib/mailmoat "$unit"; do
    [[ ! -e $f ]] || fail "$f left behind by dpkg --purge"
done

echo "deb-check: PASS ($(basename "$deb"): installed, check-config OK, user and state directory set, purged clean)"
