//! Where mailmoat accepts clients and where it relays them: `[[listener]]`,
//! `[tls]`, `[upstream]` and `[upstreams.NAME]`, each validated and then
//! checked against the others (an address is listened on once; a listener
//! that terminates TLS has a certificate; a named upstream exists; no
//! upstream is one of mailmoat's own listeners).
//!
//! Certificate files are only named here: the TLS module reads them, and
//! reports a bad one, at start and whenever they change.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;

use toml::Spanned;

use super::file::{ListenerFile, SniFile, TlsFile, UpstreamFile};
use super::{
    addr, ListenerSettings, Protocol, ProxyProtocol, SniCertificate, TlsMode, TlsSettings,
    UpstreamSettings, UpstreamTls, Validator, MIN_PERIOD,
};

/// One address mailmoat listens on, with the key that asks for it.
pub(super) struct Own {
    pub addr: SocketAddr,
    pub key: String,
    /// None: a default value, written nowhere.
    pub span: Option<Range<usize>>,
}

/// What an upstream table wrote itself, as opposed to defaulted or
/// inherited from `[upstream]`.
pub(super) struct Written {
    pub servers: Option<Range<usize>>,
}

impl Validator<'_> {
    /// `[upstream]` (no `base`), or `[upstreams.NAME]`, whose missing keys
    /// take `[upstream]`'s values.
    pub(super) fn upstream(
        &mut self,
        key: &str,
        raw: UpstreamFile,
        base: Option<&UpstreamSettings>,
    ) -> (UpstreamSettings, Written) {
        let k = |name: &str| format!("{key}.{name}");
        let written = Written {
            servers: raw.servers.as_ref().map(Spanned::span),
        };
        let tls_span = raw.tls.as_ref().map(Spanned::span);
        let verify_span = raw
            .ca_file
            .as_ref()
            .or(raw.pin_sha256.as_ref())
            .map(Spanned::span);
        // A pin written but invalid is reported as such, not again as missing.
        let pin_written = raw
            .pin_sha256
            .as_ref()
            .is_some_and(|p| !p.get_ref().is_empty());
        let servers = match (raw.servers, base) {
            (None, Some(b)) => b.servers.clone(),
            (raw, _) => self.upstream_addrs(&k("servers"), raw),
        };
        let connect_timeout = match (raw.connect_timeout, base) {
            (None, Some(b)) => b.connect_timeout,
            (raw, _) => self.duration(&k("connect_timeout"), raw, "5s"),
        };
        let proxy_protocol = match (raw.proxy_protocol, base) {
            (None, Some(b)) => b.proxy_protocol,
            (raw, _) => self.parse(&k("proxy_protocol"), raw, "v2", |s| match s {
                "off" => Ok(ProxyProtocol::Off),
                "v1" => Ok(ProxyProtocol::V1),
                "v2" => Ok(ProxyProtocol::V2),
                _ => Err("expected \"off\", \"v1\" or \"v2\"".into()),
            }),
        };
        let tls = match (raw.tls, base) {
            (None, Some(b)) => b.tls,
            (raw, _) => self.parse(&k("tls"), raw, "none", |s| match s {
                "none" => Ok(UpstreamTls::None),
                "starttls" => Ok(UpstreamTls::Starttls),
                _ => Err("expected \"none\" or \"starttls\"".into()),
            }),
        };
        let ca_file = match (raw.ca_file, base) {
            (None, Some(b)) => b.ca_file.clone(),
            (raw, _) => self.optional_path(raw),
        };
        let pin_sha256 = match (raw.pin_sha256, base) {
            (None, Some(b)) => b.pin_sha256.clone(),
            (raw, _) => self.optional(&k("pin_sha256"), raw, pin),
        };
        let server_name = match (raw.server_name, base) {
            (None, Some(b)) => b.server_name.clone(),
            (raw, _) => self.optional(&k("server_name"), raw, server_name),
        };
        if tls == UpstreamTls::Starttls && ca_file.is_none() && pin_sha256.is_none() && !pin_written
        {
            // A named upstream that changed none of these keys has
            // [upstream]'s problem, reported there.
            if let Some(span) = tls_span.or(verify_span) {
                self.problem_at(
                    Some(span),
                    format!(
                        "{key}.tls = \"starttls\" cannot verify the receiver: set {key}.ca_file \
                         to the CA certificate (PEM) that signed the receiver's certificate, or \
                         {key}.pin_sha256 to the SHA-256 of the receiver's certificate"
                    ),
                );
            }
        }
        let settings = UpstreamSettings {
            servers,
            connect_timeout,
            proxy_protocol,
            tls,
            ca_file,
            pin_sha256,
            server_name,
        };
        (settings, written)
    }

    /// `[tls]`: the certificates terminating listeners present.
    pub(super) fn tls(&mut self, raw: TlsFile) -> TlsSettings {
        let cert_span = raw.certificate.as_ref().map(Spanned::span);
        let key_span = raw.key.as_ref().map(Spanned::span);
        let certificate = self.optional_path(raw.certificate);
        let key = self.optional_path(raw.key);
        match (&certificate, &key) {
            (Some(_), None) => self.problem_at(
                cert_span,
                "tls.certificate is set without tls.key: set tls.key to the file holding \
                 the certificate's private key (PEM)"
                    .into(),
            ),
            (None, Some(_)) => self.problem_at(
                key_span,
                "tls.key is set without tls.certificate: set tls.certificate to the file \
                 holding the certificate chain (PEM, leaf first)"
                    .into(),
            ),
            _ => {}
        }
        let sni = self.sni(raw.sni);
        TlsSettings {
            certificate,
            key,
            sni,
            handshake_timeout: self.at_least(
                "tls.handshake_timeout",
                raw.handshake_timeout,
                "10s",
                MIN_PERIOD,
            ),
            max_handshakes: self.count("tls.max_handshakes", raw.max_handshakes, "256"),
        }
    }

    /// `[[tls.sni]]`; an entry with a problem is left out.
    fn sni(&mut self, raw: Vec<Spanned<SniFile>>) -> Vec<SniCertificate> {
        let mut entries = Vec::new();
        // Each name, lowercased, with the entry that claimed it first.
        let mut claimed: BTreeMap<String, String> = BTreeMap::new();
        for (i, entry) in raw.into_iter().enumerate() {
            let key = format!("tls.sni[{}]", i + 1);
            let span = entry.span();
            let entry = entry.into_inner();
            let mut ok = true;
            let names_span = entry.names.as_ref().map_or(span.clone(), Spanned::span);
            let names = entry.names.map(Spanned::into_inner).unwrap_or_default();
            if names.is_empty() || names.iter().any(|n| n.trim().is_empty()) {
                ok = false;
                self.problem_at(
                    Some(names_span.clone()),
                    format!(
                        "{key}.names: list the host names clients ask for with this \
                         certificate, e.g. names = [\"mail.example.net\"]"
                    ),
                );
            }
            for name in &names {
                if let Some(first) = claimed.get(&name.to_ascii_lowercase()) {
                    ok = false;
                    self.problem(
                        &format!("{key}.names"),
                        names_span.clone(),
                        &format!("{name:?} is also in {first}.names: a name picks one certificate; remove it from one entry"),
                    );
                } else {
                    claimed.insert(name.to_ascii_lowercase(), key.clone());
                }
            }
            let certificate = self.optional_path(entry.certificate);
            let private_key = self.optional_path(entry.key);
            let (Some(certificate), Some(private_key)) = (certificate, private_key) else {
                self.problem_at(
                    Some(span),
                    format!(
                        "{key}: needs certificate = \"…\" (the chain, PEM, leaf first) and \
                         key = \"…\" (its private key, PEM)"
                    ),
                );
                continue;
            };
            if ok {
                entries.push(SniCertificate {
                    names,
                    certificate,
                    key: private_key,
                });
            }
        }
        entries
    }

    /// `[[listener]]` tables, and the addresses they listen on. A listener
    /// with a problem is left out.
    pub(super) fn listeners(
        &mut self,
        raw: Vec<Spanned<ListenerFile>>,
        tls: &TlsSettings,
        upstreams: &BTreeMap<String, UpstreamSettings>,
    ) -> (Vec<ListenerSettings>, Vec<Own>) {
        let mut listeners = Vec::new();
        let mut own = Vec::new();
        // Each named upstream, with the protocol and listener that named it
        // first.
        let mut spoken_by: BTreeMap<String, (Protocol, String)> = BTreeMap::new();
        for (i, table) in raw.into_iter().enumerate() {
            let key = format!("listener[{}]", i + 1);
            let k = |name: &str| format!("{key}.{name}");
            let span = table.span();
            let l = table.into_inner();
            let problems_before = self.problems.len();
            let address = match l.address {
                Some(text) => match text.get_ref().parse::<SocketAddr>() {
                    Ok(addr) => {
                        own.push(Own {
                            addr,
                            key: k("address"),
                            span: Some(text.span()),
                        });
                        Some(addr)
                    }
                    Err(e) => {
                        self.problem(
                            &k("address"),
                            text.span(),
                            &format!(
                                "{:?}: {e}; write IP:port, e.g. \"0.0.0.0:25\" or \"[::]:587\"",
                                text.get_ref()
                            ),
                        );
                        None
                    }
                },
                None => {
                    self.problem_at(
                        Some(span.clone()),
                        format!("{key}: needs address = \"IP:port\", e.g. \"0.0.0.0:587\""),
                    );
                    None
                }
            };
            let protocol = self.parse(&k("protocol"), l.protocol, "smtp", |s| match s {
                "smtp" => Ok(Protocol::Smtp),
                "imap" => Ok(Protocol::Imap),
                "pop3" => Ok(Protocol::Pop3),
                _ => Err("expected \"smtp\", \"imap\" or \"pop3\"".into()),
            });
            let tls_span = l.tls.as_ref().map_or(span.clone(), Spanned::span);
            let mode = self.parse(&k("tls"), l.tls, "passthrough", |s| match s {
                "none" => Ok(TlsMode::None),
                "starttls" => Ok(TlsMode::Starttls),
                "implicit" => Ok(TlsMode::Implicit),
                "passthrough" => Ok(TlsMode::Passthrough),
                _ => Err("expected \"none\", \"starttls\", \"implicit\" or \"passthrough\"".into()),
            });
            let terminates = matches!(mode, TlsMode::Starttls | TlsMode::Implicit);
            if terminates && (tls.certificate.is_none() || tls.key.is_none()) {
                self.problem_at(
                    Some(tls_span),
                    format!(
                        "{key}.tls = \"{}\": mailmoat terminates TLS here, so it needs \
                         tls.certificate and tls.key: set both in [tls] (PEM files), or use \
                         tls = \"passthrough\" to leave TLS to the receiver",
                        mode_name(mode)
                    ),
                );
            }
            let require_tls = match l.require_tls {
                Some(flag) if *flag.get_ref() => {
                    let why = match mode {
                        TlsMode::None => Some("mailmoat neither offers nor accepts STARTTLS there"),
                        TlsMode::Passthrough => Some(
                            "STARTTLS there goes to the receiver unread, so mailmoat never sees TLS start",
                        ),
                        TlsMode::Starttls | TlsMode::Implicit => None,
                    };
                    if let Some(why) = why {
                        self.problem_at(
                            Some(flag.span()),
                            format!(
                                "{key}.require_tls = true can never be met with tls = \"{}\" \
                                 ({why}): set tls = \"starttls\" (or \"implicit\"), or remove \
                                 require_tls",
                                mode_name(mode)
                            ),
                        );
                    }
                    true
                }
                _ => false,
            };
            let upstream = match l.upstream {
                Some(name) if upstreams.contains_key(name.get_ref()) => Some(name.into_inner()),
                Some(name) => {
                    let known = if upstreams.is_empty() {
                        String::new()
                    } else {
                        let names: Vec<&str> = upstreams.keys().map(String::as_str).collect();
                        format!(", name one of {}", names.join(", "))
                    };
                    self.problem(
                        &k("upstream"),
                        name.span(),
                        &format!(
                            "{:?}: there is no [upstreams.{}] table: add one{known}, or remove \
                             the key to relay to [upstream]",
                            name.get_ref(),
                            name.get_ref()
                        ),
                    );
                    None
                }
                None => None,
            };
            if protocol != Protocol::Smtp && self.problems.len() == problems_before {
                self.mailbox_upstream(&key, protocol, upstream.as_deref(), upstreams, &span);
                if let Some(name) = &upstream {
                    match spoken_by.get(name) {
                        Some((other, first)) if *other != protocol => self.problem_at(
                            Some(span.clone()),
                            format!(
                                "{key}.upstream = {name:?} is also {first}'s, {} listener: \
                                 a receiver speaks one protocol; give each its own \
                                 [upstreams.NAME] table",
                                a_listener_of(*other)
                            ),
                        ),
                        _ => {}
                    }
                }
            }
            if let Some(name) = &upstream {
                spoken_by
                    .entry(name.clone())
                    .or_insert_with(|| (protocol, key.clone()));
            }
            if let (Some(address), true) = (address, self.problems.len() == problems_before) {
                listeners.push(ListenerSettings {
                    address,
                    protocol,
                    tls: mode,
                    require_tls,
                    upstream,
                });
            }
        }
        (listeners, own)
    }

    /// An IMAP or POP3 listener relays to a receiver of its own, over a
    /// link mailmoat does not encrypt itself: its STARTTLS towards a
    /// receiver is SMTP's.
    fn mailbox_upstream(
        &mut self,
        key: &str,
        protocol: Protocol,
        upstream: Option<&str>,
        upstreams: &BTreeMap<String, UpstreamSettings>,
        span: &Range<usize>,
    ) {
        let a_listener = a_listener_of(protocol);
        let name = protocol.as_str().to_ascii_uppercase();
        let Some(upstream) = upstream else {
            self.problem_at(
                Some(span.clone()),
                format!(
                    "{key}: {a_listener} listener needs upstream = \"NAME\" and an \
                     [upstreams.NAME] table with the {name} receiver's address (Dovecot's); \
                     [upstream] is the SMTP receiver"
                ),
            );
            return;
        };
        if upstreams
            .get(upstream)
            .is_some_and(|u| u.tls == UpstreamTls::Starttls)
        {
            self.problem_at(
                Some(span.clone()),
                format!(
                    "{key}.upstream = {upstream:?}: upstreams.{upstream}.tls = \"starttls\" \
                     is mailmoat's SMTP STARTTLS to a receiver and cannot reach a {name} \
                     receiver: set upstreams.{upstream}.tls = \"none\" (on a trusted link, \
                     with proxy_protocol = \"v2\" the receiver still learns the client's TLS)"
                ),
            );
        }
    }

    /// Each address is listened on once: the same address twice, or a
    /// wildcard and an address it covers, cannot both be bound.
    pub(super) fn refuse_duplicate_listeners(&mut self, own: &[Own]) {
        for (i, later) in own.iter().enumerate() {
            let Some(earlier) = own[..i].iter().find(|e| clash(e.addr, later.addr)) else {
                continue;
            };
            let first = self.describe(earlier);
            let message = if earlier.addr == later.addr {
                format!(
                    "\"{}\" is also {first}: an address can have one listener only; remove one",
                    later.addr
                )
            } else {
                format!(
                    "\"{}\" overlaps {first}: a wildcard address takes its port on every address \
                     of its family, so both cannot be bound; remove one or use another port",
                    later.addr
                )
            };
            match &later.span {
                Some(span) => {
                    self.problem_at(Some(span.clone()), format!("{} = {message}", later.key))
                }
                None => self.problem_at(None, format!("the default {} = {message}", later.key)),
            }
        }
    }

    /// An upstream that is one of our own listeners would have mailmoat
    /// relay every client to itself until the caps refuse them all.
    pub(super) fn refuse_loops(
        &mut self,
        own: &[Own],
        key: &str,
        servers: &[super::UpstreamAddr],
        servers_span: Option<Range<usize>>,
    ) {
        for server in servers {
            let Some(listener) = own.iter().find(|l| addr::reaches(l.addr, server.addr)) else {
                continue;
            };
            let listener = self.describe(listener);
            let message = format!(
                "{:?} ({}) is mailmoat's own listener, {listener}: clients would be relayed to mailmoat itself in a loop; point {key} at the receiver (Postfix, Exim)",
                server.name, server.addr
            );
            match &servers_span {
                Some(span) => self.problem(key, span.clone(), &message),
                None => self.problem_at(None, format!("the default {key} = {message}")),
            }
        }
    }

    /// `server.listen = "…" (line 2)`, for a message about another key.
    fn describe(&self, own: &Own) -> String {
        match &own.span {
            Some(span) => format!("{} = \"{}\" (line {})", own.key, own.addr, self.line(span)),
            None => format!("the default {} = \"{}\"", own.key, own.addr),
        }
    }

    /// An optional string key: absent or "" means none.
    fn optional(
        &mut self,
        key: &str,
        raw: super::Raw<String>,
        parse: impl Fn(&str) -> Result<String, String>,
    ) -> Option<String> {
        let raw = raw.filter(|r| !r.get_ref().is_empty())?;
        match parse(raw.get_ref()) {
            Ok(value) => Some(value),
            Err(e) => {
                self.problem(key, raw.span(), &format!("{:?}: {e}", raw.get_ref()));
                None
            }
        }
    }
}

