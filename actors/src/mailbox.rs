//! How many messages wait in each actor's mailbox.
//!
//! ractor keeps no queue length, so Corral counts both ends: every send goes
//! through [`Tell`] (`tell`, `ask`, `tell_after`, `tell_every` instead of
//! ractor's `cast`, `call`, `send_after`, `send_interval`), which adds one to
//! the receiver's depth, and every actor calls [`took`] as the first thing in
//! `handle`. An actor's depth exists from [`open`] (first thing in
//! `pre_start`) until the [`Open`] it returned is dropped with the actor's
//! state, whether the actor stopped, failed or never finished starting; a
//! send only counts on a depth that exists, so a send racing with a stop
//! can not leave a count behind.
//!
//! Counting is two relaxed atomic operations and a sharded-map read per
//! message; reading the depths (actor tree, `/metrics`) takes no lock an
//! actor waits on for longer than one shard read.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

use dashmap::DashMap;
use ractor::rpc::CallResult;
use ractor::{ActorId, ActorRef, Message, MessagingErr, RpcReplyPort};
use tokio::task::JoinHandle;

struct Depth {
    kind: &'static str,
    waiting: AtomicI64,
}

/// Actor ids are unique in the process, so one map serves every control
/// plane a process runs (tests run several).
static DEPTHS: LazyLock<DashMap<ActorId, Depth>> = LazyLock::new(DashMap::new);

/// Counting for one actor, until dropped: kept in the actor's state, so
/// it ends with the actor however the actor ends.
#[derive(Debug)]
#[must_use = "the actor's mailbox is counted only while this lives"]
pub struct Open(ActorId);

impl Drop for Open {
    fn drop(&mut self) {
        DEPTHS.remove(&self.0);
    }
}

/// Starts counting for the actor `id` of `kind`.
pub fn open(id: ActorId, kind: &'static str) -> Open {
    DEPTHS.insert(
        id,
        Depth {
            kind,
            waiting: AtomicI64::new(0),
        },
    );
    Open(id)
}

/// The actor `id` took one message out of its mailbox.
pub fn took(id: ActorId) {
    add(id, -1);
}

/// Messages sent to `id` and not yet handled, if it is counted.
pub fn depth(id: ActorId) -> Option<u64> {
    DEPTHS
        .get(&id)
        .map(|d| u64::try_from(d.waiting.load(Ordering::Relaxed)).unwrap_or(0))
}

/// Per actor kind: (kind, messages waiting in all its mailboxes, the
/// deepest single mailbox), sorted by kind.
pub fn by_kind() -> Vec<(&'static str, u64, u64)> {
    let mut kinds: std::collections::BTreeMap<&'static str, (u64, u64)> = Default::default();
    for entry in DEPTHS.iter() {
        let waiting = u64::try_from(entry.waiting.load(Ordering::Relaxed)).unwrap_or(0);
        let (total, max) = kinds.entry(entry.kind).or_default();
        *total += waiting;
        *max = (*max).max(waiting);
    }
    kinds.into_iter().map(|(k, (t, m))| (k, t, m)).collect()
}

fn add(id: ActorId, n: i64) {
    if let Some(d) = DEPTHS.get(&id) {
        d.waiting.fetch_add(n, Ordering::Relaxed);
    }
}

/// Counted sends. Use these, never ractor's own, so depths stay true.
pub trait Tell<M: Message> {
    /// Fire and forget (ractor's `cast`).
    fn tell(&self, message: M) -> Result<(), MessagingErr<M>>;

    /// Request and reply (ractor's `call`).
    fn ask<T, F>(
        &self,
        make: F,
        timeout: Option<Duration>,
    ) -> impl std::future::Future<Output = Result<CallResult<T>, MessagingErr<M>>> + Send
    where
        F: FnOnce(RpcReplyPort<T>) -> M,
        T: Send + 'static;

    /// `make()` after `delay` (ractor's `send_after`).
    fn tell_after<F>(&self, delay: Duration, make: F) -> JoinHandle<Result<(), MessagingErr<M>>>
    where
        F: FnOnce() -> M + Send + 'static;

    /// `make()` every `period`, first after one period, until the actor is
    /// gone (ractor's `send_interval`).
    fn tell_every<F>(&self, period: Duration, make: F) -> JoinHandle<()>
    where
        F: Fn() -> M + Send + 'static;
}

