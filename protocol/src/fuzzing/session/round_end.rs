//! ROUND_END COPY frames in the `session` fuzz target: the destination's side of their
//! deferred application (recorded, applied once every channel ended their round, ACK
//! ROUND held until then) and the generated source's choice of them.

use crate::copy::CopyRun;
use crate::ids::{PageIndex, Round};

/// What a destination that follows `PROTOCOL.md` ("COPY", "What it means") keeps for
/// ROUND_END copies, recomputed apart from the session module: per channel the rounds
/// of the copies recorded and not yet applied, the ACK ROUNDs held back for them, and
/// the target pages of the open round's copies.
#[derive(Debug)]
pub(super) struct RoundEnd {
    pending: Vec<Vec<Round>>,
    held: Vec<Vec<Round>>,
    pages: Vec<u64>,
    /// ROUND_END copies applied, per channel.
    pub(super) applied: Vec<u64>,
}

impl RoundEnd {
    pub(super) fn new(channels: usize) -> Self {
        Self {
            pending: vec![Vec::new(); channels],
            held: vec![Vec::new(); channels],
            pages: vec![0; channels],
            applied: vec![0; channels],
        }
    }

    /// A ROUND_END copy of `round` with `pages` targets, accepted on channel `c`, which
    /// carries `own_pages` pages of the layout: the channel's round stays within the
    /// bound.
    pub(super) fn record(&mut self, c: usize, round: Round, pages: u64, own_pages: u128) {
        self.pages[c] += pages;
        assert!(
            u128::from(self.pages[c]) <= own_pages,
            "channel {c} recorded {} ROUND_END pages in round {round}, it carries {own_pages} pages of the layout",
            self.pages[c]
        );
        self.pending[c].push(round);
    }

    /// Channel `c` ended `round`: its ACK ROUND waits for [`RoundEnd::release`].
    pub(super) fn ended(&mut self, c: usize, round: Round) {
        self.pages[c] = 0;
        self.held[c].push(round);
    }

    /// Applies the copies of rounds every channel has ended (`everywhere`, the session's
    /// `ended_everywhere`), and returns the ACK ROUNDs that may go now, in order: a
    /// channel's ACK ROUND `r` once none of its copies of rounds ≤ `r` waits.
    pub(super) fn release(&mut self, everywhere: Option<Round>) -> Vec<(usize, Round)> {
        let mut acks = Vec::new();
        for c in 0..self.pending.len() {
            let before = self.pending[c].len();
            self.pending[c].retain(|&r| everywhere.is_none_or(|e| r > e));
            self.applied[c] += (before - self.pending[c].len()) as u64;
            while let Some(&h) = self.held[c].first() {
                if self.pending[c].iter().any(|&r| r <= h) {
                    break;
                }
                acks.push((c, self.held[c].remove(0)));
            }
        }
        acks
    }

    /// Whether no copy waits: every recorded one was applied.
    pub(super) fn idle(&self) -> bool {
        self.pending.iter().all(Vec::is_empty)
    }
}

/// The ROUND_END copy runs of a generated source: each of `targets` (ascending, distinct
/// pages of channel `c`) gets the content of one of `sources` (pages sent in this round
/// and never a target), preferring one of another channel (`owner`), chosen by the
/// target page. Adjacent targets whose sources continue share a run, so the runs are
/// canonical.
pub(super) fn late_runs(
    c: usize,
    targets: &[u64],
    sources: &[u64],
    owner: impl Fn(u64) -> usize,
) -> Vec<CopyRun> {
    let elsewhere: Vec<u64> = sources.iter().copied().filter(|&s| owner(s) != c).collect();
    let from = match elsewhere.is_empty() {
        true => sources,
        false => &elsewhere[..],
    };
    let mut runs: Vec<CopyRun> = Vec::new();
    for &t in targets {
        let Some(&s) = from.get(t as usize % from.len().max(1)) else {
            break;
        };
        match runs.last_mut() {
            Some(r)
                if r.start.0 + u64::from(r.count) == t && r.from.0 + u64::from(r.count) == s =>
            {
                r.count += 1
            }
            _ => runs.push(CopyRun {
                start: PageIndex(t),
                count: 1,
                from: PageIndex(s),
            }),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_round_waits_for_the_copies_of_its_rounds() {
        let mut re = RoundEnd::new(2);
        re.record(1, Round(0), 3, 8);
        re.ended(1, Round(0));
        // Channel 0 has not ended round 0: the copy waits, and channel 1's ACK ROUND.
        assert_eq!(re.release(None), []);
        re.ended(0, Round(0));
        assert_eq!(re.release(Some(Round(0))), [(0, Round(0)), (1, Round(0))]);
        assert_eq!(re.applied, [0, 1]);
        assert!(re.idle());
        // The bound is per round: a new round starts from 0.
        re.record(1, Round(2), 8, 8);
    }

    #[test]
    #[should_panic(expected = "ROUND_END pages")]
    fn the_bound_is_the_pages_the_channel_carries() {
        let mut re = RoundEnd::new(1);
        re.record(0, Round(0), 5, 8);
        re.record(0, Round(0), 4, 8);
    }

    #[test]
    fn late_runs_prefer_sources_elsewhere_and_are_canonical() {
        // Two channels, chunks of 2 pages: channel 0 owns 0, 1, 4, 5; channel 1 owns 2, 3.
        let owner = |p: u64| ((p / 2) % 2) as usize;
        let runs = late_runs(0, &[4, 5], &[0, 2, 3], owner);
        // Sources 2 and 3 (channel 1's), picked by target: 4 % 2 = 0 -> 2, 5 % 2 -> 3,
        // continuing: one run.
        assert_eq!(
            runs,
            [CopyRun {
                start: PageIndex(4),
                count: 2,
                from: PageIndex(2)
            }]
        );
        // Only sources of this channel: they serve.
        assert_eq!(late_runs(0, &[4], &[0], owner)[0].from, PageIndex(0));
        assert_eq!(late_runs(0, &[4], &[], owner), []);
    }
}
