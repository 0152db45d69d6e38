#!/usr/bin/env bash
# Dovecot interop test: a real Dovecot behind mailmoat over IMAP and POP3,
# with PROXY v2.
#
#   client (127.0.0.21) -> mailmoat [[listener]] protocol = "imap",
#       tls = "starttls" (mailmoat terminates STARTTLS) -> PROXY v2
#       -> Dovecot imap-login, haproxy = yes
#   client (127.0.0.22) -> mailmoat [[listener]] protocol = "pop3"
#       -> PROXY v2 -> Dovecot pop3-login, haproxy = yes
#
# First Dovecot alone (a direct IMAP and POP3 login, and its haproxy
# listener fed a PROXY v2 header by hand), so a failure there is told apart
# from one in mailmoat. Then through mailmoat. Passes when:
# - a correct IMAP login inside STARTTLS reads the mailbox's one message,
#   and a correct POP3 login RETRs it;
# - Dovecot logged those logins with the real clients (rip=127.0.0.21,
#   rip=127.0.0.22), never a login from mailmoat's own 127.0.0.1;
# - a brute force from 127.0.0.23 (parallel connections, distinct wrong
#   passwords, more than autoban.auth_failures) reaches Dovecot, which logs
#   the failures for 127.0.0.23, and gets that client banned: its next
#   connection is refused, /admin/bans lists it, mailmoat_logins_total
#   counts the failures; a correct login from another address still works.
#
# Run as root (it installs Debian's dovecot-imapd, dovecot-pop3d and
# openssl when missing; python3 drives the clients). Nothing is skipped: a
# missing piece fails.
#
# The Dovecot instance is private: its own config, base_dir, state_dir, log
# and mail under a temp dir, listening on free loopback ports. The system
# Dovecot (if any) is never touched, and no packet leaves loopback. Every
# wait is bounded.
#
# Environment: KEEP=1 keeps the temp dir (logs, configs) after a pass too;
# DOVECOT_ONLY=1 stops after the Dovecot-alone checks (to debug its config).
set -euo pipefail
cd "$(dirname "$0")/../.."
here=$PWD/ops/interop

WAIT=30 # seconds, for every poll below

