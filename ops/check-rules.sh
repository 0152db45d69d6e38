#!/usr/bin/env bash
# Checks the Prometheus alerting rules: syntax (promtool check rules) and
# behaviour (promtool test rules with ops/mailmoat.rules.test.yml); and that
# every mailmoat_* metric the rules and the Grafana dashboard query is one
# the code registers (a renamed metric otherwise leaves a silent alert or an
# empty panel).
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

# Metric names are registered as whole string literals ("mailmoat_x_total")
# under src/; a histogram's series add _bucket, _sum and _count.
queried=$(grep -ohE '\bmailmoat_[a-z0-9_]+' ops/*.rules.yml ops/grafana/*.json |
    sed -E 's/_(bucket|sum|count)$//' | sort -u)
registered=$(grep -rhoE '"mailmoat_[a-z0-9_]+"' src --include='*.rs' | tr -d '"' | sort -u)
unknown=$(comm -23 <(echo "$queried") <(echo "$registered"))
if [[ -n $unknown ]]; then
    echo "check-rules: FAIL: ops/*.rules.yml or ops/grafana/*.json query metrics no code under src/ registers (renamed or removed? see docs/metrics.md):" >&2
    echo "$unknown" | sed 's/^/  /' >&2
    exit 1
fi
echo "check-rules: PASS"
