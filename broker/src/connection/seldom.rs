//! [`Seldom`]: a future that is rarely ready (a cancellation), polled only when it asked to be.
//!
//! A connection's loop waits on its socket, its router link and its deliveries, and also on
//! two cancellations: its client id taken over (or the broker stopping), and its alarm
//! (draining began, the shared router link died). `tokio::select!` polls every branch each time
//! the task wakes, and polling a cancellation future locks its token's node and its `Notify`'s
//! waiter list, two cache lines of that connection's own that are cold by the next message (a
//! vehicle sends one a second): at 10 000 vehicles × 1 Hz that was about 2 % of the embedded
//! bridge's CPU (`tree_node::is_cancelled` and `Notified::poll_notified` in the profile), for
//! futures that are ready once in a connection's life.
//!
//! [`Seldom`] hands the inner future a waker of its own, which notes that it fired and counts
//! the firing in one process-wide counter, [`FIRED`], before it wakes the task. A poll first
//! reads that counter (a line every core keeps, written only when some cancellation fires:
//! a takeover, a shutdown) and returns at once if it has not moved since its last look;
//! otherwise it looks at its own flag, and polls the inner future only if its own waker fired
//! (or at the first poll, which registers that waker). A wake of the task for anything else
//! costs one read of a line in the cache, where polling the cancellation cost two locks on
//! lines that were not.
//!
//! Meant for a future polled by one task all its life (a connection's loop): the task's
//! waker is registered at the first poll and after each change of [`FIRED`], not at every
//! poll.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use atomic_waker::AtomicWaker;

/// How many times the waker of any [`Seldom`]'s inner future fired, ever.
static FIRED: AtomicU64 = AtomicU64::new(0);

pin_project_lite::pin_project! {
    /// `F`, polled only when its own waker fired since its last poll (or never polled yet).
    pub(super) struct Seldom<F> {
        #[pin]
        inner: F,
        signal: Arc<Signal>,
        waker: Waker,
        // [`FIRED`] at the last look at `signal`; `None`: look at the next poll.
        seen: Option<u64>,
    }
}

/// What the inner future's waker does: notes that it fired, and wakes the task that polled
/// the [`Seldom`].
struct Signal {
    /// The inner future's waker fired since its last poll (true at first: never polled).
    woken: AtomicBool,
    /// The task that polls the [`Seldom`].
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Both before the task is woken: its next poll sees the counter moved, then the flag.
        self.woken.store(true, Ordering::Release);
        FIRED.fetch_add(1, Ordering::AcqRel);
        self.task.wake();
    }
}

impl<F> Seldom<F> {
    /// Wraps `inner`.
    pub(super) fn new(inner: F) -> Self {
        let signal = Arc::new(Signal {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(Arc::clone(&signal));
        Self {
            inner,
            signal,
            waker,
            seen: None,
        }
    }

    /// Replaces the inner future: the new one is polled at the next poll.
    pub(super) fn set(self: Pin<&mut Self>, inner: F) {
        let mut this = self.project();
        this.inner.set(inner);
        this.signal.woken.store(true, Ordering::Relaxed);
        *this.seen = None;
    }
}

impl<F: Future> Future for Seldom<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Read before the flag: a firing after this read moves the counter again, and wakes
        // the task (registered at the first poll, or below) once more.
        let fired = FIRED.load(Ordering::Acquire);
        if *this.seen == Some(fired) {
            return Poll::Pending;
        }
        *this.seen = Some(fired);
        this.signal.task.register(cx.waker());
        if !this.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.inner.poll(&mut Context::from_waker(this.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::*;

    /// Counts its polls; ready once `token` is cancelled.
    struct Counted<'a> {
        polls: &'a AtomicUsize,
        inner: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    }

    impl Future for Counted<'_> {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            self.inner.as_mut().poll(cx)
        }
    }

    #[tokio::test]
    async fn polls_the_inner_future_only_when_it_woke() {
        let token = CancellationToken::new();
        let polls = AtomicUsize::new(0);
        let seldom = Seldom::new(Counted {
            polls: &polls,
            inner: Box::pin(token.clone().cancelled_owned()),
        });
        tokio::pin!(seldom);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        for _ in 0..100 {
            tx.send(()).expect("open");
        }
        // 100 wakes of the task for something else: the cancellation is polled once, at the
        // first (which registers its waker).
        let mut others = 0;
        while others < 100 {
            tokio::select! {
                biased;
                () = &mut seldom => panic!("not cancelled"),
                Some(()) = rx.recv() => others += 1,
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1, "polled once in 100 wakes");

        // Cancelled from another task: the task wakes and the future is ready.
        let canceller = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            canceller.cancel();
        });
        tokio::time::timeout(Duration::from_secs(5), &mut seldom)
            .await
            .expect("woken by the cancellation");
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn another_cancellation_firing_does_not_poll_this_one() {
        let (mine, other) = (CancellationToken::new(), CancellationToken::new());
        let polls = AtomicUsize::new(0);
        let seldom = Seldom::new(Counted {
            polls: &polls,
            inner: Box::pin(mine.clone().cancelled_owned()),
        });
        let theirs = Seldom::new(other.clone().cancelled_owned());
        tokio::pin!(seldom, theirs);
        assert!(futures_poll_once(seldom.as_mut()).is_pending());
        assert!(futures_poll_once(theirs.as_mut()).is_pending());
        other.cancel();
        assert!(futures_poll_once(theirs.as_mut()).is_ready());
        assert!(futures_poll_once(seldom.as_mut()).is_pending());
        assert_eq!(
            polls.load(Ordering::Relaxed),
            1,
            "its flag looked at, not polled"
        );
        mine.cancel();
        assert!(futures_poll_once(seldom.as_mut()).is_ready());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_future_set_anew_is_polled_at_once() {
        let first = CancellationToken::new();
        let second = CancellationToken::new();
        let seldom = Seldom::new(first.clone().cancelled_owned());
        tokio::pin!(seldom);
        assert!(futures_poll_once(seldom.as_mut()).is_pending());
        second.cancel();
        seldom.as_mut().set(second.clone().cancelled_owned());
        assert!(
            futures_poll_once(seldom.as_mut()).is_ready(),
            "polled although nothing woke it"
        );
    }

    #[tokio::test]
    async fn a_cancellation_before_the_first_poll_is_seen() {
        let token = CancellationToken::new();
        token.cancel();
        let seldom = Seldom::new(token.clone().cancelled_owned());
        tokio::pin!(seldom);
        assert!(futures_poll_once(seldom.as_mut()).is_ready());
    }

    /// Polls `future` once with a waker that does nothing.
    fn futures_poll_once<F: Future>(future: Pin<&mut F>) -> Poll<F::Output> {
        future.poll(&mut Context::from_waker(Waker::noop()))
    }
}
