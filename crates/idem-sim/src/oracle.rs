//! The oracle: what a user of Idem may rely on, judged from what clients saw in true
//! (simulated) time. It does not use `idem-core`: fences, fingerprints and responses are
//! opaque values to it, so a bug in the rules cannot hide in the judge.
//!
//! * Never two grants of one key whose trusted windows overlap. A window opens when
//!   the client received NEW and closes at the first of: the end the SDK trusts (the
//!   lease measured from the moment the Reserve was sent, less the skew margin,
//!   extended the same way by acknowledged Extends), the moment the holder sent its
//!   Release, or the moment its Complete was acknowledged.
//! * No NEW for a key after a completion of it was acknowledged (within retention).
//! * A REPLAY returns the acknowledged response byte for byte; without an
//!   acknowledgement, one that some holder of the key sent with that fingerprint; and
//!   every REPLAY of a key returns the same response.
//! * MISMATCH only when a Reserve of the key was sent with another fingerprint.
//! * One fence is granted to one call only.

use std::collections::BTreeMap;

/// An opaque fence: (generation, claim digest).
pub type FenceId = (u32, u64);

#[derive(Clone, Debug)]
struct Grant {
    fence: FenceId,
    client: u32,
    opened_ms: u64,
    closes_ms: u64,
    /// A fault was active when the Reserve was sent.
    faulted: bool,
}

#[derive(Clone, Debug, Default)]
struct KeyHistory {
    grants: Vec<Grant>,
    /// The acknowledged completion: fence, fingerprint, response, when.
    acked: Option<(FenceId, u64, u64, u64)>,
    /// Completions sent (fingerprint, response), acknowledged or not.
    sent: Vec<(u64, u64)>,
    /// The response every REPLAY returned so far.
    replayed: Option<u64>,
    /// Fingerprints Reserves of the key were sent with.
    reserved: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: &'static str,
    pub key: u32,
    pub at_ms: u64,
    pub detail: String,
}

#[derive(Default)]
pub struct Oracle {
    keys: BTreeMap<u32, KeyHistory>,
    pub violations: Vec<Violation>,
}

impl Oracle {
    pub fn grant(
        &mut self,
        key: u32,
        fence: FenceId,
        client: u32,
        opened_ms: u64,
        trusted_until_ms: u64,
        faulted: bool,
    ) {
        let h = self.keys.entry(key).or_default();
        if let Some((f, _, _, at)) = h.acked {
            self.violations.push(Violation {
                kind: "new_after_completion",
                key,
                at_ms: opened_ms,
                detail: format!(
                    "NEW {fence:?} to client {client} after the completion by {f:?} was acknowledged at {at} ms"
                ),
            });
        }
        if h.grants.iter().any(|g| g.fence == fence) {
            self.violations.push(Violation {
                kind: "fence_reused",
                key,
                at_ms: opened_ms,
                detail: format!("fence {fence:?} granted twice"),
            });
        }
        h.grants.push(Grant {
            fence,
            client,
            opened_ms,
            closes_ms: trusted_until_ms.max(opened_ms),
            faulted,
        });
    }

    fn grant_mut(&mut self, key: u32, fence: FenceId) -> Option<&mut Grant> {
        self.keys
            .get_mut(&key)?
            .grants
            .iter_mut()
            .rev()
            .find(|g| g.fence == fence)
    }

    /// The holder stops trusting its lease at `t` (it sent Release, its Complete was
    /// acknowledged, or it gave up).
    pub fn close(&mut self, key: u32, fence: FenceId, t: u64) {
        if let Some(g) = self.grant_mut(key, fence) {
            g.closes_ms = g.closes_ms.min(t.max(g.opened_ms));
        }
    }

    /// An acknowledged Extend: the window reaches `trusted_until_ms` (never shrinks).
    pub fn extend(&mut self, key: u32, fence: FenceId, trusted_until_ms: u64) {
        if let Some(g) = self.grant_mut(key, fence) {
            g.closes_ms = g.closes_ms.max(trusted_until_ms);
        }
    }

