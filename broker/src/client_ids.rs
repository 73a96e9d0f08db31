//! Which connection holds which client id, so a takeover (a vehicle reconnecting before its
//! old connection timed out) is orderly.
//!
//! rumqttd's router drops the old connection when a new one registers the same client id, but
//! the old connection's task learns of it only later; if it then published its last will, a
//! stale `offline` could land after the vehicle's fresh `online`. So a new connection first
//! [claims](ClientIds::claim) its client id: the holder is told to stop (it ends without a will)
//! and the claim waits until the holder has finished, including a will it may have been
//! publishing because its connection was lost just before. Only then does the new connection
//! register with the router.
//!
//! A takeover is a login's own business: while a connection of one login holds a client id,
//! a connection of another login cannot take it (its claim is refused), whatever the id.
//! Which ids a login may use at all is decided before, in `auth::client_id`.
//!
//! A last will waiting out its MQTT 5 Will Delay is [registered](ClientIds::delay_will) here
//! too: a new connection claiming the client id calls it off, as MQTT 5 §3.1.3.2.2 requires,
//! even if that connection has ended again by the time the delay is over.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How long a new connection waits for the previous holder of its client id to finish.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Holder {
    generation: u64,
    /// The login holding it; `None` in open mode.
    login: Option<String>,
    kick: CancellationToken,
}

/// The holders of client ids.
///
/// Every connection holds one, so a hold is kept small: one token (a child of the broker's
/// `stopping`, so a connection waits on one token for both) and no other allocation than the
/// entry; a claim waiting for a holder to finish is woken by any release and looks again.
#[derive(Debug, Default)]
pub(crate) struct ClientIds {
    holders: Mutex<HashMap<String, Holder>>,
    generations: AtomicU64,
    /// Notified at every release.
    released: Notify,
    /// Wills waiting out their delay, by client id: the registration's number and the token
    /// that calls the will off.
    wills: Mutex<HashMap<String, (u64, CancellationToken)>>,
    /// Parent of every claim's `kicked` token.
    parent: CancellationToken,
}

/// A last will waiting out its MQTT 5 Will Delay: see [`ClientIds::delay_will`].
#[derive(Debug)]
pub(crate) struct DelayedWill {
    client_id: String,
    number: u64,
    /// Cancelled when a new connection claims the client id, and when the broker stops
    /// (wills are not published at shutdown).
    pub(crate) called_off: CancellationToken,
}

/// One connection's hold on its client id; give it back with [`ClientIds::release`].
#[derive(Debug)]
pub(crate) struct Claim {
    client_id: String,
    generation: u64,
    /// Cancelled when a newer connection with the same client id takes over, and when the
    /// parent given to [`ClientIds::new`] is (the broker stops).
    pub(crate) kicked: CancellationToken,
}

impl ClientIds {
    /// No client id held yet; every claim's `kicked` is cancelled with `parent` too.
    pub(crate) fn new(parent: CancellationToken) -> ClientIds {
        ClientIds {
            parent,
            ..ClientIds::default()
        }
    }

    /// Takes `client_id` over for `login` (`None` in open mode): tells its current holder to
    /// stop, waits (bounded) until it has finished, and returns the new hold; `None`, and
    /// the holder left alone, if the holder is a connection of another login.
    pub(crate) async fn claim(&self, client_id: &str, login: Option<&str>) -> Option<Claim> {
        let deadline = Instant::now() + TAKEOVER_WAIT;
        loop {
            let mut released = pin!(self.released.notified());
            // Listening before the holder is looked at: its release cannot slip in between.
            released.as_mut().enable();
            {
                let mut holders = self.holders();
                match holders.get(client_id) {
                    Some(holder) => {
                        if let (Some(held_by), Some(login)) = (holder.login.as_deref(), login)
                            && held_by != login
                        {
                            return None;
                        }
                        holder.kick.cancel();
                    }
                    None => return Some(self.insert(&mut holders, client_id, login)),
                }
            }
            if timeout_at(deadline, released).await.is_err() {
                warn!(
                    client_id,
                    "the previous connection of this client did not finish in time: taking over"
                );
                let mut holders = self.holders();
                return Some(self.insert(&mut holders, client_id, login));
            }
        }
    }

