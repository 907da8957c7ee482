//! Feeding the codec engine: submitting a frame's data pages as a job, sending the
//! jobs that finish, and waiting for the engine or the channel to free a buffer.

use std::time::{Duration, Instant};

use pagewire_accel::{EncodeParams, Job, Level, PageList, Tag};
use pagewire_protocol::{CodecId, RegionId};

use crate::error::{MigrationError, Wait};
use crate::source::split::PageSplit;

use super::pages::frame_lengths;
use super::{FrameMeta, Worker, page_key, run_keys};

impl Worker {
    pub(super) fn submit(
        &mut self,
        region: RegionId,
        split: &PageSplit,
    ) -> Result<(), MigrationError> {
        let mut progress = Instant::now();
        // An inline engine encodes the frame at once, its shortest path (no request,
        // no poll: `Engine::encode_now`), unless it cannot (a job then).
        let job = match self.s.engine.is_inline() {
            true => None,
            false => Some(self.take_job(&mut progress)?),
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        let (arm, chosen) = match &mut self.s.adaptive {
            Some(sel) => {
                let (i, p) = sel.choose(Instant::now());
                (Some(i), p)
            }
            None => (None, self.s.params),
        };
        let (params, delta) = self.delta_or(region, split, arm, chosen);
        let started = Instant::now();
        let measure = arm.is_some() && self.s.inline_encode;
        let cpu0 = measure.then(pagewire_accel::thread_cpu_time);
        let mut staged = match self.s.dedup.is_some() && params.codec != CodecId::RAW {
            true => Some(self.dedupe(region, split)?),
            false => None,
        };
        // The copy and the hashes are part of this candidate's cost, spread over every
        // page they scanned (below): charged to the few pages left after the copies,
        // they made lz4 look 6 MB/s of core where most pages were copies, and raw, which
        // skips dedup (and so sends those pages whole), look better.
        // What backing memory for the first time took is not (see `Staged::setup`).
        let (setup, setup_wall) = staged
            .as_ref()
            .map_or((Duration::ZERO, Duration::ZERO), |st| {
                (st.setup, st.setup_wall)
            });
        let mut dedup_cpu = cpu0.map(|t0| {
            pagewire_accel::thread_cpu_time()
                .saturating_sub(t0)
                .saturating_sub(setup)
        });
        let mut copied = 0;
        if let Some(st) = &staged {
            let data: u64 = st.data.iter().map(|r| u64::from(r.count)).sum();
            let copies: u64 = st
                .copies
                .iter()
                .chain(&st.round_end)
                .map(|c| u64::from(c.count))
                .sum();
            if let (Some(sel), Some(i)) = (self.s.adaptive.as_mut(), arm) {
                sel.observe_dedup(i, data, copies);
            }
            dedup_cpu = dedup_cpu.map(|d| d.mul_f64(data as f64 / (data + copies).max(1) as f64));
        }
        if let Some(st) = &mut staged {
            for (runs, round_end) in [(&st.copies, false), (&st.round_end, true)] {
                if !runs.is_empty() {
                    copied += self.send_copies(region, runs, round_end)?;
                }
            }
            if st.data.is_empty() {
                // Every data page went as a copy: what is left has no payload.
                drop(job);
                if let Some(d) = self.s.dedup.as_mut() {
                    d.give_back(std::mem::take(&mut st.buf));
                }
                if split.zero.is_empty() && split.uniform.is_empty() {
                    return Ok(());
                }
                return self.send_zero(region, split);
            }
        }
        if let Some(i) = arm {
            let runs = if staged.is_some() {
                &[][..]
            } else {
                &split.data[..]
            };
            self.pair_sample(
                region,
                i,
                &chosen,
                staged.as_ref().map(|s| &s.buf[..]),
                runs,
            );
        }
        let cache_setup = self.cache_setup_time();
        let (data_runs, staged, hashes) = match staged {
            Some(st) => (st.data, Some(st.buf), st.hashes),
            None => (split.data.clone(), None, Vec::new()),
        };
        let mut meta = FrameMeta {
            region,
            data_runs,
            zero_runs: split.zero.clone(),
            uniform_runs: split.uniform.clone(),
            arm,
            submitted: started,
            cpu: None,
            late: measure,
            staged,
            hashes,
            copied,
            setup: setup_wall,
            delta,
            cache_setup,
        };
        let mut job = match job {
            Some(job) => job,
            None => {
                let t0 = measure.then(pagewire_accel::thread_cpu_time);
                let page_size = self.s.engine.config().page_size;
                let mut list = std::mem::replace(&mut self.list, PageList::new(page_size));
                let done = self
                    .fill_list(&mut list, &meta)
                    .map(|()| self.s.engine.encode_now(params, &list, &mut self.lengths));
                // No pointer into the frame's pages outlives the encode.
                list.reset(page_size);
                self.list = list;
                match done? {
                    Some(Ok((out, buf))) => {
                        if let Some(t0) = t0 {
                            meta.cpu = self.encode_cpu(t0, cache_setup, dedup_cpu);
                            meta.late = false;
                        }
                        let payload = match out.in_place {
                            true => {
                                self.s.engine.recycle_buf(buf);
                                None
                            }
                            false => Some(buf),
                        };
                        let lengths = frame_lengths(out.codec, &self.lengths);
                        return self.send_encoded(meta, out, payload, lengths);
                    }
                    Some(Err(source)) => {
                        return Err(MigrationError::Codec {
                            channel: self.s.ch,
                            source,
                        });
                    }
                    // Earlier jobs wait, or no buffer is free: a job.
                    None => self.take_job(&mut progress)?,
                }
            }
        };
        self.fill_list(job.encode(Tag(tag), params), &meta)?;
        self.pending.insert(tag, meta);
        self.batch.push_back(job);
        if measure {
            let t0 = pagewire_accel::thread_cpu_time();
            self.s.engine.submit(&mut self.batch)?;
            // Measured only when that call ran the job: a full engine makes the loop
            // below wait, and send other frames, on this thread.
            if self.batch.is_empty() {
                let cpu = self.encode_cpu(t0, cache_setup, dedup_cpu);
                if let Some(m) = self.pending.get_mut(&tag) {
                    m.cpu = cpu;
                    m.late = false;
                }
            }
        }
        loop {
            self.s.engine.submit(&mut self.batch)?;
            if self.batch.is_empty() {
                break;
            }
            self.wait_engine(&mut progress)?;
        }
        // Send whatever is ready without waiting.
        self.drain_some(None).map(drop)
    }

    /// The CPU time a frame took to encode on this thread since `t0`, plus its
    /// dedup's `dedup_cpu`, less what backing the delta cache's new memory took since
    /// `cache_setup` (`DeltaCache::setup_time`); `None` when the clock cannot be read
    /// (wall time then).
    fn encode_cpu(
        &self,
        t0: Duration,
        cache_setup: Duration,
        dedup_cpu: Option<Duration>,
    ) -> Option<Duration> {
        let grown = self.cache_setup_time().saturating_sub(cache_setup);
        let encode = pagewire_accel::thread_cpu_time()
            .saturating_sub(t0)
            .saturating_sub(grown);
        Some(encode + dedup_cpu.unwrap_or_default()).filter(|d| !d.is_zero())
    }

    /// A free request, waiting (as [`Worker::wait_engine`]) while none is.
    fn take_job(&mut self, progress: &mut Instant) -> Result<Job, MigrationError> {
        loop {
            if let Some(j) = self.s.engine.job() {
                return Ok(j);
            }
            self.wait_engine(progress)?;
        }
    }

    /// Fills `list` with the data pages of the frame `meta` describes: its copy of
    /// them when dedup staged one, else their guest memory.
    fn fill_list(
        &self,
        list: &mut PageList<'static>,
        meta: &FrameMeta,
    ) -> Result<(), MigrationError> {
        let ps = self.s.memory.page_size() as usize;
        let region = meta.region;
        let bad = |e: pagewire_accel::PagesError| MigrationError::Protocol {
            channel: self.s.ch,
            what: e.to_string(),
        };
        match &meta.staged {
            Some(buf) => {
                // One pointer to the whole buffer: the runs may be read as one slice.
                let base = buf.as_ptr();
                let mut off = 0;
                for run in &meta.data_runs {
                    let n = run.count as usize * ps;
                    if off + n > buf.len() {
                        return Err(MigrationError::Worker(self.s.ch));
                    }
                    let key = page_key(region, run.start.0);
                    // SAFETY: `off..off + n` lies in the frame's copy of its pages, a
                    // heap allocation that `meta` holds and that neither moves nor
                    // changes until the frame is sent (then it goes back to the pool),
                    // after its encode; nothing writes it meanwhile. The runs follow
                    // each other in the buffer, so the codecs read it in place.
                    unsafe { list.push_stable(base.wrapping_add(off), run.count, key) }
                        .map_err(bad)?;
                    off += n;
                }
            }
            None => {
                for run in &meta.data_runs {
                    let (ptr, _) = self
                        .s
                        .memory
                        .span(region, run.start.0, u64::from(run.count))
                        .ok_or_else(|| MigrationError::Protocol {
                            channel: self.s.ch,
                            what: format!("run {run:?} outside region {region:?}"),
                        })?;
                    let key = page_key(region, run.start.0);
                    // SAFETY: the run lies inside a region of `self.s.memory`, which this
                    // worker keeps alive (an `Arc`) beyond the encode; nothing holds a
                    // `&mut` to guest memory, and accel reads these pages only through
                    // raw-pointer copies into its scratch and the zero scan, never as a
                    // `&[u8]`. Guest writes meanwhile make the encoded content stale or
                    // torn, and re-dirty the page, so its next round sends it again.
                    unsafe { list.push_raw(ptr.as_ptr(), run.count, key) }.map_err(bad)?;
                }
            }
        }
        Ok(())
    }

    /// The parameters of a frame the adaptive choice encodes as arm `arm` with
    /// `chosen`, and whether it goes as delta instead (see `adaptive/delta.rs`): from
    /// the second round on, with delta among the candidates, the frame keeps what it
    /// sends in the delta cache (raw frames forget theirs once anything was kept), and
    /// from the third, one whose data pages are all cached may go as delta. A paused
    /// round keeps nothing but through its delta frames (which update the pages they
    /// carry): no round that could use it follows, and a page's first
    /// copy into the cache costs a fault on its memory (3-6 µs a page here, where the
    /// host takes freed memory back) inside the downtime; the pages it sends are
    /// forgotten instead, in case another paused round follows.
    fn delta_or(
        &mut self,
        region: RegionId,
        split: &PageSplit,
        arm: Option<usize>,
        chosen: EncodeParams,
    ) -> (EncodeParams, bool) {
        let (Some(i), Some(sel), Some(cache)) =
            (arm, self.s.adaptive.as_mut(), self.s.delta.as_deref())
        else {
            return (chosen, false);
        };
        if !sel.delta_enabled() || self.round_no < 1 {
            return (chosen, false);
        }
        let compressor = chosen.codec != CodecId::RAW;
        let keys = || run_keys(region, split.data.iter().map(|r| (r.start.0, r.count)));
        let cached = || keys().all(|k| cache.contains(k));
        if self.round_no >= 2 && compressor && sel.delta_for(i, Instant::now(), cached) {
            return (EncodeParams::new(CodecId::DELTA, Level::DEFAULT), true);
        }
        let mut params = chosen;
        if !self.paused {
            params.remember = compressor || self.remembered;
            self.remembered |= compressor;
        } else if self.remembered {
            keys().for_each(|k| cache.invalidate(k));
        }
        (params, false)
    }

    /// Sends the engine's finished jobs, waiting up to `wait` for the first; returns
    /// how many.
    fn drain_some(&mut self, wait: Option<Duration>) -> Result<usize, MigrationError> {
        let mut comps = std::mem::take(&mut self.completions);
        let res = (|| {
            let n = self.s.engine.poll(&mut comps, 64, wait)?;
            for c in comps.drain(..) {
                self.send_completion(c)?;
            }
            Ok(n)
        })();
        comps.clear();
        self.completions = comps;
        res
    }

    /// Waits for what frees an engine request or output buffer: a finished job (sent
    /// at once) or a finished send (whose payload buffer goes back to the engine's
    /// pool). Buffers held by sends come back only through the channel's completions,
    /// so those are reaped here too, and waited for when nothing else can happen
    /// (io_uring completes sends only when asked). `progress` is when something last
    /// came back; with nothing for `send_timeout` since, fails with
    /// [`MigrationError::Timeout`].
    fn wait_engine(&mut self, progress: &mut Instant) -> Result<(), MigrationError> {
        let timeout = self.s.send_timeout;
        let left = timeout.saturating_sub(progress.elapsed());
        if left.is_zero() {
            return Err(MigrationError::Timeout {
                channel: Some(self.s.ch),
                what: if self.s.engine.in_flight() > 0 {
                    Wait::Engine
                } else {
                    Wait::Send
                },
                after: timeout,
            });
        }
        let sends = self.sends.len();
        let mut got = if self.s.engine.in_flight() > 0 {
            self.drain_some(Some(left.min(Duration::from_millis(50))))?
        } else {
            0
        };
        if self.s.engine.in_flight() == 0 && got == 0 && !self.sends.is_empty() {
            // Every buffer not in the pool is with the channel: wait for its sends
            // (bounded by the channel's send timeout, which is `send_timeout`).
            self.reap(true)?;
        } else {
            self.reap(false)?;
        }
        got += sends.saturating_sub(self.sends.len());
        if got > 0 {
            *progress = Instant::now();
        } else if self.s.engine.in_flight() == 0 && self.sends.is_empty() {
            // Nothing is out, yet nothing is free: the engine lost track of a buffer.
            return Err(MigrationError::Protocol {
                channel: self.s.ch,
                what: format!(
                    "the codec engine has no free request or buffer and nothing in flight ({:?})",
                    self.s.engine
                ),
            });
        }
        Ok(())
    }

    pub(super) fn drain(&mut self) -> Result<(), MigrationError> {
        let mut progress = Instant::now();
        while !self.batch.is_empty() || self.s.engine.in_flight() > 0 {
            if !self.batch.is_empty() {
                self.s.engine.submit(&mut self.batch)?;
            }
            self.wait_engine(&mut progress)?;
        }
        Ok(())
    }
}
