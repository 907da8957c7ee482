//! The TLS 1.3 record layer after the handshake (RFC 8446 §5.2–5.5), on the traffic
//! secrets rustls hands over at its end (`dangerous_extract_secrets`, the interface
//! rustls 0.23 offers for kTLS on a buffered connection), with ring's AEADs: records
//! are sealed in the buffer that is then sent and opened in place in the receive
//! buffer.
//!
//! Limits of this layer: it never rekeys. rustls 0.23 hands over keys, not traffic
//! secrets, for a buffered connection (its `KernelConnection`, which could derive new
//! ones, exists only for the unbuffered API, which has no exporter), so a KeyUpdate
//! from the peer fails the channel ([`TlsError::Unsupported`]), and a direction that
//! reaches 2^24 records under one key (256 GiB of full records; AES-GCM's limit is
//! 2^24.5) fails with [`TlsError::RecordLimit`] rather than go past it. pagewire peers
//! never send KeyUpdate. Session tickets from a server are ignored (no resumption).

use ring::aead::{
    AES_128_GCM, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey,
};
use rustls::{AlertDescription, ConnectionTrafficSecrets, ExtractedSecrets};

use super::TlsError;

/// Most plaintext in one record.
pub(crate) const MAX_PLAIN: usize = 1 << 14;
/// Record header: type, legacy version, length.
pub(crate) const HEADER: usize = 5;
/// Largest record on the wire (TLSCiphertext.length is at most 2^14 + 256).
pub(crate) const MAX_RECORD: usize = HEADER + MAX_PLAIN + 256;
const TAG: usize = 16;
const APPLICATION_DATA: u8 = 0x17;
const ALERT: u8 = 0x15;
const HANDSHAKE: u8 = 0x16;
const KEY_UPDATE: u8 = 24;
const NEW_SESSION_TICKET: u8 = 4;

/// One direction's key, IV and sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    /// Records sealed with one key before it must be replaced (AES-GCM's
    /// confidentiality limit, RFC 8446 §5.5, with margin).
    limit: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Self, TlsError> {
        let (alg, key, iv, limit) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv, 1 << 24),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv, 1 << 24),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&CHACHA20_POLY1305, key, iv, 1 << 60)
            }
            _ => return Err(TlsError::Unsupported("a cipher suite without a known AEAD")),
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| TlsError::Unsupported("the traffic key's length"))?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| TlsError::Unsupported("the traffic IV's length"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
            limit,
        })
    }

    /// The per-record nonce: the IV XOR the sequence number (RFC 8446 §5.3).
    fn nonce(&self) -> Nonce {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        Nonce::assume_unique_for_key(n)
    }
}

/// What the record at the front of a buffer was.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Opened {
    /// Not a whole record yet.
    NeedMore,
    /// Application data: `len` plaintext bytes at offset `HEADER` of the record,
    /// which took `consumed` bytes.
    Data { consumed: usize, len: usize },
    /// A post-handshake message (key update, session ticket), handled.
    Control { consumed: usize },
    /// The peer's `close_notify`.
    Closed { consumed: usize },
}

/// Both directions of a channel's record layer.
pub(crate) struct Records {
    tx: Keys,
    rx: Keys,
}

impl Records {
    /// From the secrets rustls hands over at the end of the handshake.
    pub(crate) fn new(conn: rustls::Connection) -> Result<Self, TlsError> {
        // Deprecated for kTLS users, who want rustls' KeyUpdate support; it is the only
        // way out of a buffered connection, the only kind with an exporter (see the
        // module docs for what this costs).
        #[allow(deprecated)]
        let secrets: ExtractedSecrets = match conn {
            rustls::Connection::Client(c) => c.dangerous_extract_secrets(),
            rustls::Connection::Server(c) => c.dangerous_extract_secrets(),
        }
        .map_err(TlsError::Protocol)?;
        Ok(Self {
            tx: Keys::new(secrets.tx)?,
            rx: Keys::new(secrets.rx)?,
        })
    }

