//! The credentials in a SASL exchange, shared by IMAP `AUTHENTICATE`
//! (RFC 4959) and POP3 `AUTH` (RFC 5034), where the mechanism carries them
//! in the clear: PLAIN (RFC 4616) and LOGIN (two base64 responses, user
//! then password). Other mechanisms (SCRAM, OAUTHBEARER, …) give none: the
//! login is still counted, only not per account. What is decoded here is
//! handed to the login accounting and dropped. Protocol framing (line
//! endings, `*` to cancel) stays with each protocol.

use base64::Engine;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// One response: `authzid NUL authcid NUL password`.
    Plain,
    /// Two responses: the user name, then the password.
    Login,
    /// Anything else: its responses are checked for form only.
    Other,
}

impl Mechanism {
    pub fn parse(name: &[u8]) -> Mechanism {
        if name.eq_ignore_ascii_case(b"PLAIN") {
            Mechanism::Plain
        } else if name.eq_ignore_ascii_case(b"LOGIN") {
            Mechanism::Login
        } else {
            Mechanism::Other
        }
    }
}

/// One client response (a line without its ending, or an initial
/// response), decoded: `=` is the empty response (RFC 4959, RFC 5034 §4).
/// None when it is not base64, or is `*` (the client cancels).
pub fn decode(response: &[u8]) -> Option<Vec<u8>> {
    if response == b"=" {
        return Some(Vec::new());
    }
    base64::engine::general_purpose::STANDARD
        .decode(response)
        .ok()
}

/// PLAIN's `authzid NUL authcid NUL passwd`: the account that
/// authenticates (authcid) and its password. None when it is not three
/// NUL-separated fields, the account is empty, or the password holds a NUL
/// (RFC 4616 forbids both), so a malformed message is never counted
/// against an account.
pub fn plain(decoded: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut parts = decoded.splitn(3, |&b| b == 0);
    let _authzid = parts.next()?;
    let user = parts.next()?;
    let password = parts.next()?;
    if password.contains(&0) || user.is_empty() {
        return None;
    }
    Some((user, password))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(text: &[u8]) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .encode(text)
            .into_bytes()
    }

    #[test]
    fn plain_gives_the_authenticating_account_and_its_password() {
        let decoded = decode(&b64(b"\0joe\0secret")).unwrap();
        assert_eq!(plain(&decoded), Some((&b"joe"[..], &b"secret"[..])));
        let decoded = decode(&b64(b"admin\0joe\0s")).unwrap();
        assert_eq!(plain(&decoded), Some((&b"joe"[..], &b"s"[..])));
        let decoded = decode(b"AGFsaWNlAHMzY3JldA==").unwrap();
        assert_eq!(plain(&decoded), Some((&b"alice"[..], &b"s3cret"[..])));
    }

    #[test]
    fn malformed_plain_responses_give_nothing() {
        for text in [
            &b"joe"[..],
            b"\0joe",
            b"alice\0pw",
            b"\0\0pw",
            b"\0joe\0pw\0more",
            b"admin\0alice\0pw\0with nul",
        ] {
            assert_eq!(plain(text), None, "{text:?}");
        }
    }

    #[test]
    fn responses_are_base64_or_the_empty_response() {
        assert_eq!(decode(b"YWxpY2U="), Some(b"alice".to_vec()));
        assert_eq!(decode(b""), Some(Vec::new()));
        assert_eq!(decode(b"="), Some(Vec::new()));
        assert_eq!(decode(b"*"), None);
        assert_eq!(decode(b"not base64!"), None);
        assert_eq!(decode(b"a b"), None);
    }

    #[test]
    fn mechanisms_are_read_case_blind() {
        assert_eq!(Mechanism::parse(b"plain"), Mechanism::Plain);
        assert_eq!(Mechanism::parse(b"LOGIN"), Mechanism::Login);
        assert_eq!(Mechanism::parse(b"SCRAM-SHA-256"), Mechanism::Other);
    }
}