fn mode_name(mode: TlsMode) -> &'static str {
    match mode {
        TlsMode::None => "none",
        TlsMode::Starttls => "starttls",
        TlsMode::Implicit => "implicit",
        TlsMode::Passthrough => "passthrough",
    }
}

/// Two listening addresses that cannot both be bound. Port 0 asks for a
/// fresh port each time, but the same `IP:0` twice is still refused: the
/// accept loops and reloads tell listeners apart by their address.
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a == b
        || (a.port() == b.port()
            && a.port() != 0
            && a.is_ipv4() == b.is_ipv4()
            && (a.ip().is_unspecified() || b.ip().is_unspecified()))
}

/// A certificate pin: 64 hex digits, or 32 colon-separated pairs (as
/// `openssl x509 -fingerprint -sha256` prints it); kept as lowercase hex.
fn pin(text: &str) -> Result<String, String> {
    let hex: String = if text.contains(':') {
        if text.split(':').any(|pair| pair.len() != 2) {
            return Err(PIN_FORM.into());
        }
        text.split(':').collect()
    } else {
        text.to_string()
    };
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex.to_ascii_lowercase())
    } else {
        Err(PIN_FORM.into())
    }
}

const PIN_FORM: &str = "expected the SHA-256 of the receiver's certificate: 64 hex digits, \
    plain or in colon-separated pairs, as `openssl x509 -in cert.pem -noout -fingerprint \
    -sha256` prints it";

