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
        if tls == UpstreamTls::Starttls && ca_file.is_none() && pin_sha256.is_none() {
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
                _ => Err("expected \"smtp\"".into()),
            });
            let tls_span = l.tls.as_ref().map_or(span.clone(), Spanned::span);
            let mode = self.parse(&k("tls"), l.tls, "passthrough", |s| match s {
                "none" => Ok(TlsMode::None),
                "starttls" => Ok(TlsMode::Starttls),
                "implicit" => Ok(TlsMode::Implicit),
                "passthrough" => Ok(TlsMode::Passthrough),
                _ => Err(
                    "expected \"none\", \"starttls\", \"implicit\" or \"passthrough\"".into(),
                ),
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
                Some(span) => self.problem_at(Some(span.clone()), format!("{} = {message}", later.key)),
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

#[cfg(test)]
mod tests {
    use super::*;

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
