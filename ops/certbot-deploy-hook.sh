#!/bin/sh
# certbot deploy hook: copies a renewed certificate where mailmoat can read
# it. certbot's live/ and archive/ directories and privkey.pem are readable
# by root only, and mailmoat runs unprivileged (ops/mailmoat.service,
# ops/debian/mailmoat.service), so [tls] cannot point at
# /etc/letsencrypt/live/.
#
# The certificate whose live/ directory is $RENEWED_LINEAGE (certbot sets
# it) goes to /etc/mailmoat/tls/<its name>/fullchain.pem and privkey.pem,
# mode 0640, group mailmoat. Each file is written under a temporary name
# and renamed over the old one, so mailmoat never reads half a file; it
# sees the change and loads the new pair by itself (no reload, no restart).
#
# Install, then name it for each certificate mailmoat presents:
#   install -m 755 ops/certbot-deploy-hook.sh /usr/local/sbin/mailmoat-certbot-deploy
#   certbot certonly ... -d mx.example.net --deploy-hook /usr/local/sbin/mailmoat-certbot-deploy
# For a certificate certbot already has: add the hook to its renewals
# (certbot reconfigure --cert-name mx.example.net --deploy-hook ...) and
# make the first copy by hand:
#   RENEWED_LINEAGE=/etc/letsencrypt/live/mx.example.net /usr/local/sbin/mailmoat-certbot-deploy
# Then in mailmoat.toml:
#   [tls]
#   certificate = "/etc/mailmoat/tls/mx.example.net/fullchain.pem"
#   key = "/etc/mailmoat/tls/mx.example.net/privkey.pem"
#
# The group: the Debian package's service runs as user and group mailmoat.
# ops/mailmoat.service runs as a dynamic user, whose group exists only
# while it runs (and a static group named mailmoat without the user stops
# it from starting): create a group for the files
# (groupadd --system mailmoat-tls), uncomment SupplementaryGroups= in the
# unit, and make mailmoat-tls the default of group= below.
set -eu

group=${MAILMOAT_TLS_GROUP:-mailmoat}
root=${MAILMOAT_TLS_DIR:-/etc/mailmoat/tls}

if [ -z "${RENEWED_LINEAGE:-}" ]; then
    echo "mailmoat-certbot-deploy: RENEWED_LINEAGE is not set: run by certbot as a deploy hook, or set it to the certificate's /etc/letsencrypt/live/NAME directory" >&2
    exit 2
fi
if ! getent group "$group" >/dev/null; then
    echo "mailmoat-certbot-deploy: no group \"$group\" (MAILMOAT_TLS_GROUP): create it, or set the group mailmoat runs with" >&2
    exit 2
fi

dest="$root/$(basename "$RENEWED_LINEAGE")"
install -d -m 0750 -g "$group" "$root" "$dest"
for file in fullchain.pem privkey.pem; do
    # install reads through certbot's live/ symlinks into archive/.
    install -m 0640 -g "$group" "$RENEWED_LINEAGE/$file" "$dest/.$file.new"
done
# Both renames land within mailmoat's settle time: it reads the pair once.
mv -f "$dest/.fullchain.pem.new" "$dest/fullchain.pem"
mv -f "$dest/.privkey.pem.new" "$dest/privkey.pem"
echo "mailmoat-certbot-deploy: $RENEWED_LINEAGE copied to $dest (group $group)"