/// The name checked in the receiver's certificate and sent as SNI.
fn server_name(text: &str) -> Result<String, String> {
    rustls::pki_types::ServerName::try_from(text)
        .map(|_| text.to_string())
        .map_err(|_| "not a host name or IP address; write the name on the receiver's certificate, e.g. \"mx.internal\"".into())
}

/// "an IMAP", for a message about a listener.
fn a_listener_of(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Smtp => "an SMTP",
        Protocol::Imap => "an IMAP",
        Protocol::Pop3 => "a POP3",
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::super::{load_in, Config};
    use super::*;

    fn load(text: &str) -> Result<Config, Vec<String>> {
        load_in(text, None)
    }

    /// Each problem starts with the matching prefix, one for one, in order.
    fn assert_problems(text: &str, prefixes: &[&str]) {
        let found = load(text).expect_err("the config should be refused");
        assert_eq!(found.len(), prefixes.len(), "{found:#?}");
        for (problem, prefix) in found.iter().zip(prefixes) {
            assert!(
                problem.starts_with(prefix),
                "{problem:?} should start with {prefix:?}"
            );
        }
    }

    const CERTIFICATE: &str = "[tls]\ncertificate = \"c.pem\"\nkey = \"k.pem\"\n";

    #[test]
    fn every_listener_mistake_is_reported_with_its_line_and_key() {
        let text = "[[listener]]\n\
                    address = \"0.0.0.0:25\"\n\
                    tls = \"starttls\"\n\
                    [[listener]]\n\
                    address = \"0.0.0.0:587\"\n\
                    tls = \"none\"\n\
                    require_tls = true\n\
                    [[listener]]\n\
                    address = \"0.0.0.0:2587\"\n\
                    tls = \"passthrough\"\n\
                    require_tls = true\n\
                    upstream = \"submission\"\n\
                    [[listener]]\n\
                    address = \"0.0.0.0:465\"\n\
                    tls = \"implicit\"\n\
                    require_tls = true\n\
                    protocol = \"nntp\"\n\
                    [[listener]]\n\
                    address = \"mx:25\"\n\
                    tls = \"tls\"\n\
                    [[listener]]\n\
                    tls = \"none\"\n\
                    adress = \"0.0.0.0:26\"\n\
                    [upstream]\n\
                    servers = [\"192.0.2.1:10025\"]\n";
        assert_problems(
            text,
            &[
                "m.toml:3: listener[1].tls = \"starttls\": mailmoat terminates TLS here, so it \
                 needs tls.certificate and tls.key: set both in [tls]",
                "m.toml:7: listener[2].require_tls = true can never be met with tls = \"none\"",
                "m.toml:11: listener[3].require_tls = true can never be met with tls = \
                 \"passthrough\"",
                "m.toml:12: listener[3].upstream = \"submission\": there is no \
                 [upstreams.submission] table: add one, or remove the key",
                // require_tls on an implicit listener is always met: no error on line 16.
                "m.toml:15: listener[4].tls = \"implicit\": mailmoat terminates TLS here",
                "m.toml:17: listener[4].protocol = \"nntp\": expected \"smtp\", \"imap\" or \"pop3\"",
                "m.toml:19: listener[5].address = \"mx:25\": invalid socket address syntax; \
                 write IP:port",
                "m.toml:20: listener[5].tls = \"tls\": expected \"none\", \"starttls\", \
                 \"implicit\" or \"passthrough\"",
                "m.toml:21: listener[6]: needs address = \"IP:port\"",
                "m.toml:23: listener[6].adress: unknown key `adress`",
            ],
        );
    }

    #[test]
    fn terminating_listeners_load_with_a_certificate_and_require_tls_where_it_can_be_met() {
        let text = format!(
            "[[listener]]\naddress = \"0.0.0.0:587\"\ntls = \"starttls\"\nrequire_tls = true\n\
             upstream = \"submission\"\n\
             [[listener]]\naddress = \"0.0.0.0:465\"\ntls = \"implicit\"\nrequire_tls = true\n\
             [[listener]]\naddress = \"127.0.0.1:2525\"\n\
             {CERTIFICATE}[upstreams.submission]\nservers = [\"192.0.2.1:10587\"]\n"
        );
        let config = load(&text).unwrap();
        let all = config.all_listeners();
        // No server.listen default beside [[listener]] tables.
        assert!(config.server.listen.is_empty());
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].tls, TlsMode::Starttls);
        assert!(all[0].require_tls);
        assert_eq!(all[1].tls, TlsMode::Implicit);
        assert_eq!(all[2].tls, TlsMode::Passthrough, "the default mode");
        assert_eq!(all[2].protocol, Protocol::Smtp);
        let submission = config.upstream_for(&all[0]);
        assert_eq!(submission.servers[0].name, "192.0.2.1:10587");
        assert_eq!(config.upstream_for(&all[1]).servers[0].name, "127.0.0.1:25");
        assert_eq!(config.listener_key(all[2].address), "listener[3].address");
    }

    #[test]
    fn imap_and_pop3_listeners_load_with_their_own_receivers() {
        let text = format!(
            "[[listener]]\naddress = \"0.0.0.0:143\"\nprotocol = \"imap\"\ntls = \"starttls\"\n\
             upstream = \"dovecot-imap\"\n\
             [[listener]]\naddress = \"0.0.0.0:993\"\nprotocol = \"imap\"\ntls = \"implicit\"\n\
             upstream = \"dovecot-imap\"\n\
             [[listener]]\naddress = \"0.0.0.0:110\"\nprotocol = \"pop3\"\ntls = \"none\"\n\
             upstream = \"dovecot-pop3\"\n\
             {CERTIFICATE}[upstreams.dovecot-imap]\nservers = [\"127.0.0.1:10143\"]\n\
             [upstreams.dovecot-pop3]\nservers = [\"127.0.0.1:10110\"]\n"
        );
        let config = load(&text).unwrap();
        let all = config.all_listeners();
        let protocols: Vec<Protocol> = all.iter().map(|l| l.protocol).collect();
        assert_eq!(protocols, [Protocol::Imap, Protocol::Imap, Protocol::Pop3]);
        assert_eq!(
            config.upstream_for(&all[2]).servers[0].name,
            "127.0.0.1:10110"
        );
    }

    #[test]
    fn a_mailbox_listener_without_a_receiver_of_its_own_is_refused_with_what_to_set() {
        let text = "[[listener]]\naddress = \"0.0.0.0:143\"\nprotocol = \"imap\"\n\
                    [[listener]]\naddress = \"0.0.0.0:110\"\nprotocol = \"pop3\"\n\
                    upstream = \"secure\"\n\
                    [[listener]]\naddress = \"0.0.0.0:2525\"\nupstream = \"mx\"\n\
                    [[listener]]\naddress = \"0.0.0.0:993\"\nprotocol = \"imap\"\n\
                    upstream = \"mx\"\n\
                    [upstreams.secure]\nservers = [\"127.0.0.1:10110\"]\ntls = \"starttls\"\n\
                    pin_sha256 = \"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"\n\
                    [upstreams.mx]\nservers = [\"127.0.0.1:10025\"]\n";
        assert_problems(
            text,
            &[
                "m.toml:1: listener[1]: an IMAP listener needs upstream = \"NAME\"",
                "m.toml:4: listener[2].upstream = \"secure\": upstreams.secure.tls = \"starttls\" \
                 is mailmoat's SMTP STARTTLS",
                "m.toml:11: listener[4].upstream = \"mx\" is also listener[3]'s, an SMTP listener",
            ],
        );
    }

    #[test]
    fn a_listener_address_is_listened_on_once() {
        let text = "[server]\n\
                    listen = [\"127.0.0.1:2525\", \"0.0.0.0:26\"]\n\
                    [[listener]]\n\
                    address = \"127.0.0.1:2525\"\n\
                    [[listener]]\n\
                    address = \"127.0.0.1:26\"\n\
                    [[listener]]\n\
                    address = \"[::]:26\"\n\
                    [[listener]]\n\
                    address = \"[::]:26\"\n";
        assert_problems(
            text,
            &[
                "m.toml:4: listener[1].address = \"127.0.0.1:2525\" is also server.listen = \
                 \"127.0.0.1:2525\" (line 2): an address can have one listener only; remove one",
                "m.toml:6: listener[2].address = \"127.0.0.1:26\" overlaps server.listen = \
                 \"0.0.0.0:26\" (line 2): a wildcard address",
                "m.toml:10: listener[4].address = \"[::]:26\" is also listener[3].address = \
                 \"[::]:26\" (line 8)",
            ],
        );
        assert_problems(
            "[server]\nlisten = [\"127.0.0.1:2600\", \"127.0.0.1:2600\"]\n",
            &["m.toml:2: server.listen = \"127.0.0.1:2600\" is also server.listen"],
        );
    }

    #[test]
    fn upstream_starttls_needs_a_ca_file_or_a_pin_and_says_which_to_set() {
        let text = "[upstream]\n\
                    tls = \"starttls\"\n\
                    [upstreams.inherits]\n\
                    servers = [\"192.0.2.1:10587\"]\n\
                    [upstreams.pinned]\n\
                    pin_sha256 = \"xyz\"\n\
                    [upstreams.named]\n\
                    tls = \"starttls\"\n\
                    server_name = \"bad name!\"\n";
        assert_problems(
            text,
            &[
                "m.toml:2: upstream.tls = \"starttls\" cannot verify the receiver: set \
                 upstream.ca_file to the CA certificate (PEM) that signed the receiver's \
                 certificate, or upstream.pin_sha256 to the SHA-256",
                "m.toml:6: upstreams.pinned.pin_sha256 = \"xyz\": expected the SHA-256 of the \
                 receiver's certificate: 64 hex digits",
                "m.toml:8: upstreams.named.tls = \"starttls\" cannot verify the receiver: set \
                 upstreams.named.ca_file",
                "m.toml:9: upstreams.named.server_name = \"bad name!\": not a host name",
            ],
        );
        assert_problems(
            "[upstream]\ntls = \"tls\"\n",
            &["m.toml:2: upstream.tls = \"tls\": expected \"none\" or \"starttls\""],
        );
        let pinned = load(&format!(
            "[upstream]\ntls = \"starttls\"\npin_sha256 = \"{}\"\n",
            vec!["0A"; 32].join(":")
        ))
        .unwrap();
        assert_eq!(pinned.upstream.pin_sha256, Some("0a".repeat(32)));
    }

    #[test]
    fn a_named_upstream_takes_upstream_values_for_the_keys_it_leaves_out() {
        let pin = "ab".repeat(32);
        let text = format!(
            "[upstream]\nservers = [\"192.0.2.1:10025\"]\nconnect_timeout = \"2s\"\n\
             proxy_protocol = \"v1\"\ntls = \"starttls\"\nca_file = \"ca.pem\"\n\
             server_name = \"mx.internal\"\n\
             [upstreams.submission]\nservers = [\"192.0.2.1:10587\"]\n\
             [upstreams.pinned]\nca_file = \"\"\npin_sha256 = \"{pin}\"\ntls = \"none\"\n"
        );
        let config = load_in(&text, Some(Path::new("/etc/mailmoat"))).unwrap();
        let base = &config.upstream;
        let submission = &config.upstreams["submission"];
        assert_eq!(submission.servers[0].name, "192.0.2.1:10587");
        assert_eq!(submission.connect_timeout, base.connect_timeout);
        assert_eq!(submission.proxy_protocol, ProxyProtocol::V1);
        assert_eq!(submission.tls, UpstreamTls::Starttls);
        assert_eq!(
            submission.ca_file.as_deref(),
            Some(Path::new("/etc/mailmoat/ca.pem"))
        );
        assert_eq!(submission.server_name.as_deref(), Some("mx.internal"));
        let pinned = &config.upstreams["pinned"];
        assert_eq!(pinned.servers, base.servers);
        assert_eq!(pinned.ca_file, None, "\"\" clears the inherited CA file");
        assert_eq!(pinned.pin_sha256, Some(pin));
        assert_eq!(pinned.tls, UpstreamTls::None);
    }

    #[test]
    fn tls_mistakes_are_each_reported_with_their_line_and_key() {
        let text = "[tls]\n\
                    certificate = \"c.pem\"\n\
                    handshake_timeout = \"10ms\"\n\
                    max_handshakes = 0\n\
                    [[tls.sni]]\n\
                    certificate = \"a.pem\"\n\
                    key = \"a.key\"\n\
                    [[tls.sni]]\n\
                    names = [\"a.example\"]\n\
                    certificate = \"b.pem\"\n\
                    [[tls.sni]]\n\
                    names = [\"A.example\"]\n\
                    certificate = \"c.pem\"\n\
                    key = \"c.key\"\n\
                    sni = 1\n";
        assert_problems(
            text,
            &[
                "m.toml:2: tls.certificate is set without tls.key: set tls.key",
                "m.toml:3: tls.handshake_timeout = \"10ms\": must be at least 100ms",
                "m.toml:4: tls.max_handshakes = \"0\": must be greater than zero",
                "m.toml:5: tls.sni[1].names: list the host names",
                "m.toml:8: tls.sni[2]: needs certificate = \"…\" (the chain, PEM, leaf first) \
                 and key = \"…\"",
                "m.toml:12: tls.sni[3].names = \"A.example\" is also in tls.sni[2].names",
                "m.toml:15: tls.sni[3].sni: unknown key",
            ],
        );
        assert_problems(
            "[tls]\nkey = \"k.pem\"\n",
            &["m.toml:2: tls.key is set without tls.certificate"],
        );
    }

    #[test]
    fn certificate_and_ca_paths_are_relative_to_the_config_directory() {
        let text = format!(
            "{CERTIFICATE}[[tls.sni]]\nnames = [\"a.example\"]\ncertificate = \"sni/a.pem\"\n\
             key = \"/abs/a.key\"\n[upstream]\ntls = \"starttls\"\nca_file = \"ca.pem\"\n"
        );
        let base = Path::new("/etc/mailmoat");
        let config = load_in(&text, Some(base)).unwrap();
        assert_eq!(config.tls.certificate, Some(base.join("c.pem")));
        assert_eq!(config.tls.key, Some(base.join("k.pem")));
        assert_eq!(config.tls.sni[0].certificate, base.join("sni/a.pem"));
        assert_eq!(config.tls.sni[0].key, PathBuf::from("/abs/a.key"));
        assert_eq!(config.upstream.ca_file, Some(base.join("ca.pem")));
    }

    /// The loop refusal covers [[listener]] addresses and named upstreams.
    #[test]
    fn an_upstream_that_is_any_listener_is_refused_naming_both_keys() {
        let text = "[[listener]]\n\
                    address = \"0.0.0.0:587\"\n\
                    [upstream]\n\
                    servers = [\"127.0.0.1:587\"]\n\
                    [upstreams.submission]\n\
                    servers = [\"192.0.2.1:10587\", \"127.0.0.1:587\"]\n\
                    [upstreams.inherits]\n\
                    connect_timeout = \"1s\"\n";
        assert_problems(
            text,
            &[
                "m.toml:4: upstream.servers = \"127.0.0.1:587\" (127.0.0.1:587) is mailmoat's \
                 own listener, listener[1].address = \"0.0.0.0:587\" (line 2): clients would be \
                 relayed to mailmoat itself in a loop; point upstream.servers at the receiver",
                "m.toml:6: upstreams.submission.servers = \"127.0.0.1:587\" (127.0.0.1:587) is \
                 mailmoat's own listener, listener[1].address = \"0.0.0.0:587\" (line 2)",
            ],
        );
    }

    #[test]
    fn pins_are_64_hex_digits_plain_or_in_pairs_and_kept_lowercase() {
        let plain = "AB".repeat(32);
        let pairs = vec!["Ab"; 32].join(":");
        assert_eq!(pin(&plain).unwrap(), "ab".repeat(32));
        assert_eq!(pin(&pairs).unwrap(), "ab".repeat(32));
        for bad in [
            "ab".repeat(31),
            "ab".repeat(33),
            "zz".repeat(32),
            format!("{}:a", vec!["ab"; 31].join(":")),
            format!("a{}", vec!["ab"; 32].join(":")),
            "é".repeat(32),
        ] {
            assert!(pin(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_wildcard_clashes_with_its_family_on_the_same_port_only() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(clash(a("0.0.0.0:25"), a("127.0.0.1:25")));
        assert!(clash(a("127.0.0.1:0"), a("127.0.0.1:0")));
        assert!(!clash(a("0.0.0.0:25"), a("[::]:25")));
        assert!(!clash(a("0.0.0.0:25"), a("0.0.0.0:587")));
        assert!(!clash(a("127.0.0.1:0"), a("127.0.0.2:0")));
        assert!(!clash(a("0.0.0.0:0"), a("127.0.0.1:0")));
    }
}