    /// Seals `plain` as application data records appended to `out`: each chunk is
    /// copied once into `out` and sealed there.
    pub(crate) fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        for chunk in plain.chunks(MAX_PLAIN) {
            if self.tx.seq >= self.tx.limit {
                return Err(TlsError::RecordLimit);
            }
            self.seal_one(APPLICATION_DATA, chunk, out)?;
        }
        Ok(())
    }

    /// Appends a sealed `close_notify` alert.
    pub(crate) fn close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        self.seal_one(ALERT, &[1, 0], out)
    }

    fn seal_one(&mut self, typ: u8, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        // At most 2^14 + 17: fits the u16 length.
        let len = (chunk.len() + 1 + TAG) as u16;
        let [hi, lo] = len.to_be_bytes();
        let header = [APPLICATION_DATA, 3, 3, hi, lo];
        out.reserve(HEADER + usize::from(len));
        out.extend_from_slice(&header);
        let start = out.len();
        out.extend_from_slice(chunk);
        out.push(typ);
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(self.tx.nonce(), Aad::from(header), &mut out[start..])
            .map_err(|_| TlsError::Unsupported("sealing a record"))?;
        out.extend_from_slice(tag.as_ref());
        self.tx.seq += 1;
        Ok(())
    }

    /// Opens the record at the front of `buf` in place (its plaintext then lies at
    /// `buf[HEADER..HEADER + len]`). Nothing outside `buf` is written, and nothing is
    /// handed out before the record's tag verified.
    pub(crate) fn open(&mut self, buf: &mut [u8]) -> Result<Opened, TlsError> {
        let Some(&[typ, _, _, hi, lo]) = buf.get(..HEADER) else {
            return Ok(Opened::NeedMore);
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if typ != APPLICATION_DATA || !(TAG + 1..=MAX_RECORD - HEADER).contains(&len) {
            return Err(TlsError::Protocol(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType,
            )));
        }
        let consumed = HEADER + len;
        if buf.len() < consumed {
            return Ok(Opened::NeedMore);
        }
        if self.rx.seq >= self.rx.limit {
            return Err(TlsError::RecordLimit);
        }
        let header = [typ, buf[1], buf[2], hi, lo];
        let plain = self
            .rx
            .key
            .open_in_place(
                self.rx.nonce(),
                Aad::from(header),
                &mut buf[HEADER..consumed],
            )
            .map_err(|_| TlsError::Protocol(rustls::Error::DecryptError))?;
        self.rx.seq += 1;
        // The content type is the last non-zero byte; zeros after it are padding.
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(TlsError::Protocol(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType,
            )));
        };
        match plain[end] {
            APPLICATION_DATA => Ok(Opened::Data { consumed, len: end }),
            ALERT => match plain[..end] {
                [_, 0] => Ok(Opened::Closed { consumed }),
                [_, d] => Err(TlsError::Protocol(rustls::Error::AlertReceived(
                    AlertDescription::from(d),
                ))),
                _ => Err(TlsError::Protocol(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType,
                ))),
            },
            HANDSHAKE => {
                post_handshake(&plain[..end])?;
                Ok(Opened::Control { consumed })
            }
            _ => Err(TlsError::Protocol(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType,
            ))),
        }
    }
}

/// Checks the handshake messages of a post-handshake record: session tickets are
/// ignored, anything else (KeyUpdate) is refused.
fn post_handshake(mut msgs: &[u8]) -> Result<(), TlsError> {
    let bad = || {
        TlsError::Protocol(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType,
        ))
    };
    while let [typ, a, b, c, rest @ ..] = msgs {
        let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
        if rest.len() < len {
            return Err(bad());
        }
        match *typ {
            NEW_SESSION_TICKET => {}
            KEY_UPDATE => return Err(TlsError::Unsupported("a TLS KeyUpdate from the peer")),
            _ => return Err(bad()),
        }
        msgs = &rest[len..];
    }
    if msgs.is_empty() { Ok(()) } else { Err(bad()) }
}

/// Fixed keys, for tests and fuzzing.
fn keys(b: u8) -> (u64, ConnectionTrafficSecrets) {
    (
        0,
        ConnectionTrafficSecrets::Aes256Gcm {
            key: rustls::crypto::cipher::AeadKey::from([b; 32]),
            iv: rustls::crypto::cipher::Iv::from([b; 12]),
        },
    )
}

/// Two ends of one channel's record layer on fixed keys, for tests and fuzzing.
fn pair() -> Option<(Records, Records)> {
    let a = Records {
        tx: Keys::new(keys(1)).ok()?,
        rx: Keys::new(keys(2)).ok()?,
    };
    let b = Records {
        tx: Keys::new(keys(2)).ok()?,
        rx: Keys::new(keys(1)).ok()?,
    };
    Some((a, b))
}