    pub fn reserve_sent(&mut self, key: u32, fingerprint: u64) {
        let h = self.keys.entry(key).or_default();
        if !h.reserved.contains(&fingerprint) {
            h.reserved.push(fingerprint);
        }
    }

    pub fn completion_sent(&mut self, key: u32, fingerprint: u64, response: u64) {
        let h = self.keys.entry(key).or_default();
        if !h.sent.contains(&(fingerprint, response)) {
            h.sent.push((fingerprint, response));
        }
    }

    pub fn completion_acked(
        &mut self,
        key: u32,
        fence: FenceId,
        fingerprint: u64,
        response: u64,
        t: u64,
    ) {
        self.close(key, fence, t);
        let h = self.keys.entry(key).or_default();
        match h.acked {
            Some((f, _, r, _)) if f != fence || r != response => self.violations.push(Violation {
                kind: "two_completions",
                key,
                at_ms: t,
                detail: format!("completion by {fence:?} acknowledged after the one by {f:?}"),
            }),
            Some(_) => {}
            None => h.acked = Some((fence, fingerprint, response, t)),
        }
        if let Some(r) = h.replayed {
            if r != response {
                self.violations.push(Violation {
                    kind: "replay_changed",
                    key,
                    at_ms: t,
                    detail: format!("acknowledged response {response} after REPLAY of {r}"),
                });
            }
        }
    }

    pub fn replay(&mut self, key: u32, fingerprint: u64, response: u64, t: u64) {
        let h = self.keys.entry(key).or_default();
        let bad = match h.acked {
            Some((_, fp, r, _)) => fp != fingerprint || r != response,
            None => !h.sent.contains(&(fingerprint, response)),
        };
        if bad {
            self.violations.push(Violation {
                kind: "wrong_replay",
                key,
                at_ms: t,
                detail: format!(
                    "REPLAY of {response} for fingerprint {fingerprint}; acknowledged {:?}, sent {:?}",
                    h.acked, h.sent
                ),
            });
        }
        match h.replayed {
            Some(r) if r != response => self.violations.push(Violation {
                kind: "replay_changed",
                key,
                at_ms: t,
                detail: format!("REPLAY of {response} after REPLAY of {r}"),
            }),
            _ => h.replayed = Some(response),
        }
    }

    /// A MISMATCH answered at `t` to a Reserve sent at `sent_ms`. It may take effect at
    /// any moment in between: wrong only for a request that was the key's acknowledged
    /// completion before it was sent, or when no other request was ever reserved.
    pub fn mismatch(&mut self, key: u32, fingerprint: u64, sent_ms: u64, t: u64) {
        let h = self.keys.entry(key).or_default();
        let other = match h.acked {
            Some((_, fp, _, at)) if at < sent_ms => fp != fingerprint,
            _ => h.reserved.iter().any(|fp| *fp != fingerprint),
        };
        if !other {
            self.violations.push(Violation {
                kind: "wrong_mismatch",
                key,
                at_ms: t,
                detail: format!(
                    "MISMATCH for fingerprint {fingerprint}; acknowledged {:?}, reserved with {:?}",
                    h.acked, h.reserved
                ),
            });
        }
    }

    /// After healing: what region `region` holds for `key` (the response of a final
    /// completion, if it holds one). An acknowledged completion must be there, byte
    /// for byte, in every region.
    pub fn final_read(&mut self, key: u32, region: u32, final_response: Option<u64>) {
        let Some(h) = self.keys.get(&key) else {
            return;
        };
        if let Some((f, _, r, _)) = h.acked {
            if final_response != Some(r) {
                self.violations.push(Violation {
                    kind: "lost_completion",
                    key,
                    at_ms: 0,
                    detail: format!(
                        "region {region} holds {final_response:?} after healing, not the acknowledged completion {r} by {f:?}"
                    ),
                });
            }
        }
    }