say() { echo "dovecot-interop: $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    echo "dovecot-interop: FAIL: must run as root (runs a Dovecot instance)"
    exit 1
fi
export PATH="$PATH:/usr/sbin:/sbin"

# --- packages ---------------------------------------------------------------
missing=()
[[ -x /usr/sbin/dovecot ]] || missing+=(dovecot-core)
[[ -x /usr/lib/dovecot/imap ]] || missing+=(dovecot-imapd)
[[ -x /usr/lib/dovecot/pop3 ]] || missing+=(dovecot-pop3d)
command -v openssl >/dev/null || missing+=(openssl)
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; then
        timeout 600 apt-get update -q >/dev/null
        timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi
command -v python3 >/dev/null || {
    echo "dovecot-interop: FAIL: python3 (the IMAP and POP3 clients) is missing"
    exit 1
}
# The users Debian's dovecot-core creates: login processes and internal
# services run as them.
getent passwd dovenull >/dev/null && getent passwd dovecot >/dev/null || {
    echo "dovecot-interop: FAIL: the dovecot package did not create the dovecot and dovenull users"
    exit 1
}
dovecot_version=$(dovecot --version)
say "Dovecot $dovecot_version, $(python3 --version)"

# --- build mailmoat -----------------------------------------------------------
say "building mailmoat (release)"
cargo build --release --quiet --bin mailmoat
mailmoat="${CARGO_TARGET_DIR:-target}/release/mailmoat"
[[ -x $mailmoat ]] || { echo "dovecot-interop: FAIL: no binary at $mailmoat"; exit 1; }

# --- temp dir, ports, cleanup ----------------------------------------------------
tmp=$(mktemp -d /tmp/mailmoat-dovecot.XXXXXX)
chmod 755 "$tmp" # Dovecot's users must reach the passwd file and the mail
dc="$tmp/dovecot.conf"
: >"$tmp/dovecot.log"
mailmoat_pid=""
dovecot_started=0
passed=0

cleanup() {
    set +e
    if ((dovecot_started)); then
        # `stop` signals the master named in this instance's base_dir; make
        # sure it is gone (its pid file may outlive it, so check the pid
        # still belongs to a Dovecot master).
        local mpid
        mpid=$(cat "$tmp/run/master.pid" 2>/dev/null)
        timeout "$WAIT" dovecot -c "$dc" stop >/dev/null 2>&1
        if [[ -n $mpid ]]; then
            for _ in $(seq 50); do [[ -d /proc/$mpid ]] || break; sleep 0.1; done
            if [[ $(cat "/proc/$mpid/comm" 2>/dev/null) == dovecot ]]; then
                kill -KILL "$mpid"
            fi
        fi
    fi
    if [[ -n $mailmoat_pid ]] && kill -0 "$mailmoat_pid" 2>/dev/null; then
        kill -TERM "$mailmoat_pid"
        for _ in $(seq 50); do kill -0 "$mailmoat_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$mailmoat_pid" 2>/dev/null
        wait "$mailmoat_pid" 2>/dev/null
    fi
    if ((passed)) && [[ -z ${KEEP:-} ]]; then
        rm -rf "$tmp"
    else
        say "kept $tmp (dovecot.log, mailmoat.log, configs, tls/)"
    fi
}
trap cleanup EXIT

fail() {
    echo "dovecot-interop: FAIL: $*"
    for f in mailmoat.log dovecot.log; do
        if [[ -s $tmp/$f ]]; then
            echo "----- $f (last 40 lines)"
            tail -n 40 "$tmp/$f"
        fi
    done
    exit 1
}

# Is anything listening on TCP port $1 (any address)? /proc, so no iproute2.
listening() {
    local hex f tables=()
    hex=$(printf ':%04X' "$1")
    for f in /proc/net/tcp /proc/net/tcp6; do [[ -r $f ]] && tables+=("$f"); done
    awk -v p="$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { found = 1 } END { exit !found }' \
        "${tables[@]}"
}
# A port nobody listens on, below the usual ephemeral range (32768-60999) so
# no outgoing connection takes it in the meantime.
taken=()
free_port() {
    local p
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 12000))
        [[ " ${taken[*]} " == *" $p "* ]] && continue
        listening "$p" && continue
        echo "$p"
        return
    done
}
# Dovecot: IMAP and POP3 behind mailmoat (haproxy = yes), and direct.
dv_imap=$(free_port) && taken+=("$dv_imap")
dv_pop3=$(free_port) && taken+=("$dv_pop3")
dv_imap_direct=$(free_port) && taken+=("$dv_imap_direct")
dv_pop3_direct=$(free_port) && taken+=("$dv_pop3_direct")
mm_imap=$(free_port) && taken+=("$mm_imap")
mm_pop3=$(free_port) && taken+=("$mm_pop3")
admin_port=$(free_port)
[[ -n $dv_imap && -n $dv_pop3 && -n $dv_imap_direct && -n $dv_pop3_direct && -n $mm_imap &&
    -n $mm_pop3 && -n $admin_port ]] || fail "no free loopback ports found"

wait_for() { # wait_for WHAT COMMAND...: poll for up to $WAIT seconds
    local what=$1 deadline=$((SECONDS + WAIT))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || fail "timed out after ${WAIT}s waiting for $what"
        sleep 0.2
    done
}

client() { # client COMMAND ARGS...: ops/interop/dovecot_client.py, bounded
    timeout 120 python3 "$here/dovecot_client.py" "$@"
}

