//! Encoding guest memory that another thread writes meanwhile, as a source's vCPUs do:
//! every encode succeeds and gives a payload that decodes to exactly the frame's size,
//! and once the writer stops, one more pass brings the destination to the source's
//! bytes (for delta too: the cache holds exactly what was sent, never a later version).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{PS, Rng};
use pagewire_accel::{
    Codecs, DeltaCache, DeltaConfig, EncodeParams, Level, PageKey, PageList, PageListMut, PageSize,
    max_payload_len,
};
use pagewire_protocol::CodecId;

const PAGES: usize = 64;
const FRAME: usize = 16;

/// Guest memory: a heap block shared with a writer thread through raw pointers only.
struct Guest {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the block is only accessed through raw pointers while shared (the writer
// writes bytes, the encoder copies them), and freed once, after the writer is joined.
unsafe impl Send for Guest {}
// SAFETY: as above.
unsafe impl Sync for Guest {}

impl Guest {
    fn new(bytes: Vec<u8>) -> Guest {
        let len = bytes.len();
        Guest {
            ptr: Box::into_raw(bytes.into_boxed_slice()).cast(),
            len,
        }
    }

    /// Writes a few bytes of pseudo-random pages until `stop`, like a running guest.
    /// Writes random bytes until `stop`; sets `running` after the first write.
    fn write_until(&self, stop: &AtomicBool, running: &AtomicBool, seed: u64) -> u64 {
        let mut rng = Rng::new(seed);
        let mut writes = 0;
        while !stop.load(Ordering::Relaxed) {
            let at = rng.below(self.len);
            // SAFETY: `at < len`, inside the block, which outlives the writer; the
            // encoder only copies the block through raw pointers meanwhile.
            unsafe { self.ptr.add(at).write_volatile(rng.next() as u8) };
            writes += 1;
            running.store(true, Ordering::Relaxed);
        }
        writes
    }

    /// The bytes, once no writer is left.
    fn bytes(&mut self) -> &[u8] {
        // SAFETY: the writer has been joined (`&mut self`), so nothing else accesses
        // the block while this borrow lives.
        unsafe { core::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` came from `Box::into_raw` of a boxed slice of `len` bytes,
        // freed once here.
        drop(unsafe { Box::from_raw(core::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
    }
}

/// Compressible, text-like pages.
fn text(pages: usize) -> Vec<u8> {
    let words: [&[u8]; 6] = [b"guest ", b"page ", b"memory ", b"0x7f ", b"\n", b"= "];
    let mut rng = Rng::new(5);
    let mut v = Vec::with_capacity(pages * PS);
    while v.len() < pages * PS {
        v.extend_from_slice(words[rng.below(words.len())]);
    }
    v.truncate(pages * PS);
    v
}

/// Encodes every frame of `guest` and decodes it into `dst`; returns the frames that
/// kept the requested format.
fn pass(
    codecs: &mut Codecs,
    cache: &DeltaCache,
    params: &EncodeParams,
    guest: &Guest,
    dst: &mut [u8],
) -> usize {
    let ps = PageSize::KIB4;
    let mut payload = vec![0u8; max_payload_len(FRAME, ps)];
    let mut lengths = Vec::new();
    let mut kept = 0;
    for (f, out) in dst.chunks_mut(FRAME * PS).enumerate() {
        let mut src = PageList::new(ps);
        // SAFETY: the block outlives `src` and is only written through raw pointers.
        unsafe {
            src.push_raw(
                guest.ptr.add(f * FRAME * PS),
                FRAME as u32,
                PageKey((f * FRAME) as u64),
            )
        }
        .expect("pages");
        let enc = codecs
            .encode(params, &src, Some(cache), &mut payload, &mut lengths)
            .expect("encode succeeds whatever the writer does");
        kept += usize::from(enc.codec == params.codec);
        let mut back = PageListMut::new(ps);
        back.push_slice(out, PageKey((f * FRAME) as u64))
            .expect("pages");
        codecs
            .decode(enc.codec, &payload[..enc.payload_len], &lengths, &mut back)
            .expect("the payload decodes to exactly the frame");
    }
    kept
}

#[test]
fn encoding_tolerates_concurrent_guest_writes() {
    let formats = [
        EncodeParams::new(CodecId::RAW, Level::DEFAULT),
        EncodeParams::new(CodecId::ZSTD, Level::DEFAULT),
        EncodeParams::new(CodecId::LZ4, Level::DEFAULT),
        EncodeParams::new(CodecId::DEFLATE, Level::DEFAULT),
        EncodeParams::new(CodecId::DELTA, Level::DEFAULT),
    ];
    for (k, params) in formats.iter().enumerate() {
        let mut guest = Guest::new(text(PAGES));
        let cache = DeltaCache::new(DeltaConfig::new(PageSize::KIB4, PAGES)).expect("cache");
        let mut codecs = Codecs::new();
        let mut dst = vec![0u8; PAGES * PS];
        let stop = Arc::new(AtomicBool::new(false));
        let running = AtomicBool::new(false);
        let (mut passes, mut kept) = (0, 0);
        let writes = std::thread::scope(|s| {
            let writer = s.spawn(|| guest.write_until(&stop, &running, k as u64 + 1));
            let start = Instant::now();
            // At least 100 ms beside the writer once it runs (on a loaded machine it
            // may wait to be scheduled), 10 s at most.
            let mut since: Option<Instant> = None;
            loop {
                if since.is_none() && running.load(Ordering::Relaxed) {
                    since = Some(Instant::now());
                }
                let beside = since.is_some_and(|t| t.elapsed() >= Duration::from_millis(100));
                if passes >= 3 && (beside || start.elapsed() >= Duration::from_secs(10)) {
                    break;
                }
                kept += pass(&mut codecs, &cache, params, &guest, &mut dst);
                passes += 1;
            }
            stop.store(true, Ordering::Relaxed);
            writer.join().expect("writer")
        });
        assert!(writes > 0, "{}: the writer never ran", params.codec);
        if params.codec != CodecId::RAW {
            assert!(kept > 0, "{}: no frame was compressed", params.codec);
        }
        // Writer gone: one more pass, as the final paused round, must converge.
        pass(&mut codecs, &cache, params, &guest, &mut dst);
        assert!(
            guest.bytes() == &dst[..],
            "{}: destination differs from the source after {passes} passes",
            params.codec
        );
    }
}
