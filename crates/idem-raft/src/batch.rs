//! The batching step shared by the node's outgoing request queues (forwarding to a
//! group's leader, calls to another region): a batch leaves as soon as a slot on the
//! wire is free, carrying everything that queued while it waited.

use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// How large a batch may grow: in items, and in bytes as `size` counts them.
pub struct Bounds<F> {
    pub max_items: usize,
    pub max_bytes: usize,
    pub size: F,
}

/// A queue's receiving end, with the item that did not fit in the previous batch.
pub struct Batcher<T> {
    rx: mpsc::Receiver<T>,
    carry: Option<T>,
}

impl<T> Batcher<T> {
    pub fn new(rx: mpsc::Receiver<T>) -> Batcher<T> {
        Batcher { rx, carry: None }
    }

    /// Wait for the next queued item, then for one of `slots`, then take whatever else
    /// is queued, within `bounds` (an item larger than the byte bound travels alone).
    /// `None` once the queue is closed and empty. The permit is held while the batch is
    /// on the wire.
    pub async fn next_batch<F: Fn(&T) -> usize>(
        &mut self,
        slots: &Arc<Semaphore>,
        bounds: &Bounds<F>,
    ) -> Option<(OwnedSemaphorePermit, Vec<T>)> {
        let first = match self.carry.take() {
            Some(item) => item,
            None => self.rx.recv().await?,
        };
        let permit = slots.clone().acquire_owned().await.ok()?;
        let mut bytes = (bounds.size)(&first);
        let mut batch = vec![first];
        while batch.len() < bounds.max_items {
            match self.rx.try_recv() {
                Ok(item) => {
                    let n = (bounds.size)(&item);
                    if bytes.saturating_add(n) > bounds.max_bytes {
                        self.carry = Some(item);
                        break;
                    }
                    bytes += n;
                    batch.push(item);
                }
                Err(_) => break,
            }
        }
        Some((permit, batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(max_items: usize) -> Bounds<fn(&i32) -> usize> {
        Bounds {
            max_items,
            max_bytes: usize::MAX,
            size: |_| 1,
        }
    }

    #[tokio::test]
    async fn a_batch_takes_what_queued_while_the_slots_were_busy() {
        let (tx, rx) = mpsc::channel(16);
        let mut rx = Batcher::new(rx);
        let slots = Arc::new(Semaphore::new(1));
        tx.send(1).await.unwrap();
        let (held, first) = rx.next_batch(&slots, &count(3)).await.unwrap();
        assert_eq!(first, vec![1]);
        for i in 2..=6 {
            tx.send(i).await.unwrap();
        }
        // The only slot is held: the next batch waits for it, then takes at most 3.
        let waiting = tokio::spawn(async move {
            let b = rx.next_batch(&slots, &count(3)).await.map(|(_, b)| b);
            (b, rx, slots)
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(held);
        let (second, mut rx, slots) = waiting.await.unwrap();
        assert_eq!(second, Some(vec![2, 3, 4]));
        drop(tx);
        assert_eq!(
            rx.next_batch(&slots, &count(3)).await.map(|(_, b)| b),
            Some(vec![5, 6])
        );
        assert!(rx.next_batch(&slots, &count(3)).await.is_none());
    }

    #[tokio::test]
    async fn a_batch_stops_at_its_byte_bound_and_an_oversized_item_travels_alone() {
        let (tx, rx) = mpsc::channel(16);
        let mut rx = Batcher::new(rx);
        let slots = Arc::new(Semaphore::new(4));
        for n in [3usize, 4, 2, 50, 1, 1] {
            tx.send(n).await.unwrap();
        }
        drop(tx);
        let bounds = Bounds {
            max_items: 100,
            max_bytes: 10,
            size: |n: &usize| *n,
        };
        let mut batches = Vec::new();
        while let Some((_permit, b)) = rx.next_batch(&slots, &bounds).await {
            batches.push(b);
        }
        assert_eq!(batches, vec![vec![3, 4, 2], vec![50], vec![1, 1]]);
    }
}