# --- a CA and mailmoat's certificate, ECDSA P-256 ----------------------------------
# The clients verify it: the CA, and 127.0.0.1 (the address they dial) as
# a name.
tls="$tmp/tls"
mkdir -p "$tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=mailmoat interop CA" -keyout "$tls/ca.key" -out "$tls/ca.pem" \
    >"$tls/openssl.log" 2>&1 || fail "openssl (CA): $(cat "$tls/openssl.log")"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=moat.interop.test" -keyout "$tls/mailmoat.key" -out "$tls/mailmoat.csr" \
    >"$tls/openssl.log" 2>&1 &&
    printf 'subjectAltName=DNS:moat.interop.test,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
        >"$tls/mailmoat.ext" &&
    openssl x509 -req -in "$tls/mailmoat.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
        -CAcreateserial -days 2 -extfile "$tls/mailmoat.ext" -out "$tls/mailmoat.pem" \
        >>"$tls/openssl.log" 2>&1 || fail "openssl (mailmoat): $(cat "$tls/openssl.log")"
chmod 600 "$tls/mailmoat.key"

# --- private Dovecot -------------------------------------------------------------
# One user with a known password, and a Maildir holding one message. Mail
# processes run as nobody (a uid over first_valid_uid, owning nothing else).
password="correct horse battery staple"
subject="mailmoat interop $(date +%s)"
printf 'alice:{PLAIN}%s::::::\n' "$password" >"$tmp/passwd"
chmod 644 "$tmp/passwd" # the auth process runs as dovecot
mkdir -p "$tmp/run" "$tmp/state" "$tmp/mail/alice/"{new,cur,tmp}
printf 'From: bob@example.org\r\nTo: alice@interop.test\r\nSubject: %s\r\nMessage-ID: <1@interop.test>\r\n\r\nRelayed by mailmoat.\r\n' \
    "$subject" >"$tmp/mail/alice/new/1700000000.M1P1.interop"
chown -R nobody:nogroup "$tmp/mail"

cat >"$dc" <<CONF
# Private Dovecot instance for mailmoat's interop test (generated). Not the
# system's: nothing from /etc/dovecot is included.
instance_name = mailmoat-interop
base_dir = $tmp/run
state_dir = $tmp/state
protocols = imap pop3
listen = 127.0.0.1
log_path = $tmp/dovecot.log
# Logs each failed login with its client (rip=) and the reason.
auth_verbose = yes
# mailmoat terminates the clients' TLS and relays in the clear on loopback.
ssl = no
disable_plaintext_auth = no
# Trust mailmoat's PROXY v2 header: the client in it is the one logged and
# the one auth_penalty applies to.
haproxy_trusted_networks = 127.0.0.0/8
mail_location = maildir:$tmp/mail/%u
passdb {
  driver = passwd-file
  args = scheme=PLAIN $tmp/passwd
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=$tmp/mail/%u
}
service imap-login {
  inet_listener imap {
    port = $dv_imap
    haproxy = yes
  }
  inet_listener imap_direct {
    port = $dv_imap_direct
  }
  inet_listener imaps {
    port = 0
  }
}
service pop3-login {
  inet_listener pop3 {
    port = $dv_pop3
    haproxy = yes
  }
  inet_listener pop3_direct {
    port = $dv_pop3_direct
  }
  inet_listener pop3s {
    port = 0
  }
}
CONF

say "starting Dovecot on 127.0.0.1:$dv_imap (IMAP), :$dv_pop3 (POP3), haproxy = yes (config $dc)"
dovecot -c "$dc" -n >"$tmp/dovecot-check.log" 2>&1 ||
    fail "dovecot -n: $(cat "$tmp/dovecot-check.log")"
dovecot_started=1
timeout "$WAIT" dovecot -c "$dc" >"$tmp/dovecot-start.log" 2>&1 ||
    fail "dovecot start: $(cat "$tmp/dovecot-start.log")"
for port in "$dv_imap" "$dv_pop3" "$dv_imap_direct" "$dv_pop3_direct"; do
    wait_for "Dovecot to listen on $port" listening "$port"
done

in_log() { grep -qE "$1" "$tmp/dovecot.log"; }

# --- Dovecot alone -------------------------------------------------------------------
say "Dovecot alone: IMAP and POP3 logins, and its haproxy listener"
client imap --port "$dv_imap_direct" --source 127.0.0.11 --password "$password" \
    --subject "$subject" || fail "direct IMAP login to Dovecot"
