//! Why a client is refused at the door.

use crate::config::Protocol;
use crate::session::CloseReason;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Blocked,
    GlobalCap,
    IpCap,
    PrefixCap,
    ConnectionRate,
    /// Talked before the greeting was complete.
    EarlyTalker,
    /// Sent a PROXY header without being a trusted proxy.
    ProxyUntrusted,
    /// A trusted proxy sent no or a malformed PROXY header.
    ProxyMalformed,
}

impl Refusal {
    pub const ALL: [Refusal; 8] = [
        Refusal::Blocked,
        Refusal::GlobalCap,
        Refusal::IpCap,
        Refusal::PrefixCap,
        Refusal::ConnectionRate,
        Refusal::EarlyTalker,
        Refusal::ProxyUntrusted,
        Refusal::ProxyMalformed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Blocked => "blocked",
            Refusal::GlobalCap => "global_cap",
            Refusal::IpCap => "ip_cap",
            Refusal::PrefixCap => "prefix_cap",
            Refusal::ConnectionRate => "connection_rate",
            Refusal::EarlyTalker => "early_talker",
            Refusal::ProxyUntrusted => "proxy_untrusted",
            Refusal::ProxyMalformed => "proxy_malformed",
        }
    }

    /// The reply that refuses, in the listener's protocol, naming the limit
    /// (never the list entry). IMAP and POP3 servers may greet with a
    /// refusal (`* BYE`, `-ERR`); a temporary one carries the response
    /// code that tells a client to retry (`[UNAVAILABLE]`, `[SYS/TEMP]`).
    pub fn reply(self, protocol: Protocol, hostname: &str) -> String {
        // Built by hand, once per refused connection under a flood: no
        // formatting machinery, one allocation.
        let (smtp_code, text) = match self {
            Refusal::Blocked => ("554 5.7.1 ", " access denied"),
            Refusal::GlobalCap => ("421 4.7.0 ", " too many connections, try again later"),
            Refusal::IpCap => ("421 4.7.0 ", " too many connections from your IP address"),
            Refusal::PrefixCap => ("421 4.7.0 ", " too many connections from your network"),
            Refusal::ConnectionRate => (
                "421 4.7.0 ",
                " connection rate limit exceeded, try again later",
            ),
            Refusal::EarlyTalker => ("554 5.5.1 ", " protocol error: talking before the greeting"),
            Refusal::ProxyUntrusted => {
                ("554 5.7.1 ", " PROXY header not accepted from your address")
            }
            Refusal::ProxyMalformed => ("421 4.7.0 ", " malformed PROXY header"),
        };
        let temporary = smtp_code.starts_with('4');
        let code = match (protocol, temporary) {
            (Protocol::Smtp, _) => smtp_code,
            (Protocol::Imap, true) => "* BYE [UNAVAILABLE] ",
            (Protocol::Imap, false) => "* BYE ",
            (Protocol::Pop3, true) => "-ERR [SYS/TEMP] ",
            (Protocol::Pop3, false) => "-ERR ",
        };
        let mut reply = String::with_capacity(code.len() + hostname.len() + text.len() + 2);
        for part in [code, hostname, text, "\r\n"] {
            reply.push_str(part);
        }
        reply
    }

    pub fn close_reason(self) -> CloseReason {
        match self {
            Refusal::Blocked => CloseReason::Blocked,
            Refusal::GlobalCap | Refusal::IpCap | Refusal::PrefixCap | Refusal::ConnectionRate => {
                CloseReason::Limit
            }
            Refusal::EarlyTalker | Refusal::ProxyUntrusted | Refusal::ProxyMalformed => {
                CloseReason::ProtocolError
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_speak_the_listeners_protocol_and_say_when_to_retry() {
        let reply = |r: Refusal, p: Protocol| r.reply(p, "mx.test");
        assert_eq!(
            reply(Refusal::IpCap, Protocol::Smtp),
            "421 4.7.0 mx.test too many connections from your IP address\r\n"
        );
        assert_eq!(
            reply(Refusal::IpCap, Protocol::Imap),
            "* BYE [UNAVAILABLE] mx.test too many connections from your IP address\r\n"
        );
        assert_eq!(
            reply(Refusal::Blocked, Protocol::Imap),
            "* BYE mx.test access denied\r\n"
        );
        assert_eq!(
            reply(Refusal::ConnectionRate, Protocol::Pop3),
            "-ERR [SYS/TEMP] mx.test connection rate limit exceeded, try again later\r\n"
        );
        assert_eq!(
            reply(Refusal::Blocked, Protocol::Pop3),
            "-ERR mx.test access denied\r\n"
        );
    }
}