// The one place ractor's uncounted sends are used (clippy.toml forbids
// them everywhere else).
#[allow(clippy::disallowed_methods)]
impl<M: Message> Tell<M> for ActorRef<M> {
    fn tell(&self, message: M) -> Result<(), MessagingErr<M>> {
        let id = self.get_id();
        add(id, 1);
        self.cast(message).inspect_err(|_| add(id, -1))
    }

    fn ask<T, F>(
        &self,
        make: F,
        timeout: Option<Duration>,
    ) -> impl std::future::Future<Output = Result<CallResult<T>, MessagingErr<M>>> + Send
    where
        F: FnOnce(RpcReplyPort<T>) -> M,
        T: Send + 'static,
    {
        // Sent now, as ractor's `call` does; only the wait is deferred.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let port: RpcReplyPort<T> = match timeout {
            Some(limit) => (tx, limit).into(),
            None => tx.into(),
        };
        let sent = self.tell(make(port));
        async move {
            sent?;
            let reply = match timeout {
                Some(limit) => match tokio::time::timeout(limit, rx).await {
                    Ok(reply) => reply,
                    Err(_) => return Ok(CallResult::Timeout),
                },
                None => rx.await,
            };
            Ok(reply.map_or(CallResult::SenderError, CallResult::Success))
        }
    }

    fn tell_after<F>(&self, delay: Duration, make: F) -> JoinHandle<Result<(), MessagingErr<M>>>
    where
        F: FnOnce() -> M + Send + 'static,
    {
        let actor = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            actor.tell(make())
        })
    }

    fn tell_every<F>(&self, period: Duration, make: F) -> JoinHandle<()>
    where
        F: Fn() -> M + Send + 'static,
    {
        let actor = self.clone();
        tokio::spawn(async move {
            let mut timer = tokio::time::interval(period);
            timer.tick().await;
            loop {
                timer.tick().await;
                if actor.tell(make()).is_err() {
                    break;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::{Actor, ActorProcessingErr};

    /// Waits on a gate before handling each message, so the test controls
    /// how many wait.
    struct Slow;

    impl Actor for Slow {
        type Msg = (tokio::sync::oneshot::Receiver<()>, RpcReplyPort<()>);
        type State = Open;
        type Arguments = ();

        async fn pre_start(
            &self,
            myself: ActorRef<Self::Msg>,
            _: (),
        ) -> Result<Open, ActorProcessingErr> {
            Ok(open(myself.get_id(), "slow"))
        }

        async fn handle(
            &self,
            myself: ActorRef<Self::Msg>,
            (gate, reply): Self::Msg,
            _: &mut Open,
        ) -> Result<(), ActorProcessingErr> {
            took(myself.get_id());
            let _ = gate.await;
            let _ = reply.send(());
            Ok(())
        }
    }

    #[tokio::test]
    async fn depth_counts_what_was_sent_and_not_yet_handled(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (actor, handle) = Actor::spawn(None, Slow, ()).await?;
        let id = actor.get_id();
        let mut gates = Vec::new();
        let mut replies = Vec::new();
        for _ in 0..3 {
            let (gate, wait) = tokio::sync::oneshot::channel();
            let (reply, got) = tokio::sync::oneshot::channel();
            actor
                .tell((wait, reply.into()))
                .map_err(|e| e.to_string())?;
            gates.push(gate);
            replies.push(got);
        }
        // One is taken out and being handled, two wait.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while depth(id) != Some(2) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "depth {:?}",
                depth(id)
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(by_kind().contains(&("slow", 2, 2)));
        for (gate, got) in gates.into_iter().zip(replies) {
            let _ = gate.send(());
            got.await?;
        }
        assert_eq!(depth(id), Some(0));
        actor.stop(None);
        handle.await?;
        assert_eq!(depth(id), None);
        // A send to a stopped actor fails and counts nothing.
        let (_gate, wait) = tokio::sync::oneshot::channel();
        let (reply, _got) = tokio::sync::oneshot::channel();
        assert!(actor.tell((wait, reply.into())).is_err());
        assert_eq!(depth(id), None);
        Ok(())
    }
}
