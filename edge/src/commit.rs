//! The group-commit queue, sans-IO: which outputs of the node may run now and which
//! wait for storage writes to become durable.
//!
//! The node's output contract: every storage action must be durable before any later
//! output (a send, a delivery, an ack) takes effect. Storage writes are applied at
//! once and counted in **generations**; one flush makes every generation written so
//! far durable. Outputs that follow a write wait for its generation; outputs that
//! follow no write wait only for what is already waiting (never for a generation
//! that was not written: that stalled links until the fleet tests caught it).

use std::collections::VecDeque;

/// Outputs held back until their generation is durable.
#[derive(Debug)]
pub struct CommitQueue<T> {
    /// Generation of the last storage write applied.
    written: u64,
    /// A write happened in the current drain: its outputs wait for `written + 1`.
    dirty: bool,
    waiting: VecDeque<(u64, T)>,
}

impl<T> Default for CommitQueue<T> {
    fn default() -> Self {
        Self {
            written: 0,
            dirty: false,
            waiting: VecDeque::new(),
        }
    }
}

impl<T> CommitQueue<T> {
    /// A storage write was applied in the current drain.
    pub fn wrote(&mut self) {
        self.dirty = true;
    }

    /// An output of the current drain: returned if it may run now, else held.
    pub fn push(&mut self, out: T) -> Option<T> {
        if self.dirty {
            self.waiting.push_back((self.written + 1, out));
            None
        } else if !self.waiting.is_empty() {
            // Behind what already waits (and every write before it), never before.
            self.waiting.push_back((self.written, out));
            None
        } else {
            Some(out)
        }
    }

    /// Ends a drain. Returns the generation its writes make up, if it wrote anything
    /// (what the caller must flush before the held outputs run).
    pub fn end_drain(&mut self) -> Option<u64> {
        if std::mem::take(&mut self.dirty) {
            self.written += 1;
            Some(self.written)
        } else {
            None
        }
    }

    /// The generation of the last write.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Everything up to `upto` is durable: the outputs that may run now, in order.
    pub fn durable(&mut self, upto: u64) -> Vec<T> {
        let mut out = Vec::new();
        while self.waiting.front().is_some_and(|(g, _)| *g <= upto) {
            if let Some((_, o)) = self.waiting.pop_front() {
                out.push(o);
            }
        }
        out
    }

    /// Generations up to `upto` failed to flush: their outputs never run.
    pub fn failed(&mut self, upto: u64) {
        self.waiting.retain(|(g, _)| *g > upto);
    }

    /// Whether any held output matches `f`.
    pub fn holds(&self, f: impl Fn(&T) -> bool) -> bool {
        self.waiting.iter().any(|(_, o)| f(o))
    }

    /// Drops everything held (the node is rebuilt from storage).
    pub fn clear(&mut self) {
        self.waiting.clear();
        self.dirty = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_after_a_write_wait_for_its_flush() {
        let mut q = CommitQueue::default();
        assert_eq!(q.push("before any write"), Some("before any write"));
        q.wrote();
        assert_eq!(q.push("ack 1"), None);
        assert_eq!(q.end_drain(), Some(1));
        assert!(q.durable(0).is_empty());
        assert_eq!(q.durable(1), vec!["ack 1"]);
    }

    #[test]
    fn an_output_without_a_write_waits_behind_held_ones_but_not_for_new_writes() {
        let mut q = CommitQueue::default();
        q.wrote();
        assert_eq!(q.push("ack 1"), None);
        assert_eq!(q.end_drain(), Some(1));
        // A later drain with no write: its output must not overtake "ack 1", and must
        // not wait for a generation 2 that nobody wrote.
        assert_eq!(q.push("send"), None);
        assert_eq!(q.end_drain(), None);
        assert_eq!(q.durable(1), vec!["ack 1", "send"]);
        assert_eq!(q.push("free"), Some("free"));
    }

    #[test]
    fn generations_complete_in_order_and_failures_drop_their_outputs() {
        let mut q = CommitQueue::default();
        for g in 1..=3u64 {
            q.wrote();
            assert_eq!(q.push(g), None);
            assert_eq!(q.end_drain(), Some(g));
        }
        assert_eq!(q.durable(1), vec![1]);
        q.failed(2);
        assert_eq!(q.durable(3), vec![3]);
        assert_eq!(q.written(), 3);
    }
}
