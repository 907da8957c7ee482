//! The pre-shared key from a file, by one rule for every pagewire tool (PROTOCOL.md,
//! Authentication): the file's bytes as they are, one trailing newline (`\n` or
//! `\r\n`) removed, never hex- or base64-decoded.

use std::path::Path;

use pagewire_protocol::SessionKey;

use crate::MigrationError;

/// The key in `path`: its bytes, one trailing newline removed (at least 16 bytes
/// remain).
///
/// # Errors
/// [`MigrationError::Config`] when the file cannot be read or the key is shorter than
/// 16 bytes.
pub fn key_from_file(path: impl AsRef<Path>) -> Result<SessionKey, MigrationError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| {
        MigrationError::Config(format!("reading the key file {}: {e}", path.display()))
    })?;
    SessionKey::new(key_bytes(bytes)).map_err(|_| {
        MigrationError::Config(format!(
            "the key in {} is unusable (16 bytes or more)",
            path.display()
        ))
    })
}

/// `bytes` without one trailing `\n` or `\r\n`.
fn key_bytes(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_trailing_newline_is_removed_and_nothing_else() {
        assert_eq!(key_bytes(b"k\n".to_vec()), b"k");
        assert_eq!(key_bytes(b"k\r\n".to_vec()), b"k");
        assert_eq!(key_bytes(b"k\n\n".to_vec()), b"k\n");
        assert_eq!(key_bytes(b"k \t".to_vec()), b"k \t");
        assert_eq!(key_bytes(b"k\r".to_vec()), b"k\r");
        assert_eq!(
            key_bytes(b"6b6579".to_vec()),
            b"6b6579",
            "never hex-decoded"
        );
    }

    #[test]
    fn a_short_or_missing_key_file_is_a_configuration_error() {
        let dir = std::env::temp_dir().join(format!("pagewire-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let short = dir.join("short");
        std::fs::write(&short, b"fifteen bytes..\n").unwrap();
        let err = key_from_file(&short).err().unwrap().to_string();
        assert!(err.contains("16 bytes or more"), "{err}");
        let err = key_from_file(dir.join("missing"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("reading the key file"), "{err}");
        let ok = dir.join("ok");
        std::fs::write(&ok, b"sixteen bytes...\n").unwrap();
        assert!(key_from_file(&ok).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
