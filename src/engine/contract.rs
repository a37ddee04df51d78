//! An outside check of the backlog contract.
//!
//! [`ContractChecker`] watches submits and events, as a caller sees them, and reports every
//! broken promise: a request completed twice or never, a `Promoted` for a request that was not
//! backlogged or after its completion, a backlogged request completed without `Promoted`, and
//! promotions out of FIFO order, and a request that went `InProgress` after an older request was
//! backlogged yet completed before that request's `Promoted` (the newer one overtook the
//! backlog). Tests run every engine through it, and so does the bench in `--check` mode.
//!
//! Events may arrive before the submitter learns its submit result (another thread may poll and
//! deliver in between), so the checker matches results and events per request whatever their
//! arrival order (each rule is checked whichever of the two comes second), and it checks the
//! ordering rules only between requests where one's `Backlogged` return happened before the
//! other's submit began, which is the order the engine must respect.
//!
//! A batch submit ([`begin_batch`](ContractChecker::begin_batch),
//! [`submitted_batch`](ContractChecker::submitted_batch)) is judged as its requests submitted in
//! order: the counts must describe a prefix of the batch, and the backlogged requests of one
//! batch must be promoted in batch order (their submits all begin before any returns, so the
//! timing rule above cannot order them).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::{BatchSubmitted, Event, SubmitError, SubmitErrorKind, Submitted};

#[derive(Debug, Default, Clone)]
struct Track {
    queue: usize,
    submit_start: u64,
    submit_return: Option<u64>,
    outcome: Option<Submitted>,
    promoted: Vec<u64>,
    completed: Vec<u64>,
    refused: bool,
    /// The batch it was last submitted in, and its place there.
    batch: Option<(u64, usize)>,
}

/// Counts and violations seen by a [`ContractChecker`].
#[derive(Debug, Default, Clone)]
pub struct ContractReport {
    /// Submits answered `InProgress`.
    pub in_progress: u64,
    /// Submits answered `Backlogged`.
    pub backlogged: u64,
    /// Submits refused (busy or rejected).
    pub refused: u64,
    /// `Promoted` events.
    pub promoted: u64,
    /// Final completions.
    pub completed: u64,
    /// Accepted requests without a final completion yet.
    pub pending: u64,
    /// Every broken rule, described.
    pub violations: Vec<String>,
}

/// Records what callers see and checks it against the contract.
#[derive(Debug, Default)]
pub struct ContractChecker {
    clock: AtomicU64,
    batches: AtomicU64,
    tracks: Mutex<HashMap<u64, Track>>,
    violations: Mutex<Vec<String>>,
}