/// The fuzz target `tls_records` (fuzz/): the receive side of the record layer
/// never panics, never reads outside its buffer, and hands out only bytes that
/// were sealed, in order. `data[0]` bit 0 picks the case: arbitrary bytes taken for
/// records (nothing may open), or `data[2..]` sealed into records and, unless
/// `data[1]` is 255, one byte of them changed (nothing from the changed record on
/// may open; the close is never seen).
///
/// # Panics
/// When a property fails.
pub fn fuzz(data: &[u8]) {
    let ([mode, flip_at, rest @ ..], Some((mut a, mut b))) = (data, pair()) else {
        return;
    };
    let mut wire = Vec::new();
    let flip = if mode & 1 == 0 {
        wire.extend_from_slice(rest);
        None
    } else {
        if a.seal(rest, &mut wire).is_err() || a.close_notify(&mut wire).is_err() {
            return;
        }
        let at = (*flip_at != 255).then(|| usize::from(*flip_at) * (wire.len() - 1) / 254);
        if let Some(i) = at {
            wire[i] ^= 1 | (mode >> 1);
        }
        at
    };
    let (mut got, mut at, mut closed) = (Vec::new(), 0, false);
    for _ in 0..=wire.len() / HEADER {
        match b.open(&mut wire[at..]) {
            Ok(Opened::Data { consumed, len }) => {
                assert!(len + HEADER <= consumed && at + consumed <= wire.len());
                got.extend_from_slice(&wire[at + HEADER..at + HEADER + len]);
                at += consumed;
            }
            Ok(Opened::Closed { .. }) => {
                closed = true;
                break;
            }
            Ok(Opened::Control { .. }) => panic!("a control record was never sealed"),
            Ok(Opened::NeedMore) | Err(_) => break,
        }
    }
    if mode & 1 == 0 {
        assert!(got.is_empty() && !closed, "a forged record opened");
    } else {
        assert!(
            rest.starts_with(&got),
            "bytes handed out that were not sealed"
        );
        assert_eq!(closed, flip.is_none());
        if flip.is_none() {
            assert_eq!(got, rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Records, Records) {
        super::pair().unwrap()
    }

    #[test]
    fn the_fuzz_properties_hold_for_a_few_inputs() {
        let body: Vec<u8> = (0..20_000u32).map(|i| (i * 7) as u8).collect();
        for mode in [0u8, 1, 3, 0xff] {
            for flip in [0u8, 1, 5, 100, 254, 255] {
                let mut d = vec![mode, flip];
                d.extend_from_slice(&body);
                fuzz(&d);
                fuzz(&d[..d.len().min(40)]);
            }
        }
    }

    #[test]
    fn sealed_records_open_in_place_and_tampering_fails() {
        let (mut a, mut b) = pair();
        let data: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        a.seal(&data, &mut wire).unwrap();
        a.close_notify(&mut wire).unwrap();
        // Three records of data (16 KiB, 16 KiB, the rest) and the alert.
        assert_eq!(wire.len(), data.len() + 4 * (HEADER + 1 + TAG) + 2);
        let mut tampered = wire.clone();
        let mut got = Vec::new();
        let mut at = 0;
        loop {
            match b.open(&mut wire[at..]).unwrap() {
                Opened::Data { consumed, len } => {
                    got.extend_from_slice(&wire[at + HEADER..at + HEADER + len]);
                    at += consumed;
                }
                Opened::Closed { consumed } => {
                    assert_eq!(at + consumed, wire.len());
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, data);
        // A record cut short waits; a flipped byte fails authentication.
        let (_, mut b) = pair();
        assert_eq!(b.open(&mut tampered[..100]).unwrap(), Opened::NeedMore);
        tampered[HEADER + 7] ^= 1;
        assert!(matches!(
            b.open(&mut tampered),
            Err(TlsError::Protocol(rustls::Error::DecryptError))
        ));
    }

    #[test]
    fn a_key_update_from_the_peer_is_refused_and_tickets_ignored() {
        let (mut a, mut b) = pair();
        let mut wire = Vec::new();
        a.seal_one(HANDSHAKE, &[NEW_SESSION_TICKET, 0, 0, 2, 9, 9], &mut wire)
            .unwrap();
        let n = wire.len();
        a.seal_one(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], &mut wire)
            .unwrap();
        assert_eq!(
            b.open(&mut wire[..n]).unwrap(),
            Opened::Control { consumed: n }
        );
        assert!(matches!(
            b.open(&mut wire[n..]),
            Err(TlsError::Unsupported(_))
        ));
    }

    #[test]
    fn a_key_at_its_record_limit_is_never_used() {
        let (mut a, mut b) = pair();
        let mut wire = Vec::new();
        a.seal(b"last", &mut wire).unwrap();
        a.tx.seq = a.tx.limit;
        assert!(matches!(
            a.seal(b"one too many", &mut Vec::new()),
            Err(TlsError::RecordLimit)
        ));
        b.rx.seq = b.rx.limit;
        assert!(matches!(b.open(&mut wire), Err(TlsError::RecordLimit)));
    }

    #[test]
    fn nonces_follow_the_sequence_number() {
        let mut k = Keys::new(keys(1)).unwrap();
        let first = *k.nonce().as_ref();
        k.seq = 0x0102;
        let second = *k.nonce().as_ref();
        assert_eq!(first, [1; 12]);
        assert_eq!(second[..10], [1; 10]);
        assert_eq!(second[10..], [1 ^ 1, 1 ^ 2]);
    }
}
