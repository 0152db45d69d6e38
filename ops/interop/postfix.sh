#!/usr/bin/env bash
# Postfix interop test: a real Postfix behind mailmoat with PROXY v2.
#
#   client (swaks, from 127.0.0.2) -> mailmoat (PROXY v2) -> Postfix smtpd
#                                     smtpd_upstream_proxy_protocol = haproxy
#
# Passes when the client's message is accepted (250 after DATA) and Postfix
# logged 127.0.0.2 -- not mailmoat's 127.0.0.1 -- as the client of that very
# message.
#
# Then the same with TLS terminated by mailmoat on both sides:
#
#   swaks --tls (127.0.0.3) -> mailmoat [[listener]] tls = "starttls"
#       -> upstream.tls = "starttls" (verified against a CA) + PROXY v2
#       -> Postfix smtpd_tls_security_level = may
#
# Passes when two messages are delivered, Postfix logged 127.0.0.3 as their
# client and a TLS connection (from mailmoat) for it, and the third message
# inside TLS from 127.0.0.3 got mailmoat's 450 (message_burst = 2): the rate
# limit holds where it used to see only ciphertext.
#
# Run as root (it installs Debian's postfix, swaks, Net::SSLeay for swaks's
# TLS, and openssl when missing). Nothing is skipped: a missing piece fails.
#
# The Postfix instance is private: its own config, queue and data directories
# under a temp dir, listening on a free loopback port, delivering to the
# discard transport. The system Postfix (if any) is never touched, and no
# packet leaves loopback. Every wait is bounded.
#
# Environment: KEEP=1 keeps the temp dir (logs, configs) after a pass too.
set -euo pipefail
cd "$(dirname "$0")/../.."

WAIT=30 # seconds, for every poll below

