//! What the `receive` and `send` examples parse alike.

use pagewire::SessionId;

/// A session id from its 16 bytes as written (`pagewire-spec-01`).
///
/// # Errors
/// Any other length.
pub fn session_id(s: &str) -> anyhow::Result<SessionId> {
    let id: [u8; 16] = s.as_bytes().try_into().map_err(|_| {
        anyhow::anyhow!(
            "--session {s:?}: a session id is 16 bytes, this one is {}",
            s.len()
        )
    })?;
    Ok(SessionId(id))
}

/// An error and its causes on one line, each said once: many of pagewire's errors
/// already include their cause in their own message, which `{:#}` would repeat.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        // Said already when the message so far ends with it ("...: {source}").
        if text.ends_with(&said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
    }
    // A peer's message is in there: characters that reorder, hide or rewrite text on
    // a terminal (control characters, C0 and C1, and bidirectional controls) are
    // shown as escapes.
    let mut shown = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{061c}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}' => shown.extend(c.escape_unicode()),
            c if c.is_control() => shown.extend(c.escape_unicode()),
            _ => shown.push(c),
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bidirectional_controls_from_a_peer_are_escaped() {
        let e = anyhow::anyhow!("peer says: abc\u{202e}fed\u{1b}[2J\u{9b}");
        assert_eq!(
            error_text(&e),
            "peer says: abc\\u{202e}fed\\u{1b}[2J\\u{9b}"
        );
    }

    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        let inner = || anyhow::anyhow!("the limit of 256 regions (asked for 257)");
        let repeated = inner().context("refused: the limit of 256 regions (asked for 257)");
        assert_eq!(
            error_text(&repeated),
            "refused: the limit of 256 regions (asked for 257)"
        );
        let chained = inner().context("the layout");
        assert_eq!(
            error_text(&chained),
            "the layout: the limit of 256 regions (asked for 257)"
        );
    }

    #[test]
    fn a_session_id_is_sixteen_bytes() {
        assert!(session_id("pagewire-spec-01").is_ok());
        let e = session_id("short").unwrap_err().to_string();
        assert!(e.contains("16 bytes, this one is 5"), "{e}");
    }
}