    /// Judge the windows (once every window is final: at the end of a run).
    pub fn finish(&mut self) {
        for (&key, h) in &self.keys {
            for (i, a) in h.grants.iter().enumerate() {
                for b in &h.grants[i + 1..] {
                    if a.fence != b.fence && a.opened_ms < b.closes_ms && b.opened_ms < a.closes_ms
                    {
                        self.violations.push(Violation {
                            kind: "double_grant",
                            key,
                            at_ms: b.opened_ms,
                            detail: format!(
                                "{:?} (client {}) trusted {}..{} ms and {:?} (client {}) trusted {}..{} ms{}",
                                a.fence,
                                a.client,
                                a.opened_ms,
                                a.closes_ms,
                                b.fence,
                                b.client,
                                b.opened_ms,
                                b.closes_ms,
                                if a.faulted || b.faulted { " (during a fault)" } else { "" }
                            ),
                        });
                    }
                }
            }
        }
    }

    /// Keys whose completion was acknowledged.
    pub fn acked_keys(&self) -> Vec<u32> {
        self.keys
            .iter()
            .filter(|(_, h)| h.acked.is_some())
            .map(|(k, _)| *k)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_windows_of_two_fences_are_a_double_grant_and_closed_ones_are_not() {
        let mut o = Oracle::default();
        o.grant(1, (1, 1), 0, 100, 1_000, false);
        // Released at 400: the next grant at 500 does not overlap.
        o.close(1, (1, 1), 400);
        o.grant(1, (2, 2), 1, 500, 1_500, false);
        o.finish();
        assert!(o.violations.is_empty(), "{:?}", o.violations);
        // An Extend that reaches into another grant's window does.
        let mut o = Oracle::default();
        o.grant(2, (1, 1), 0, 100, 1_000, false);
        o.grant(2, (2, 2), 1, 1_200, 2_000, true);
        o.extend(2, (1, 1), 1_300);
        o.finish();
        assert_eq!(o.violations.len(), 1);
        assert_eq!(o.violations[0].kind, "double_grant");
        assert!(o.violations[0].detail.contains("during a fault"));
    }

    #[test]
    fn replays_mismatches_and_completions_are_judged_by_what_was_sent_and_acknowledged() {
        let mut o = Oracle::default();
        o.reserve_sent(1, 10);
        o.grant(1, (1, 1), 0, 0, 1_000, false);
        o.completion_sent(1, 10, 100);
        // Before the acknowledgement, a REPLAY of what was sent is fine.
        o.replay(1, 10, 100, 50);
        o.completion_acked(1, (1, 1), 10, 100, 60);
        o.replay(1, 10, 100, 70);
        o.reserve_sent(1, 11);
        o.mismatch(1, 11, 75, 80);
        assert!(o.violations.is_empty(), "{:?}", o.violations);
        o.replay(1, 10, 101, 90);
        o.mismatch(1, 10, 92, 95);
        o.grant(1, (2, 2), 1, 100, 900, false);
        let kinds: Vec<_> = o.violations.iter().map(|v| v.kind).collect();
        assert_eq!(
            kinds,
            vec![
                "wrong_replay",
                "replay_changed",
                "wrong_mismatch",
                "new_after_completion"
            ]
        );
    }

    #[test]
    fn a_mismatch_needs_another_fingerprint_reserved_or_completed() {
        let mut o = Oracle::default();
        o.reserve_sent(1, 10);
        o.mismatch(1, 10, 4, 5);
        assert_eq!(o.violations.len(), 1, "only one fingerprint was ever sent");
        o.reserve_sent(1, 11);
        o.mismatch(1, 10, 5, 6);
        assert_eq!(o.violations.len(), 1, "another request holds the key");
        // Once the request is the acknowledged completion, a Reserve of it sent later
        // must not be MISMATCH; one sent before may be (another request held the key).
        o.completion_acked(1, (1, 1), 10, 100, 10);
        o.mismatch(1, 10, 8, 12);
        assert_eq!(o.violations.len(), 1, "sent before the acknowledgement");
        o.mismatch(1, 10, 11, 13);
        assert_eq!(o.violations.len(), 2, "sent after the acknowledgement");
    }
}