client pop3 --port "$dv_pop3_direct" --source 127.0.0.12 --password "$password" \
    --subject "$subject" || fail "direct POP3 login to Dovecot"
client imap --port "$dv_imap" --source 127.0.0.1 --claim 127.0.0.13 --password "$password" \
    --subject "$subject" || fail "IMAP login to Dovecot's haproxy listener with a PROXY v2 header made by hand"
wait_for "Dovecot to log the login of 127.0.0.13 from the PROXY header" \
    in_log "imap-login: Info: Login: user=<alice>, .*rip=127\.0\.0\.13,"

if [[ -n ${DOVECOT_ONLY:-} ]]; then
    passed=1
    say "PASS (Dovecot alone only)"
    exit 0
fi

# --- mailmoat in front -----------------------------------------------------------
auth_failures=5
brute_count=10
cat >"$tmp/mailmoat.toml" <<TOML
[server]
listen = []
hostname = "moat.interop.test"
shutdown_grace = "2s"

# IMAP: clients' STARTTLS ends here, so mailmoat reads the logins and
# Dovecot's replies to them.
[[listener]]
address = "127.0.0.1:$mm_imap"
protocol = "imap"
tls = "starttls"
upstream = "imap"

[[listener]]
address = "127.0.0.1:$mm_pop3"
protocol = "pop3"
tls = "none"
upstream = "pop3"

[tls]
certificate = "$tls/mailmoat.pem"
key = "$tls/mailmoat.key"

[upstreams.imap]
servers = ["127.0.0.1:$dv_imap"]
connect_timeout = "5s"
proxy_protocol = "v2"

[upstreams.pop3]
servers = ["127.0.0.1:$dv_pop3"]
connect_timeout = "5s"
proxy_protocol = "v2"

[autoban]
auth_failures = $auth_failures
window = "10m"
ttl = "1h"

# The brute force aims at alice's account: from account_failures wrong
# passwords on, her login replies are held back, at most this long.
[mailbox]
account_delay_max = "5s"

[blocklist]
files = []

[admin]
listen = "127.0.0.1:$admin_port"
TOML

"$mailmoat" check-config -c "$tmp/mailmoat.toml" >/dev/null 2>"$tmp/check-config.log" ||
    fail "mailmoat check-config: $(cat "$tmp/check-config.log")"
say "starting mailmoat: IMAP on 127.0.0.1:$mm_imap (STARTTLS), POP3 on :$mm_pop3, PROXY v2 to Dovecot"
"$mailmoat" run -c "$tmp/mailmoat.toml" >"$tmp/mailmoat.log" 2>&1 &
mailmoat_pid=$!
# shellcheck disable=SC2317 # called through wait_for
up() {
    kill -0 "$mailmoat_pid" 2>/dev/null || fail "mailmoat exited early"
    listening "$mm_imap" && listening "$mm_pop3"
}
wait_for "mailmoat to listen on $mm_imap and $mm_pop3" up

# GET a path from the admin listener (bash's /dev/tcp: no curl needed).
admin_get() {
    timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" &&
        printf "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" "$2" >&3 && cat <&3' _ "$admin_port" "$1"
}
# The value of the metric line matching $1 exactly (labels in order), or 0.
metric() {
    admin_get /metrics 2>/dev/null | awk -v m="$1" '$1 == m { print $2; found = 1 } END { if (!found) print 0 }'
}
# mailmoat's receiver check (a PROXY LOCAL header, the greeting, LOGOUT or
# QUIT) agrees with Dovecot's haproxy listeners.
for port in "$dv_imap" "$dv_pop3"; do
    wait_for "mailmoat_upstream_up 1 for Dovecot on $port" eval \
        "[[ \$(metric 'mailmoat_upstream_up{server=\"127.0.0.1:$port\"}') == 1 ]]"
done

# --- correct logins through mailmoat ------------------------------------------------
say "IMAP from 127.0.0.21 through mailmoat, STARTTLS terminated by mailmoat"
client imap --port "$mm_imap" --source 127.0.0.21 --ca "$tls/ca.pem" --password "$password" \
    --subject "$subject" || fail "IMAP login inside STARTTLS through mailmoat"
