//! What the `receive` and `send` examples parse alike.

use anyhow::Context;
use pagewire::SessionId;

/// A session id from its 16 bytes as written (`pagewire-spec-01`).
///
/// # Errors
/// Any other length.
pub fn session_id(s: &str) -> anyhow::Result<SessionId> {
    let id: [u8; 16] = s
        .as_bytes()
        .try_into()
        .with_context(|| format!("--session {s:?}: 16 bytes"))?;
    Ok(SessionId(id))
}