    /// Registers the will of `client_id`'s connection, which has just ended, as waiting out
    /// its delay: the next claim of the id calls it off. Ask [`Self::will_due`] when the delay
    /// is over.
    pub(crate) fn delay_will(&self, client_id: &str) -> DelayedWill {
        let number = self.generations.fetch_add(1, Ordering::Relaxed);
        let called_off = self.parent.child_token();
        let earlier = self
            .wills()
            .insert(client_id.to_owned(), (number, called_off.clone()));
        // Two wills of one id cannot wait at once: the second connection's claim called the
        // first off. Should one still be there (a holder that outlived its takeover), the
        // newer connection's will is the one that stands.
        if let Some((_, earlier)) = earlier {
            earlier.cancel();
        }
        DelayedWill {
            client_id: client_id.to_owned(),
            number,
            called_off,
        }
    }

    /// Whether `will`'s delay is over with no new connection of its client id: it is then
    /// taken out, to be published. `false` if a claim called it off meanwhile.
    pub(crate) fn will_due(&self, will: &DelayedWill) -> bool {
        let mut wills = self.wills();
        let due = wills
            .get(&will.client_id)
            .is_some_and(|(number, _)| *number == will.number)
            && !will.called_off.is_cancelled();
        if due {
            wills.remove(&will.client_id);
        }
        due
    }

    fn wills(&self) -> MutexGuard<'_, HashMap<String, (u64, CancellationToken)>> {
        self.wills.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn holders(&self) -> MutexGuard<'_, HashMap<String, Holder>> {
        self.holders.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(
        &self,
        holders: &mut HashMap<String, Holder>,
        client_id: &str,
        login: Option<&str>,
    ) -> Claim {
        // A new network connection: a will waiting out its delay is not published (MQTT 5
        // §3.1.3.2.2). Its entry goes with it (one lock, taken inside the holders' and
        // nowhere the other way round).
        if let Some((_, will)) = self.wills().remove(client_id) {
            will.cancel();
        }
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let kick = self.parent.child_token();
        holders.insert(
            client_id.to_owned(),
            Holder {
                generation,
                login: login.map(str::to_owned),
                kick: kick.clone(),
            },
        );
        Claim {
            client_id: client_id.to_owned(),
            generation,
            kicked: kick,
        }
    }

    /// Gives `claim` back; a connection waiting to take over proceeds.
    pub(crate) fn release(&self, claim: Claim) {
        {
            let mut holders = self.holders();
            if holders
                .get(&claim.client_id)
                .is_some_and(|h| h.generation == claim.generation)
            {
                holders.remove(&claim.client_id);
            }
        }
        self.released.notify_waiters();
    }

    /// Client ids currently held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.holders.lock().map(|h| h.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// The claim a spawned `claim` got, within a bound.
    async fn claimed(taker: tokio::task::JoinHandle<Option<Claim>>) -> Claim {
        tokio::time::timeout(Duration::from_secs(5), taker)
            .await
            .expect("the claim completes")
            .expect("the claiming task did not panic")
            .expect("the claim is granted")
    }

    #[tokio::test]
    async fn claims_are_exclusive_and_released() {
        let ids = ClientIds::default();
        let a = ids.claim("van-1", None).await.unwrap();
        let b = ids.claim("van-2", None).await.unwrap();
        assert_eq!(ids.len(), 2);
        assert!(!a.kicked.is_cancelled());
        ids.release(a);
        ids.release(b);
        assert_eq!(ids.len(), 0);
    }

