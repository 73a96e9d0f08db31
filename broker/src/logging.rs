//! Tracing for programs that run the broker: what of rumqttd's instrumentation to keep.

use tracing::Metadata;
use tracing_subscriber::filter::{FilterFn, filter_fn};

/// A global filter that turns rumqttd's spans off and keeps its events. Add it as a layer
/// beside the `EnvFilter` (`fmt().with_env_filter(..).finish().with(without_rumqttd_spans())`).
///
/// rumqttd 0.20 opens an ERROR-level span for every message it routes, with the topic
/// formatted into it (`error_span!("publish", topic = ?publish.topic)`), so a filter that keeps
/// its warnings and errors builds and drops a span per message: ≈ 3 % of the broker's CPU at
/// 30 000 messages/s (bench/HISTORY.md, end to end). Its log lines lose that span context, nothing
/// else.
pub fn without_rumqttd_spans() -> FilterFn<fn(&Metadata<'_>) -> bool> {
    filter_fn(keep as fn(&Metadata<'_>) -> bool)
}

fn keep(meta: &Metadata<'_>) -> bool {
    !(meta.is_span() && meta.target().starts_with("rumqttd"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Counts the events that reach it.
    struct Events(Arc<AtomicUsize>);

    impl<S: tracing::Subscriber> Layer<S> for Events {
        fn on_event(
            &self,
            _event: &tracing::Event<'_>,
            _ctx: tracing_subscriber::layer::Context<'_, S>,
        ) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn drops_rumqttd_spans_and_keeps_everything_else() {
        let events = Arc::new(AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry()
            .with(without_rumqttd_spans())
            .with(Events(Arc::clone(&events)));
        tracing::subscriber::with_default(subscriber, || {
            let theirs = tracing::error_span!(target: "rumqttd::router::routing", "publish");
            assert!(theirs.is_disabled(), "rumqttd's per-message span is off");
            let ours = tracing::error_span!(target: "broker::connection", "session");
            assert!(!ours.is_disabled(), "other spans stay");
            tracing::error!(target: "rumqttd::router::routing", "a rumqttd error");
            tracing::warn!(target: "broker::connection", "one of ours");
        });
        assert_eq!(events.load(Ordering::Relaxed), 2, "events of both kept");
    }
}
