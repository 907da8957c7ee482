//! A switch from one candidate to another, as the statistics log it (its reason and
//! the figures that decided it), and the statistics. The choice itself is in the
//! parent module.

use super::*;

impl Selector {
    /// Makes arm `to` the choice at `now`, `faster` than the current one (or as fast
    /// for less core time), and logs why with the figures that decided it.
    pub(super) fn switch_to(&mut self, to: usize, now: Instant, faster: bool) {
        let from = self.current;
        let a = &self.arms[from];
        let cpu = self.cores / a.cost.max(1e-12);
        // What the model expects of the current choice; below its core's rate, the
        // link bounds it.
        let from_rate = self.rate(from);
        // The link can only be the reason for more compression: a faster candidate
        // that compresses no more (raw after zstd:-5 on random bytes) is faster for
        // the core.
        let reason = if !faster {
            Reason::Cheaper
        } else if from_rate < cpu && self.ratio(to) < self.ratio(from) {
            Reason::LinkBound
        } else {
            Reason::CpuBound
        };
        let detail = format!(
            "link {} MB/s{}{}, {}: {:.0} MB/s of core, ratio {:.2}, expects {:.0} MB/s; {}: {:.0} MB/s of core, ratio {:.2}, expects {:.0} MB/s",
            self.link.map_or("?".into(), |l| format!("{:.0}", l / 1e6)),
            match (
                self.limited,
                self.fixed_link(),
                self.receiver_cap().is_some()
            ) {
                (_, _, true) => " (the receiver limits)",
                (true, true, _) => " (busy, a fixed pipe)",
                (true, false, _) => " (busy)",
                _ => "",
            },
            self.idle
                .map_or(String::new(), |c| format!(", {c:.2} core idle")),
            a.label,
            cpu / 1e6,
            self.ratio(from),
            from_rate / 1e6,
            self.arms[to].label,
            self.cores / self.arms[to].cost.max(1e-12) / 1e6,
            self.ratio(to),
            self.rate(to) / 1e6,
        );
        let (from_l, to_l) = (a.label.clone(), self.arms[to].label.clone());
        let lost = now.saturating_duration_since(self.chosen_at) < TRIAL;
        let a = &mut self.arms[from];
        a.losses = if lost {
            (a.losses + 1).min(MAX_LOSSES)
        } else {
            0
        };
        let b = &mut self.arms[to];
        (b.win_bytes, b.win_secs, b.win_setup) = (0.0, 0.0, 0.0);
        self.chosen_at = now;
        if self.ratio(to) > self.ratio(from) {
            self.settle_until = now + SETTLE;
        }
        self.log_switch(from_l, to_l, reason.as_str(), now, detail);
        self.current = to;
    }

    /// Counts a switch `from` → `to` for `reason` and logs it with its figures.
    pub(super) fn log_switch(
        &mut self,
        from: String,
        to: String,
        reason: &str,
        now: Instant,
        detail: String,
    ) {
        match self
            .switches
            .iter_mut()
            .find(|s| s.from == from && s.to == to && s.reason == reason)
        {
            Some(s) => s.count += 1,
            None => self.switches.push(CodecSwitch {
                from: from.clone(),
                to: to.clone(),
                reason: reason.into(),
                count: 1,
                ..Default::default()
            }),
        }
        if self.log.len() == LOG {
            self.log.remove(0);
        }
        self.log.push(CodecSwitch {
            from,
            to,
            reason: reason.into(),
            count: 1,
            at_ms: now.saturating_duration_since(self.started).as_secs_f64() * 1e3,
            channel: self.channel,
            detail,
        });
    }

    /// The statistics so far.
    pub(crate) fn stats(&self) -> AdaptiveStats {
        AdaptiveStats {
            choices: self
                .arms
                .iter()
                .map(|a| a.stats.clone())
                .chain(self.delta.as_ref().and_then(|g| g.stats()))
                .collect(),
            switches: self.switches.clone(),
            recent: self.log.clone(),
            explored_frames: self.explored,
            paired_samples: self.arms.iter().map(|a| u64::from(a.pairs)).sum(),
            link_bytes_per_s: self.link.unwrap_or(0.0),
            peak_unacked_bytes: self.peak_unacked,
            windows: self.windows,
            receiver_windows: self.receiver_windows,
        }
    }
}