say() { echo "postfix-interop: $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    echo "postfix-interop: FAIL: must run as root (runs a Postfix instance)"
    exit 1
fi
export PATH="$PATH:/usr/sbin:/sbin"

# --- packages ---------------------------------------------------------------
missing=()
[[ -x /usr/sbin/postfix ]] || missing+=(postfix)
command -v swaks >/dev/null || missing+=(swaks)
# swaks's --tls; Debian's swaks only recommends it.
perl -MNet::SSLeay -e 1 2>/dev/null || missing+=(libnet-ssleay-perl)
command -v openssl >/dev/null || missing+=(openssl)
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # "No configuration": the package must not set up (or start) a system
    # instance; this test brings its own.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    if ! timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; then
        timeout 600 apt-get update -q >/dev/null
        timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi
getent passwd postfix >/dev/null && getent group postdrop >/dev/null || {
    echo "postfix-interop: FAIL: the postfix package did not create the postfix user and postdrop group"
    exit 1
}
postfix_version=$(postconf -d -h mail_version)
swaks --support 2>&1 | grep -q "^=== TLS supported" || {
    echo "postfix-interop: FAIL: swaks has no TLS support: $(swaks --support 2>&1 | grep TLS)"
    exit 1
}
say "Postfix $postfix_version, $(swaks --version 2>&1 | head -n1)"

# --- build mailmoat -----------------------------------------------------------
say "building mailmoat (release)"
cargo build --release --quiet --bin mailmoat
mailmoat="${CARGO_TARGET_DIR:-target}/release/mailmoat"
[[ -x $mailmoat ]] || { echo "postfix-interop: FAIL: no binary at $mailmoat"; exit 1; }

# --- temp dir, ports, cleanup ----------------------------------------------------
tmp=$(mktemp -d /tmp/mailmoat-postfix.XXXXXX)
chmod 755 "$tmp" # the postfix user must reach the queue and data dirs inside
pf="$tmp/postfix" # config_directory
mkdir -p "$pf" "$tmp/queue" "$tmp/data"
chown postfix: "$tmp/data" # the queue stays root's; postfix-script fills it in
: >"$tmp/maillog"
mailmoat_pid=""
mailmoat_tls_pid=""
postfix_started=0
passed=0

cleanup() {
    set +e
    if ((postfix_started)); then
        timeout "$WAIT" postfix -c "$pf" stop >/dev/null 2>&1 ||
            timeout "$WAIT" postfix -c "$pf" abort >/dev/null 2>&1
        # Make sure this instance's master is gone (its pid file may outlive
        # it, so check the pid still belongs to a Postfix master).
        local mpid
        mpid=$(tr -d ' ' <"$tmp/queue/pid/master.pid" 2>/dev/null)
        if [[ -n $mpid && $(cat "/proc/$mpid/comm" 2>/dev/null) == master ]]; then
            kill "$mpid"
        fi
    fi
    local pid
    for pid in $mailmoat_pid $mailmoat_tls_pid; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null
            wait "$pid" 2>/dev/null
        fi
    done
    if ((passed)) && [[ -z ${KEEP:-} ]]; then
        rm -rf "$tmp"
    else
        say "kept $tmp (maillog, mailmoat*.log, swaks*.log, configs, tls/)"
    fi
}
trap cleanup EXIT

fail() {
    echo "postfix-interop: FAIL: $*"
    for f in swaks.log swaks-tls-1.log swaks-tls-2.log swaks-tls-3.log mailmoat.log \
        mailmoat-tls.log maillog; do
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
pf_port=$(free_port) && taken+=("$pf_port")
mm_port=$(free_port) && taken+=("$mm_port")
admin_port=$(free_port) && taken+=("$admin_port")
pf_tls_port=$(free_port) && taken+=("$pf_tls_port")
mm_tls_port=$(free_port) && taken+=("$mm_tls_port")
admin_tls_port=$(free_port)
[[ -n $pf_port && -n $mm_port && -n $admin_port && -n $pf_tls_port && -n $mm_tls_port &&
    -n $admin_tls_port ]] || fail "no free loopback ports found"

wait_for() { # wait_for WHAT COMMAND...: poll for up to $WAIT seconds
    local what=$1 deadline=$((SECONDS + WAIT))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || fail "timed out after ${WAIT}s waiting for $what"
        sleep 0.2
    done
}

# --- certificates: a CA, Postfix's and mailmoat's, ECDSA P-256 ------------------------
tls="$tmp/tls"
mkdir -p "$tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=mailmoat interop CA" -keyout "$tls/ca.key" -out "$tls/ca.pem" \
    >"$tls/openssl.log" 2>&1 || fail "openssl (CA): $(cat "$tls/openssl.log")"
issue() { # issue NAME FILE: a server certificate for NAME signed by the CA
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -subj "/CN=$1" -keyout "$tls/$2.key" -out "$tls/$2.csr" >"$tls/openssl.log" 2>&1 &&
        printf 'subjectAltName=DNS:%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
            "$1" >"$tls/$2.ext" &&
        openssl x509 -req -in "$tls/$2.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
            -CAcreateserial -days 2 -extfile "$tls/$2.ext" -out "$tls/$2.pem" \
            >>"$tls/openssl.log" 2>&1 || fail "openssl ($1): $(cat "$tls/openssl.log")"
    chmod 600 "$tls/$2.key"
}
issue mx.interop.test postfix
issue moat.interop.test mailmoat

# --- private Postfix ---------------------------------------------------------------
cat >"$pf/main.cf" <<CF
# Private Postfix instance for mailmoat's interop test (generated).
compatibility_level = 3.6
queue_directory = $tmp/queue
data_directory = $tmp/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = $tmp/maillog
maillog_file_prefixes = $tmp
myhostname = mx.interop.test
mydomain = interop.test
myorigin = \$mydomain
mydestination = interop.test
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# Accept any local part, then throw the message away: the test is about the
# SMTP session and the client address, not delivery.
local_recipient_maps =
local_transport = discard:interop
default_transport = discard:interop
relay_transport = discard:interop
alias_maps =
alias_database =
biff = no
smtpd_banner = \$myhostname ESMTP interop
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_upstream_proxy_timeout = 10s
readme_directory = no
CF

cat >"$pf/master.cf" <<CF
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:$pf_port inet n - n - - smtpd
  -o smtpd_upstream_proxy_protocol=haproxy
127.0.0.1:$pf_tls_port inet n - n - - smtpd
  -o smtpd_upstream_proxy_protocol=haproxy
  -o smtpd_tls_security_level=may
  -o smtpd_tls_cert_file=$tls/postfix.pem
  -o smtpd_tls_key_file=$tls/postfix.key
  -o smtpd_tls_loglevel=1
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
CF

say "starting Postfix on 127.0.0.1:$pf_port (config $pf)"
postfix -c "$pf" check >"$tmp/postfix-check.log" 2>&1 ||
    fail "postfix check: $(cat "$tmp/postfix-check.log")"
postfix_started=1
timeout "$WAIT" postfix -c "$pf" start >"$tmp/postfix-start.log" 2>&1 ||
    fail "postfix start: $(cat "$tmp/postfix-start.log")"
wait_for "Postfix to listen on $pf_port" listening "$pf_port"
wait_for "Postfix to listen on $pf_tls_port" listening "$pf_tls_port"

# --- mailmoat in front -----------------------------------------------------------
cat >"$tmp/mailmoat.toml" <<TOML
[server]
listen = ["127.0.0.1:$mm_port"]
hostname = "moat.interop.test"
shutdown_grace = "2s"

[upstream]
servers = ["127.0.0.1:$pf_port"]
connect_timeout = "5s"
proxy_protocol = "v2"

[blocklist]
files = []

[admin]
listen = "127.0.0.1:$admin_port"
TOML

# start_mailmoat NAME PORT WHAT: checks $tmp/NAME.toml, runs mailmoat on it
# (log in $tmp/NAME.log) and waits until it listens on PORT; its PID is
# left in $started_pid.
start_mailmoat() {
    local name=$1 port=$2 what=$3
    "$mailmoat" check-config -c "$tmp/$name.toml" >/dev/null 2>"$tmp/check-config.log" ||
        fail "mailmoat check-config ($name): $(cat "$tmp/check-config.log")"
    say "starting mailmoat on 127.0.0.1:$port $what"
    "$mailmoat" run -c "$tmp/$name.toml" >"$tmp/$name.log" 2>&1 &
    started_pid=$!
    # shellcheck disable=SC2317 # called through wait_for
    up() {
        kill -0 "$started_pid" 2>/dev/null || fail "mailmoat ($name) exited early"
        listening "$port"
    }
    wait_for "mailmoat ($name) to listen on $port" up
}
start_mailmoat mailmoat "$mm_port" "-> 127.0.0.1:$pf_port (PROXY v2)"
mailmoat_pid=$started_pid

# --- one message from 127.0.0.2 ------------------------------------------------------
say "sending a message from 127.0.0.2 with swaks"
swaks_rc=0
timeout 60 swaks --server 127.0.0.1 --port "$mm_port" --local-interface 127.0.0.2 \
    --protocol ESMTP --helo client.example.org --timeout 20 \
    --from sender@example.org --to user@interop.test \
    --header "Subject: mailmoat interop test" --body "Relayed by mailmoat with PROXY v2." \
    >"$tmp/swaks.log" 2>&1 || swaks_rc=$?
((swaks_rc == 0)) || fail "swaks exited with $swaks_rc"
# The reply to the end of DATA: "<-  250 2.0.0 Ok: queued as 78DF999A08F"
queue_id=$(sed -n 's/^<[-~] *250 .*queued as \([0-9A-Za-z]\{1,\}\).*/\1/p' "$tmp/swaks.log" | head -n1)
[[ -n $queue_id ]] || fail "no '250 ... queued as' reply to the end of DATA"
say "client got 250 for queue id $queue_id"

# --- what Postfix saw ----------------------------------------------------------------
in_log() { grep -qE "$1" "$tmp/maillog"; }
wait_for "Postfix to log the client of $queue_id" in_log "postfix/smtpd\[[0-9]+\]: $queue_id: client=[^ ]*\[127\.0\.0\.2\]"
wait_for "Postfix to log the connection from 127.0.0.2" in_log "postfix/smtpd\[[0-9]+\]: connect from [^ ]*\[127\.0\.0\.2\]"
wait_for "Postfix to finish $queue_id" in_log "$queue_id: removed"
in_log "$queue_id: to=<user@interop.test>.* status=sent" ||
    fail "Postfix did not deliver (discard) $queue_id"
# mailmoat's receiver check sends a PROXY LOCAL header (Postfix then logs
# mailmoat's own address, as LOCAL means) and only QUIT. Anything more from
# 127.0.0.1 is a client session that lost its real address.
if in_log "postfix/smtpd\[[0-9]+\]: [0-9A-Za-z]+: client=[^ ]*\[127\.0\.0\.1\]"; then
    fail "Postfix took a message from mailmoat's own address 127.0.0.1: the PROXY header was not used"
fi
if grep -E "postfix/smtpd\[[0-9]+\]: disconnect from [^ ]*\[127\.0\.0\.1\]" "$tmp/maillog" |
    grep -vqE "\] quit=1 commands=1$"; then
    fail "Postfix saw a session from mailmoat's own address 127.0.0.1 beyond the receiver check's QUIT: the PROXY header was not used"
fi
if in_log "postfix/smtpd\[[0-9]+\]: warning: haproxy"; then
    fail "Postfix warned about the PROXY header: $(grep -m1 'warning: haproxy' "$tmp/maillog")"
fi

# --- and what mailmoat counted -----------------------------------------------------------
# GET /metrics from the admin listener (bash's /dev/tcp: no curl needed).
scrape() { # scrape [ADMIN_PORT]
    timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" &&
        printf "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" >&3 && cat <&3' _ "${1:-$admin_port}"
}
metric() { scrape "${2:-$admin_port}" 2>/dev/null | grep -E "^$1\$" || true; }
# The receiver check agrees with this Postfix: /readyz is 200.
readyz() {
    timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" &&
        printf "GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" >&3 && cat <&3' _ "$admin_port" 2>/dev/null | head -1
}
wait_for "/readyz 200 (mailmoat and Postfix agree on the PROXY header)" eval '[[ $(readyz) == *" 200 "* ]]'
up_line="mailmoat_upstream_up\{server=\"127.0.0.1:$pf_port\"\} 1"
wait_for "mailmoat_upstream_up 1 for the Postfix upstream" eval '[[ -n $(metric "$up_line") ]]'
wait_for "mailmoat to count the accepted message" eval '[[ -n $(metric "mailmoat_messages_total\{result=\"accepted\"\} 1") ]]'

echo "--- Postfix log for $queue_id"
grep -E "connect from [^ ]*\[127\.0\.0\.2\]|$queue_id" "$tmp/maillog"
say "PASS: plaintext (Postfix $postfix_version logged 127.0.0.2 as the client of $queue_id)"

# === TLS terminated by mailmoat, STARTTLS to Postfix ==================================
cat >"$tmp/mailmoat-tls.toml" <<TOML
[server]
listen = []
hostname = "moat.interop.test"
shutdown_grace = "2s"

# Clients' STARTTLS ends here: mailmoat reads (and shapes) the session.
[[listener]]
address = "127.0.0.1:$mm_tls_port"
protocol = "smtp"
tls = "starttls"

[tls]
certificate = "$tls/mailmoat.pem"
key = "$tls/mailmoat.key"

# And mailmoat's own STARTTLS to Postfix, verifying its certificate.
[upstream]
servers = ["127.0.0.1:$pf_tls_port"]
connect_timeout = "5s"
proxy_protocol = "v2"
tls = "starttls"
ca_file = "$tls/ca.pem"
server_name = "mx.interop.test"

[limits]
message_rate = "2/hour"
message_burst = 2

[blocklist]
files = []

[admin]
listen = "127.0.0.1:$admin_tls_port"
TOML

start_mailmoat mailmoat-tls "$mm_tls_port" \
    "(tls = starttls) -> 127.0.0.1:$pf_tls_port (upstream.tls = starttls, PROXY v2)"
mailmoat_tls_pid=$started_pid

send_tls() { # send_tls N: message N from 127.0.0.3 with STARTTLS; swaks's exit code
    local rc=0
    timeout 60 swaks --server 127.0.0.1 --port "$mm_tls_port" --local-interface 127.0.0.3 \
        --protocol ESMTP --tls --helo tls-client.example.org --timeout 20 \
        --from sender@example.org --to user@interop.test \
        --header "Subject: mailmoat TLS interop test $1" \
        --body "Message $1, inside TLS terminated by mailmoat." \
        >"$tmp/swaks-tls-$1.log" 2>&1 || rc=$?
    return $rc
}
tls_ids=()
for n in 1 2; do
    say "sending message $n from 127.0.0.3 with swaks --tls"
    rc=0
    send_tls "$n" || rc=$?
    ((rc == 0)) || fail "swaks --tls (message $n) exited with $rc"
    grep -qE "^=== TLS started with cipher" "$tmp/swaks-tls-$n.log" ||
        fail "swaks did not start TLS with mailmoat (message $n)"
    id=$(sed -n 's/^<[-~] *250 .*queued as \([0-9A-Za-z]\{1,\}\).*/\1/p' "$tmp/swaks-tls-$n.log" | head -n1)
    [[ -n $id ]] || fail "no '250 ... queued as' reply inside TLS (message $n)"
    tls_ids+=("$id")
    say "client got 250 inside TLS for queue id $id"
done

for id in "${tls_ids[@]}"; do
    wait_for "Postfix to log 127.0.0.3 as the client of $id" in_log "postfix/smtpd\[[0-9]+\]: $id: client=[^ ]*\[127\.0\.0\.3\]"
    wait_for "Postfix to deliver (discard) $id" in_log "$id: to=<user@interop.test>.* status=sent"
done
# smtpd_tls_loglevel = 1: "Anonymous TLS connection established from
# unknown[127.0.0.3]: TLSv1.3 with cipher ...": TLS from mailmoat, and the
# client address from the PROXY header.
wait_for "Postfix to log a TLS connection for 127.0.0.3" in_log "postfix/smtpd\[[0-9]+\]: (Anonymous |Untrusted |Trusted |Verified )?TLS connection established from [^ ]*\[127\.0\.0\.3\]"
if in_log "postfix/smtpd\[[0-9]+\]: [0-9A-Za-z]+: client=[^ ]*\[127\.0\.0\.1\]"; then
    fail "Postfix took a message from mailmoat's own address 127.0.0.1 in the TLS scenario"
fi

say "sending message 3 from 127.0.0.3 with swaks --tls: mailmoat must refuse it (message_burst = 2)"
rc=0
send_tls 3 || rc=$?
((rc != 0)) || fail "the third message inside TLS was accepted: message_rate not enforced inside TLS"
grep -qE "^=== TLS started with cipher" "$tmp/swaks-tls-3.log" ||
    fail "swaks did not start TLS with mailmoat (message 3): the refusal would not be inside TLS"
# swaks marks a refusal "<** " in plaintext, "<~* " inside TLS.
grep -qE "^<~\* +450 4\.7\.1 message rate limit exceeded" "$tmp/swaks-tls-3.log" ||
    fail "the third message inside TLS did not get mailmoat's 450 (swaks exit $rc)"
wait_for "mailmoat to count the message_rate refusal" eval \
    '[[ -n $(metric "mailmoat_messages_refused_total\{limit=\"message_rate\"\} 1" "$admin_tls_port") ]]'
wait_for "mailmoat to count 2 accepted messages" eval \
    '[[ -n $(metric "mailmoat_messages_total\{result=\"accepted\"\} 2" "$admin_tls_port") ]]'
delivered=$(grep -cE "postfix/smtpd\[[0-9]+\]: [0-9A-Za-z]+: client=[^ ]*\[127\.0\.0\.3\]" "$tmp/maillog" || true)
((delivered == 2)) || fail "Postfix took $delivered messages from 127.0.0.3, expected 2"

echo "--- Postfix log for 127.0.0.3 (TLS)"
grep -E "\[127\.0\.0\.3\]|${tls_ids[0]}|${tls_ids[1]}" "$tmp/maillog"
echo "--- swaks, message 3"
grep -E "^(=== TLS started|<~\*)" "$tmp/swaks-tls-3.log"
passed=1
echo "postfix-interop: PASS (Postfix $postfix_version logged 127.0.0.2 as the client of $queue_id, relayed by mailmoat with PROXY v2; with TLS terminated by mailmoat and STARTTLS to Postfix, ${tls_ids[*]} from 127.0.0.3 were delivered over TLS and the third message got 450 inside TLS)"
