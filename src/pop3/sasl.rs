//! The SASL exchanges of `AUTH` (RFC 5034) as far as the proxy reads them:
//! which mechanism, whether a client line is a well-formed response, and
//! the user and password inside `PLAIN` (RFC 4616) and `LOGIN`. What is
//! decoded here is handed to the login accounting and dropped.

use base64::Engine;

use super::command::strip_line_ending;

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

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("SASL response is not base64")]
    NotBase64,
}

/// A client's line in a SASL exchange.
#[derive(Debug, PartialEq, Eq)]
pub enum Response {
    /// `*`: the client abandons the exchange.
    Cancel,
    Data(Vec<u8>),
}

/// A response line sent after a `+ ` challenge.
pub fn response(line: &[u8]) -> Result<Response, SaslError> {
    let text = strip_line_ending(line);
    if text == b"*" {
        return Ok(Response::Cancel);
    }
    decode(text).map(Response::Data)
}

/// The initial response given with the AUTH command, where `=` stands for
/// an empty one (RFC 5034 §4).
pub fn initial_response(arg: &[u8]) -> Result<Vec<u8>, SaslError> {
    if arg == b"=" {
        return Ok(Vec::new());
    }
    decode(arg)
}

fn decode(text: &[u8]) -> Result<Vec<u8>, SaslError> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| SaslError::NotBase64)
}

/// The authentication identity and password of a PLAIN message; `None`
/// when it is not three NUL-separated fields.
pub fn plain(message: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut fields = message.splitn(3, |&b| b == 0);
    let _authzid = fields.next()?;
    let user = fields.next()?;
    let password = fields.next()?;
    Some((user, password))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_gives_the_authentication_identity_and_password() {
        let Ok(message) = initial_response(b"AGFsaWNlAHMzY3JldA==") else {
            panic!("base64");
        };
        assert_eq!(plain(&message), Some((&b"alice"[..], &b"s3cret"[..])));
        assert_eq!(
            plain(b"admin\0alice\0pw\0with nul"),
            Some((&b"alice"[..], &b"pw\0with nul"[..]))
        );
        assert_eq!(plain(b"alice\0pw"), None);
    }

    #[test]
    fn responses_are_base64_or_a_cancel() {
        assert_eq!(response(b"*\r\n"), Ok(Response::Cancel));
        assert_eq!(
            response(b"YWxpY2U=\r\n"),
            Ok(Response::Data(b"alice".to_vec()))
        );
        assert_eq!(response(b"\r\n"), Ok(Response::Data(Vec::new())));
        assert_eq!(response(b"USER alice\r\n"), Err(SaslError::NotBase64));
        assert_eq!(initial_response(b"="), Ok(Vec::new()));
        assert_eq!(initial_response(b"a b"), Err(SaslError::NotBase64));
    }

    #[test]
    fn mechanisms_are_case_insensitive() {
        assert_eq!(Mechanism::parse(b"plain"), Mechanism::Plain);
        assert_eq!(Mechanism::parse(b"LOGIN"), Mechanism::Login);
        assert_eq!(Mechanism::parse(b"SCRAM-SHA-256"), Mechanism::Other);
    }
}