impl ContractChecker {
    /// A checker with nothing recorded.
    pub fn new() -> Self {
        Self::default()
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    fn violation(&self, v: String) {
        let mut list = self.violations.lock().unwrap_or_else(|e| e.into_inner());
        if list.len() < 1000 {
            list.push(v);
        }
    }

    /// Call right before submitting request `user_data` to queue `queue`, then call
    /// [`submitted`](Self::submitted) with the result. `user_data` must be unique per request;
    /// a request refused earlier may be submitted again under its id.
    pub fn begin_submit(&self, queue: usize, user_data: u64) -> u64 {
        let t = self.tick();
        let mut tracks = self.tracks.lock().unwrap_or_else(|e| e.into_inner());
        let track = tracks.entry(user_data).or_default();
        if track.submit_return.is_some() && !track.refused {
            drop(tracks);
            self.violation(format!("request {user_data} submitted again while the engine still owns it"));
            return t;
        }
        track.queue = queue;
        track.submit_start = t;
        track.submit_return = None;
        track.refused = false;
        track.batch = None;
        t
    }

    /// Call right before `submit_batch` with the ids of the batch's requests, in order, then
    /// call [`submitted_batch`](Self::submitted_batch) with the same ids and the result.
    pub fn begin_batch(&self, queue: usize, ids: &[u64]) {
        let batch = self.batches.fetch_add(1, Ordering::Relaxed);
        for (i, &id) in ids.iter().enumerate() {
            self.begin_submit(queue, id);
            let mut tracks = self.tracks.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = tracks.get_mut(&id) {
                t.batch = Some((batch, i));
            }
        }
    }

    /// Call with a batch submit's result: the first `in_progress` ids went InProgress, the
    /// next `backlogged` Backlogged, and the rest came back untouched (refused).
    pub fn submitted_batch(&self, ids: &[u64], result: &BatchSubmitted) {
        let accepted = result.in_progress + result.backlogged;
        if accepted > ids.len() {
            self.violation(format!("a batch of {} requests reported {accepted} accepted", ids.len()));
        }
        if accepted < ids.len() && result.refused.is_none() && result.backlogged == 0 {
            self.violation(format!(
                "a batch took {accepted} of {} requests without a refusal or a backlogged request",
                ids.len()
            ));
        }
        for (i, &id) in ids.iter().enumerate() {
            let outcome = if i < result.in_progress {
                Ok(Submitted::InProgress)
            } else if i < accepted {
                Ok(Submitted::Backlogged)
            } else {
                Err(result.refused.as_ref().map_or_else(|| "handed back".to_string(), kind))
            };
            self.settle(id, outcome);
        }
    }

    /// Call with the submit's result.
    pub fn submitted<S>(&self, user_data: u64, result: &Result<Submitted, SubmitError<S>>) {
        if let Err(e) = result {
            if e.request.user_data != user_data {
                self.violation(format!("request {user_data}: refused submit returned another request"));
                return;
            }
        }
        self.settle(user_data, result.as_ref().copied().map_err(|e| kind(&e.kind)));
    }

    /// Records a submit's outcome (`Err` carries the refusal's description).
    fn settle(&self, user_data: u64, result: Result<Submitted, String>) {
        let t = self.tick();
        let mut tracks = self.tracks.lock().unwrap_or_else(|e| e.into_inner());
        let Some(track) = tracks.get_mut(&user_data) else {
            drop(tracks);
            self.violation(format!("request {user_data}: submit result without begin_submit"));
            return;
        };
        track.submit_return = Some(t);
        match result {
            Ok(s) => {
                track.outcome = Some(s);
                // Events that came before this result, checked now that the result is known.
                let problem = match s {
                    Submitted::InProgress if !track.promoted.is_empty() => {
                        Some("Promoted although the submit said InProgress")
                    }
                    Submitted::Backlogged if !track.completed.is_empty() && track.promoted.is_empty() => {
                        Some("backlogged but completed without Promoted")
                    }
                    _ => None,
                };
                if let Some(p) = problem {
                    drop(tracks);
                    self.violation(format!("request {user_data}: {p}"));
                }
            }
            Err(why) => {
                track.refused = true;
                let early = !track.promoted.is_empty() || !track.completed.is_empty();
                if early {
                    drop(tracks);
                    self.violation(format!("request {user_data}: refused ({why}) yet events were delivered"));
                }
            }
        }
    }

    /// Call for every event a sink receives.
    pub fn event<S>(&self, event: &Event<S>) {
        let t = self.tick();
        let (user_data, promoted) = match event {
            Event::Promoted { user_data } => (*user_data, true),
            Event::Completed(c) => (c.request.user_data, false),
        };
        let mut tracks = self.tracks.lock().unwrap_or_else(|e| e.into_inner());
        let Some(track) = tracks.get_mut(&user_data) else {
            drop(tracks);
            self.violation(format!("event for request {user_data}, which was never submitted"));
            return;
        };
        let problem = if promoted {
            track.promoted.push(t);
            if !track.completed.is_empty() {
                Some("Promoted after its final completion")
            } else if track.promoted.len() > 1 {
                Some("Promoted twice")
            } else if track.outcome == Some(Submitted::InProgress) {
                Some("Promoted although the submit said InProgress")
            } else {
                None
            }
        } else {
            track.completed.push(t);
            if track.completed.len() > 1 {
                Some("completed twice")
            } else if track.outcome == Some(Submitted::Backlogged) && track.promoted.is_empty() {
                Some("backlogged but completed without Promoted")
            } else {
                None
            }
        };
        drop(tracks);
        if let Some(p) = problem {
            self.violation(format!("request {user_data}: {p}"));
        }
    }

    /// Checks everything recorded: per-request sequences, nothing pending, FIFO promotion.
    pub fn report(&self) -> ContractReport {
        let tracks = self.tracks.lock().unwrap_or_else(|e| e.into_inner());
        let mut r = ContractReport {
            violations: self.violations.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            ..Default::default()
        };
        let mut by_queue: HashMap<usize, Vec<(u64, u64, u64)>> = HashMap::new();
        // Per queue: backlogged requests (submit return, first Promoted or never) and
        // in-progress ones (submit start, first completion).
        let mut overtaking: HashMap<usize, (Vec<Span>, Vec<Span>)> = HashMap::new();
        // Per batch: (place in the batch, first Promoted) of its backlogged requests.
        let mut batches: HashMap<u64, Vec<(usize, u64)>> = HashMap::new();
        for (&id, t) in tracks.iter() {
            r.promoted += t.promoted.len() as u64;
            r.completed += t.completed.len() as u64;
            if t.refused {
                r.refused += 1;
                continue;
            }
            match t.outcome {
                Some(Submitted::InProgress) => {
                    r.in_progress += 1;
                    if let Some(&done) = t.completed.first() {
                        overtaking.entry(t.queue).or_default().1.push((t.submit_start, done));
                    }
                }
                Some(Submitted::Backlogged) => {
                    r.backlogged += 1;
                    if let Some(ret) = t.submit_return {
                        let promoted = t.promoted.first().copied().unwrap_or(u64::MAX);
                        overtaking.entry(t.queue).or_default().0.push((ret, promoted));
                    }
                    if let (Some((b, i)), Some(&p)) = (t.batch, t.promoted.first()) {
                        batches.entry(b).or_default().push((i, p));
                    }
                    if t.promoted.is_empty() {
                        r.violations.push(format!("request {id}: backlogged and never promoted"));
                    } else if let Some(ret) = t.submit_return {
                        by_queue.entry(t.queue).or_default().push((t.promoted[0], t.submit_start, ret));
                    }
                }
                None => {
                    if t.submit_return.is_none() {
                        r.violations.push(format!("request {id}: submit never returned"));
                    }
                }
            }
            if t.completed.is_empty() {
                r.pending += 1;
                r.violations.push(format!("request {id}: accepted and never completed"));
            }
        }
        for (queue, mut list) in by_queue {
            // In promotion order, a request must not have been backlogged (returned) before a
            // request promoted ahead of it even began its submit.
            list.sort_unstable();
            let mut max_start = 0;
            for &(promoted, start, ret) in &list {
                if ret < max_start {
                    r.violations.push(format!(
                        "queue {queue}: FIFO broken, a request backlogged at t={ret} was promoted (t={promoted}) after one submitted later"
                    ));
                    break;
                }
                max_start = max_start.max(start);
            }
        }
        for (batch, mut list) in batches {
            list.sort_unstable();
            if list.windows(2).any(|w| w[1].1 < w[0].1) {
                r.violations.push(format!(
                    "batch {batch}: FIFO broken, its backlogged requests were promoted out of batch order"
                ));
            }
        }
        for (queue, (mut backlogged, mut in_progress)) in overtaking {
            // A request that went InProgress after an older request's Backlogged return must not
            // complete before that request's Promoted: sweep in time order, keeping the latest
            // promotion among the requests backlogged before each submit began.
            backlogged.sort_unstable();
            in_progress.sort_unstable();
            let (mut i, mut latest_promotion) = (0, 0);
            for &(start, done) in &in_progress {
                while i < backlogged.len() && backlogged[i].0 < start {
                    latest_promotion = latest_promotion.max(backlogged[i].1);
                    i += 1;
                }
                if done < latest_promotion {
                    r.violations.push(format!(
                        "queue {queue}: a request submitted at t={start} went InProgress and completed (t={done}) \
                         before an older backlogged request was promoted"
                    ));
                    break;
                }
            }
        }
        r.violations.truncate(1000);
        r
    }
}

/// Two instants of one request: (backlogged return, first Promoted) or (submit start, first
/// completion).
type Span = (u64, u64);

fn kind(k: &SubmitErrorKind) -> String {
    k.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Buf, Completion, Direction, Iv, Request};

