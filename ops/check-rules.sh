#!/usr/bin/env bash
# Checks the Prometheus alerting rules: syntax (promtool check rules) and
# behaviour (promtool test rules with ops/mailmoat.rules.test.yml).
#
# Uses promtool from PATH when there is one. Otherwise takes it from Debian's
# `prometheus` package without installing that package (which would add a
# Prometheus server and start it): `apt-get download` + `dpkg-deb -x` into
# target/ops-tools/, reused by later runs.
set -euo pipefail
cd "$(dirname "$0")/.."

promtool=$(command -v promtool || true)
if [[ -z $promtool ]]; then
    promtool="$PWD/target/ops-tools/promtool"
    if [[ ! -x $promtool ]]; then
        echo "check-rules: fetching promtool from Debian's prometheus package" >&2
        work=$(mktemp -d)
        # apt fetches as its unprivileged _apt user, into the current directory
        if getent passwd _apt >/dev/null; then chown _apt "$work"; fi
        trap 'rm -rf "$work"' EXIT
        (
            cd "$work"
            if ! timeout 600 apt-get download -q prometheus >/dev/null; then
                timeout 600 apt-get update -q >/dev/null
                timeout 600 apt-get download -q prometheus >/dev/null
            fi
            dpkg-deb -x prometheus_*.deb root
        )
        mkdir -p "$(dirname "$promtool")"
        install -m 755 "$work/root/usr/bin/promtool" "$promtool"
    fi
fi
echo "check-rules: $("$promtool" --version 2>&1 | head -n1)" >&2

"$promtool" check rules ops/*.rules.yml
"$promtool" test rules ops/*.rules.test.yml
echo "check-rules: PASS"
