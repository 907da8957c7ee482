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