    fn req(id: u64) -> Request<()> {
        Request::new((), Direction::Encrypt, Iv::default(), Buf::Host(vec![]), id)
    }

    fn done(id: u64) -> Event<()> {
        Event::Completed(Completion { request: req(id), result: Ok(()) })
    }

    #[test]
    fn accepts_a_correct_history_in_any_arrival_order() {
        let c = ContractChecker::new();
        c.begin_submit(0, 1);
        c.submitted::<()>(1, &Ok(Submitted::InProgress));
        c.begin_submit(0, 2);
        // Events delivered by another thread before the submitter sees Backlogged.
        c.event(&Event::<()>::Promoted { user_data: 2 });
        c.submitted::<()>(2, &Ok(Submitted::Backlogged));
        c.event(&done(1));
        c.event(&done(2));
        let r = c.report();
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!((r.in_progress, r.backlogged, r.completed), (1, 1, 2));
    }

    #[test]
    fn checks_an_early_promoted_against_the_submit_result_that_follows() {
        let c = ContractChecker::new();
        c.begin_submit(0, 1);
        c.event(&Event::<()>::Promoted { user_data: 1 });
        c.submitted::<()>(1, &Ok(Submitted::InProgress));
        c.event(&done(1));
        c.begin_submit(0, 2);
        c.event(&done(2));
        c.submitted::<()>(2, &Ok(Submitted::Backlogged));
        c.event(&Event::<()>::Promoted { user_data: 2 });
        let text = c.report().violations.join("\n");
        assert!(text.contains("request 1: Promoted although the submit said InProgress"), "{text}");
        assert!(text.contains("request 2: backlogged but completed without Promoted"), "{text}");
    }

