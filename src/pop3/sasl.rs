//! The framing of `AUTH`'s SASL exchanges (RFC 5034): whether a client
//! line is a well-formed response or a cancel, and the initial response
//! given with the command. Decoding, the mechanisms and the credentials
//! inside `PLAIN` and `LOGIN` are shared with IMAP in [`crate::sasl`].

use super::command::strip_line_ending;

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

/// A response line sent after a `+ ` challenge. Here an empty response is
/// an empty line: `=` stands for one only in the initial response
/// (RFC 5034 §4), so after a challenge it is not base64.
pub fn response(line: &[u8]) -> Result<Response, SaslError> {
    let text = strip_line_ending(line);
    if text == b"*" {
        return Ok(Response::Cancel);
    }
    if text == b"=" {
        return Err(SaslError::NotBase64);
    }
    crate::sasl::decode(text)
        .map(Response::Data)
        .ok_or(SaslError::NotBase64)
}

/// The initial response given with the AUTH command, where `=` stands for
/// an empty one (RFC 5034 §4).
pub fn initial_response(arg: &[u8]) -> Result<Vec<u8>, SaslError> {
    crate::sasl::decode(arg).ok_or(SaslError::NotBase64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_base64_or_a_cancel() {
        assert_eq!(response(b"*\r\n"), Ok(Response::Cancel));
        assert_eq!(
            response(b"YWxpY2U=\r\n"),
            Ok(Response::Data(b"alice".to_vec()))
        );
        assert_eq!(response(b"\r\n"), Ok(Response::Data(Vec::new())));
        assert_eq!(response(b"=\r\n"), Err(SaslError::NotBase64));
        assert_eq!(response(b"USER alice\r\n"), Err(SaslError::NotBase64));
        assert_eq!(initial_response(b"="), Ok(Vec::new()));
        assert_eq!(initial_response(b"*"), Err(SaslError::NotBase64));
        assert_eq!(initial_response(b"a b"), Err(SaslError::NotBase64));
    }
}
