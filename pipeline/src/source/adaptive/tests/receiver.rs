//! A destination slower than the link: the channel tells how long its sends waited on
//! the receiver's window (`Channel::peer_limited`), and the selector takes such
//! windows for the receiver's rate, not the link's.

use super::*;

/// Fresh destination memory on the source's own cores (loopback): each guest byte
/// costs the receiver its page fault, its decode, and the source's encode, which takes
/// the core the receiver would have had.
fn shared_cores(label: &str) -> f64 {
    fresh_dest(label) + 1.0 / text(label).0
}

fn loopback(peer: bool) -> Machine<'static> {
    Machine {
        speeds: &text,
        dest: &shared_cores,
        copy: 0.1e-9,
        link: 1e12,
        jitter: 0.5,
        peer,
    }
}

/// Switches away from raw, after the first choice.
fn left_raw(s: &Selector) -> u64 {
    s.stats()
        .switches
        .iter()
        .filter(|w| w.from == "raw")
        .map(|w| w.count)
        .sum()
}

#[test]
fn a_receiver_slower_than_the_link_keeps_raw_where_compressing_only_costs_it() {
    let frames = 6000;
    let m = loopback(true);
    let (best, best_rate) = best_static(&m, frames);
    assert_eq!(best, "raw");
    let mut now = Instant::now();
    let mut s = selector(now);
    let (chosen, rate) = m.run(&mut s, &mut now, frames);
    let stats = s.stats();
    assert!(
        stats.receiver_windows * 2 > stats.windows,
        "{} of {} windows receiver-bound",
        stats.receiver_windows,
        stats.windows
    );
    assert_eq!(left_raw(&s), 0, "{stats:?}");
    assert!(tail_share(&chosen, "raw") > 0.9, "{stats:?}");
    assert!(
        rate >= 0.97 * best_rate,
        "auto {rate:.3e} B/s vs raw {best_rate:.3e}"
    );

    // Without the receiver's figure the same machine looks like a link raw fills,
    // which a compressor would fill with more guest bytes: it leaves raw to try one.
    let mut now = Instant::now();
    let mut blind = selector(now);
    let _ = loopback(false).run(&mut blind, &mut now, frames);
    assert!(left_raw(&blind) > 0, "{:?}", blind.stats());
    assert_eq!(blind.stats().receiver_windows, 0);
}

/// Fresh destination memory that takes twice as long: the receiver, not a 60 MB/s
/// link, limits zstd:1 in its slow stretches.
fn slow_fresh(label: &str) -> f64 {
    2.0 * fresh_dest(label)
}

#[test]
fn a_receiver_that_swings_over_a_slow_link_does_not_get_raw() {
    // The receiver's rate swings up to 19x with its load (first writes come and go),
    // and raw, which costs it the least, moves no more than the link's 60 MB/s: in a
    // slow stretch it reaches what zstd:1 moves, in the next it moves a third as much.
    // Priced on the slow stretch alone, raw was taken and auto moved 0.85x zstd:1.
    let m = Machine {
        speeds: &text,
        dest: &slow_fresh,
        copy: 0.1e-9,
        link: 60e6,
        jitter: 0.9,
        peer: true,
    };
    let frames = 6000;
    let (best, best_rate) = best_static(&m, frames);
    assert_ne!(best, "raw");
    assert!(m.static_rate("raw", frames) < 0.5 * best_rate);
    let mut now = Instant::now();
    let mut s = selector(now);
    let (chosen, rate) = m.run(&mut s, &mut now, frames);
    let stats = s.stats();
    assert!(stats.receiver_windows > 0, "{stats:?}");
    assert!(tail_share(&chosen, "raw") < 0.02, "{stats:#?}");
    assert!(
        rate >= 0.95 * best_rate,
        "auto {rate:.3e} B/s vs {best} {best_rate:.3e}: {stats:#?}"
    );
}