    #[tokio::test]
    async fn a_takeover_kicks_the_holder_and_waits_for_it() {
        let ids = Arc::new(ClientIds::default());
        let old = ids.claim("van-1", None).await.unwrap();
        let kicked = old.kicked.clone();

        let taker = {
            let ids = Arc::clone(&ids);
            tokio::spawn(async move { ids.claim("van-1", None).await })
        };
        tokio::time::timeout(Duration::from_secs(5), kicked.cancelled())
            .await
            .expect("the holder is told to stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!taker.is_finished(), "the new claim waits for the old one");

        ids.release(old);
        let new = claimed(taker).await;
        assert!(!new.kicked.is_cancelled());
        assert_eq!(ids.len(), 1);
        ids.release(new);
        assert_eq!(ids.len(), 0);
    }

    #[tokio::test]
    async fn another_login_cannot_take_a_held_id_over() {
        let ids = ClientIds::default();
        let bridge = ids.claim("fleetbeat-bridge", Some("ops")).await.unwrap();
        assert!(ids.claim("fleetbeat-bridge", Some("alice")).await.is_none());
        assert!(!bridge.kicked.is_cancelled(), "the holder is left alone");
        ids.release(bridge);
        let again = ids.claim("fleetbeat-bridge", Some("alice")).await;
        assert!(
            again.is_some(),
            "free again (the login rule is auth::client_id's)"
        );
        ids.release(again.unwrap());
    }

    /// A claim waiting for its holder is woken by any release, and waits on while its own
    /// holder stays; the broker stopping kicks every holder.
    #[tokio::test]
    async fn a_takeover_waits_for_its_own_holder_and_stopping_kicks_every_holder() {
        let stopping = CancellationToken::new();
        let ids = Arc::new(ClientIds::new(stopping.clone()));
        let old = ids.claim("van-1", None).await.unwrap();
        let other = ids.claim("van-2", None).await.unwrap();
        let taker = {
            let ids = Arc::clone(&ids);
            tokio::spawn(async move { ids.claim("van-1", None).await })
        };
        tokio::time::timeout(Duration::from_secs(5), old.kicked.cancelled())
            .await
            .expect("the holder is told to stop");
        ids.release(other);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            !taker.is_finished(),
            "another id's release is not this one's"
        );
        ids.release(old);
        let new = claimed(taker).await;
        assert!(!new.kicked.is_cancelled());
        stopping.cancel();
        assert!(new.kicked.is_cancelled(), "stopping reaches every holder");
        ids.release(new);
    }

    /// MQTT 5 §3.1.3.2.2: a new connection of the id calls a delayed will off, even once
    /// it has ended again; another id's does not; the broker stopping calls off every one.
    #[tokio::test]
    async fn a_delayed_will_is_called_off_by_a_new_connection_of_its_id_or_stopping() {
        let stopping = CancellationToken::new();
        let ids = ClientIds::new(stopping.clone());
        let will = ids.delay_will("van-1");
        let other = ids.delay_will("van-2");
        let back = ids.claim("van-1", None).await.unwrap();
        ids.release(back);
        assert!(will.called_off.is_cancelled());
        assert!(
            !ids.will_due(&will),
            "back within the delay, gone again: no will"
        );
        assert!(ids.will_due(&other), "nobody came back as van-2");
        assert!(!ids.will_due(&other), "a will is due once");

        let again = ids.delay_will("van-1");
        assert!(!again.called_off.is_cancelled(), "a later will stands");
        let at_stop = ids.delay_will("van-3");
        stopping.cancel();
        assert!(!ids.will_due(&at_stop), "no will at shutdown");
        assert!(!ids.will_due(&again));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_holder_is_replaced_after_the_bound() {
        let ids = ClientIds::default();
        let stuck = ids.claim("van-1", None).await.unwrap();
        let new = ids.claim("van-1", None).await.unwrap();
        assert!(stuck.kicked.is_cancelled());
        // The stuck one releasing late does not remove the new hold.
        ids.release(stuck);
        assert_eq!(ids.len(), 1);
        ids.release(new);
        assert_eq!(ids.len(), 0);
    }
}