say "POP3 from 127.0.0.22 through mailmoat"
client pop3 --port "$mm_pop3" --source 127.0.0.22 --password "$password" \
    --subject "$subject" || fail "POP3 login through mailmoat"
wait_for "Dovecot to log the IMAP login of 127.0.0.21 (from mailmoat's PROXY header)" \
    in_log "imap-login: Info: Login: user=<alice>, .*rip=127\.0\.0\.21,"
wait_for "Dovecot to log the POP3 login of 127.0.0.22 (from mailmoat's PROXY header)" \
    in_log "pop3-login: Info: Login: user=<alice>, .*rip=127\.0\.0\.22,"
if in_log "Login: user=<[^>]*>, .*rip=127\.0\.0\.1,"; then
    fail "Dovecot logged a login from mailmoat's own 127.0.0.1: the PROXY header was not used ($(grep -m1 'rip=127\.0\.0\.1,' "$tmp/dovecot.log"))"
fi
wait_for "mailmoat to count the IMAP login" eval \
    '[[ $(metric "mailmoat_logins_total{outcome=\"success\",protocol=\"imap\"}") -ge 1 ]]'
wait_for "mailmoat to count the POP3 login" eval \
    '[[ $(metric "mailmoat_logins_total{outcome=\"success\",protocol=\"pop3\"}") -ge 1 ]]'

# --- a brute force through mailmoat ---------------------------------------------------
say "brute force from 127.0.0.23: $brute_count wrong passwords at once inside STARTTLS (autoban.auth_failures = $auth_failures)"
client brute --port "$mm_imap" --source 127.0.0.23 --ca "$tls/ca.pem" --count "$brute_count" ||
    fail "the brute force through mailmoat"
bans() { admin_get /admin/bans 2>/dev/null; }
wait_for "/admin/bans to list 127.0.0.23" eval '[[ $(bans) == *127.0.0.23* ]]'
# A ban reaches the door when the ban list is rebuilt, a moment after
# /admin/bans shows it: wait for the refusal, bounded.
wait_for "the banned 127.0.0.23 to be refused on the IMAP listener" \
    client refused --port "$mm_imap" --source 127.0.0.23
wait_for "the banned 127.0.0.23 to be refused on the POP3 listener" \
    client refused --port "$mm_pop3" --source 127.0.0.23
failures=$(metric "mailmoat_logins_total{outcome=\"failure\",protocol=\"imap\"}")
((failures >= auth_failures)) ||
    fail "mailmoat_logins_total{outcome=\"failure\",protocol=\"imap\"} is $failures, expected at least $auth_failures"
wait_for "Dovecot to log the failed logins of 127.0.0.23" \
    in_log "auth: Info: passwd-file\(alice,127\.0\.0\.23,.*\): Password mismatch"
say "a correct login to the attacked account from 127.0.0.24 (delayed at most mailbox.account_delay_max)"
client imap --port "$mm_imap" --source 127.0.0.24 --ca "$tls/ca.pem" --password "$password" \
    --subject "$subject" || fail "a correct IMAP login from another address after the brute force"

echo "--- Dovecot log: logins and failures through mailmoat"
grep -E "rip=127\.0\.0\.2[1-4],|\(alice,127\.0\.0\.23," "$tmp/dovecot.log" | head -n 20
echo "--- mailmoat: bans and login metrics"
bans | grep -E "127\.0\.0\.23"
admin_get /metrics 2>/dev/null | grep -E "^mailmoat_logins_total" || true
passed=1
echo "dovecot-interop: PASS (Dovecot $dovecot_version behind mailmoat: IMAP inside STARTTLS terminated by mailmoat and POP3 read the mailbox, Dovecot logged the real clients 127.0.0.21 and 127.0.0.22 from the PROXY v2 header; a brute force from 127.0.0.23 ($failures failures counted) was banned and refused on both listeners)"