    #[test]
    fn catches_a_newer_in_progress_request_overtaking_the_backlog() {
        let c = ContractChecker::new();
        c.begin_submit(0, 1);
        c.submitted::<()>(1, &Ok(Submitted::Backlogged));
        c.begin_submit(0, 2);
        c.submitted::<()>(2, &Ok(Submitted::InProgress));
        c.event(&done(2));
        c.event(&Event::<()>::Promoted { user_data: 1 });
        c.event(&done(1));
        let text = c.report().violations.join("\n");
        assert!(text.contains("before an older backlogged request was promoted"), "{text}");
        // The same with request 2's submit begun before 1's Backlogged return is fine.
        let c = ContractChecker::new();
        c.begin_submit(0, 1);
        c.begin_submit(0, 2);
        c.submitted::<()>(1, &Ok(Submitted::Backlogged));
        c.submitted::<()>(2, &Ok(Submitted::InProgress));
        c.event(&done(2));
        c.event(&Event::<()>::Promoted { user_data: 1 });
        c.event(&done(1));
        assert!(c.report().violations.is_empty(), "{:?}", c.report().violations);
    }

    #[test]
    fn judges_a_batch_as_its_requests_in_order() {
        let c = ContractChecker::new();
        c.begin_batch(0, &[1, 2, 3, 4]);
        let r = BatchSubmitted { in_progress: 1, backlogged: 2, refused: Some(SubmitErrorKind::Busy) };
        c.submitted_batch(&[1, 2, 3, 4], &r);
        c.event(&done(1));
        c.event(&Event::<()>::Promoted { user_data: 3 });
        c.event(&Event::<()>::Promoted { user_data: 2 });
        c.event(&done(2));
        c.event(&done(3));
        let r = c.report();
        assert_eq!((r.in_progress, r.backlogged, r.refused), (1, 2, 1));
        let text = r.violations.join("\n");
        assert!(text.contains("promoted out of batch order"), "{text}");
        // A batch that ends after a Backlogged request hands the rest back; request 3 goes
        // again in a batch of its own. In order, all is well.
        let c = ContractChecker::new();
        c.begin_batch(0, &[1, 2, 3]);
        let r = BatchSubmitted { in_progress: 1, backlogged: 1, refused: None };
        c.submitted_batch(&[1, 2, 3], &r);
        c.begin_batch(0, &[3]);
        c.submitted_batch(&[3], &BatchSubmitted { in_progress: 0, backlogged: 1, refused: None });
        for e in [Event::<()>::Promoted { user_data: 2 }, Event::Promoted { user_data: 3 }] {
            c.event(&e);
        }
        for id in 1..=3 {
            c.event(&done(id));
        }
        assert!(c.report().violations.is_empty(), "{:?}", c.report().violations);
        // Counts that cannot be true of the batch.
        let c = ContractChecker::new();
        c.begin_batch(0, &[1, 2]);
        c.submitted_batch(&[1, 2], &BatchSubmitted { in_progress: 1, backlogged: 0, refused: None });
        c.begin_batch(0, &[5]);
        c.submitted_batch(&[5], &BatchSubmitted { in_progress: 2, backlogged: 0, refused: None });
        let text = c.report().violations.join("\n");
        assert!(text.contains("took 1 of 2 requests without a refusal"), "{text}");
        assert!(text.contains("a batch of 1 requests reported 2 accepted"), "{text}");
    }

    #[test]
    fn catches_lost_double_and_unpromoted_requests_and_fifo() {
        let c = ContractChecker::new();
        for id in 1..=4 {
            c.begin_submit(0, id);
            c.submitted::<()>(id, &Ok(Submitted::Backlogged));
        }
        c.event(&done(1)); // no Promoted
        c.event(&Event::<()>::Promoted { user_data: 3 });
        c.event(&Event::<()>::Promoted { user_data: 2 }); // 2 was backlogged before 3 began
        c.event(&done(2));
        c.event(&done(2)); // twice
        let r = c.report();
        let text = r.violations.join("\n");
        assert!(text.contains("request 1: backlogged but completed without Promoted"), "{text}");
        assert!(text.contains("request 2: completed twice"), "{text}");
        assert!(text.contains("request 4: backlogged and never promoted"), "{text}");
        assert!(text.contains("request 3: accepted and never completed"), "{text}");
        assert!(text.contains("FIFO broken"), "{text}");
    }
}
