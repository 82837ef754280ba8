//! The batching step shared by the node's outgoing request queues (forwarding to a
//! group's leader, calls to another region): a batch leaves as soon as a slot on the
//! wire is free, carrying everything that queued while it waited.

use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Wait for the next queued item, then for one of `slots`, then take whatever else is
/// queued (at most `max` items in all). `None` once the queue is closed and empty. The
/// permit is held while the batch is on the wire.
pub async fn next_batch<T>(
    rx: &mut mpsc::Receiver<T>,
    slots: &Arc<Semaphore>,
    max: usize,
) -> Option<(OwnedSemaphorePermit, Vec<T>)> {
    let first = rx.recv().await?;
    let permit = slots.clone().acquire_owned().await.ok()?;
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    Some((permit, batch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_takes_what_queued_while_the_slots_were_busy() {
        let (tx, mut rx) = mpsc::channel(16);
        let slots = Arc::new(Semaphore::new(1));
        tx.send(1).await.unwrap();
        let (held, first) = next_batch(&mut rx, &slots, 3).await.unwrap();
        assert_eq!(first, vec![1]);
        for i in 2..=6 {
            tx.send(i).await.unwrap();
        }
        // The only slot is held: the next batch waits for it, then takes at most 3.
        let waiting = tokio::spawn(async move {
            let b = next_batch(&mut rx, &slots, 3).await.map(|(_, b)| b);
            (b, rx, slots)
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(held);
        let (second, mut rx, slots) = waiting.await.unwrap();
        assert_eq!(second, Some(vec![2, 3, 4]));
        drop(tx);
        assert_eq!(
            next_batch(&mut rx, &slots, 3).await.map(|(_, b)| b),
            Some(vec![5, 6])
        );
        assert!(next_batch(&mut rx, &slots, 3).await.is_none());
    }
}
