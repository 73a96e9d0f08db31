//! Store-and-forward: what a device has to say but has not yet got rid of.
//!
//! A tracker loses its link in tunnels, car parks and dead spots. While it is offline it keeps
//! two fixed-capacity queues, with no heap:
//!
//! - **Heartbeats**: the latest [`HEARTBEAT_BACKLOG`]. A newer one pushes the oldest out, and
//!   [`Outbox::heartbeats_dropped`] counts the losses (receivers also see the gap in `seq`).
//!   A heartbeat leaves the queue when it is handed to the radio: heartbeats are QoS 0 (or
//!   QoS 1 without tracking), a lost one is only a missing dot on the map.
//! - **Delivery events**: all of them, up to [`EVENT_BACKLOG`]. Events are never dropped. One
//!   leaves the queue only when the broker has acknowledged it ([`Outbox::acked`], from the
//!   PUBACK of its QoS 1 publish); the events handed out but not yet acknowledged are *in
//!   flight*, and [`Outbox::requeue_in_flight`] puts them back when the connection drops, so
//!   they are sent again (receivers drop the duplicates by the event `seq`). When the queue is
//!   full the device does not push more: [`Device`](crate::device::Device) refuses new orders
//!   and stalls a delivery at the handover until there is room (see its docs).
//!
//! Both queues flush in order: [`Outbox::next_event`] and [`Outbox::pop_heartbeat`] hand out
//! the oldest first.

use heapless::Deque;
use shared::{DeliveryEvent, Heartbeat};

/// How many heartbeats a device keeps while it cannot send them.
pub const HEARTBEAT_BACKLOG: usize = 64;
/// How many delivery events a device can hold unacknowledged: ten orders' worth (each order
/// produces three events).
pub const EVENT_BACKLOG: usize = 32;

/// The store-and-forward queues of one device. See the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct Outbox {
    heartbeats: Deque<Heartbeat, HEARTBEAT_BACKLOG>,
    events: Deque<DeliveryEvent, EVENT_BACKLOG>,
    /// How many events at the front of `events` were handed out and await their ack.
    in_flight: usize,
    heartbeats_dropped: u32,
}

impl Outbox {
    /// Empty queues.
    pub const fn new() -> Self {
        Self {
            heartbeats: Deque::new(),
            events: Deque::new(),
            in_flight: 0,
            heartbeats_dropped: 0,
        }
    }

    /// Queues a heartbeat, dropping (and counting) the oldest if the backlog is full. Returns
    /// whether one was dropped.
    pub fn push_heartbeat(&mut self, heartbeat: Heartbeat) -> bool {
        let dropped = self.heartbeats.is_full();
        if dropped {
            self.heartbeats.pop_front();
            self.heartbeats_dropped = self.heartbeats_dropped.wrapping_add(1);
        }
        // Cannot fail: there is room now.
        let _ = self.heartbeats.push_back(heartbeat);
        dropped
    }

    /// Queues a delivery event.
    ///
    /// # Errors
    /// Gives the event back if the queue is full: the caller must hold on to it (or not have
    /// produced it; check [`event_room`](Self::event_room) first).
    pub fn push_event(&mut self, event: DeliveryEvent) -> Result<(), DeliveryEvent> {
        self.events.push_back(event)
    }

    /// How many more events fit.
    pub fn event_room(&self) -> usize {
        EVENT_BACKLOG - self.events.len()
    }

    /// The oldest queued heartbeat, removed.
    pub fn pop_heartbeat(&mut self) -> Option<Heartbeat> {
        self.heartbeats.pop_front()
    }

    /// The oldest event not yet in flight, now counted in flight; `None` if every queued event
    /// is already in flight.
    pub fn next_event(&mut self) -> Option<&DeliveryEvent> {
        let event = self.events.get(self.in_flight)?;
        self.in_flight += 1;
        Some(event)
    }

    /// Takes back the event [`next_event`](Self::next_event) handed out last, because it could
    /// not be sent after all.
    pub fn unsend_last(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// The broker acknowledged the event `seq`: removes it, with every in-flight event before
    /// it (a broker acknowledges QoS 1 publishes in the order it received them, MQTT 3.1.1
    /// §4.6). Returns how many events were removed; 0 if `seq` is not in flight (a late ack of
    /// an event already removed).
    pub fn acked(&mut self, seq: u32) -> usize {
        let Some(position) = self
            .events
            .iter()
            .take(self.in_flight)
            .position(|e| e.seq == seq)
        else {
            return 0;
        };
        for _ in 0..=position {
            self.events.pop_front();
        }
        self.in_flight -= position + 1;
        position + 1
    }

    /// The connection dropped: every event in flight is sent again, in order, from the oldest.
    pub fn requeue_in_flight(&mut self) {
        self.in_flight = 0;
    }

    /// Heartbeats waiting to be sent.
    pub fn heartbeats_queued(&self) -> usize {
        self.heartbeats.len()
    }

    /// Events queued, in flight or not.
    pub fn events_queued(&self) -> usize {
        self.events.len()
    }

    /// Events handed out and awaiting their ack.
    pub const fn events_in_flight(&self) -> usize {
        self.in_flight
    }

    /// The queued events, oldest first.
    pub fn events(&self) -> impl Iterator<Item = &DeliveryEvent> {
        self.events.iter()
    }

    /// Heartbeats pushed out of the full backlog so far (wraps at `u32::MAX`).
    pub const fn heartbeats_dropped(&self) -> u32 {
        self.heartbeats_dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::{DeliveryKind, OrderId, Position};

    fn event(seq: u32) -> DeliveryEvent {
        DeliveryEvent {
            seq,
            order: OrderId::new("ord-1").expect("valid"),
            kind: DeliveryKind::Pickup,
            ts_ms: u64::from(seq),
            pos: Position::default(),
        }
    }

    fn heartbeat(seq: u32) -> Heartbeat {
        Heartbeat {
            seq,
            ..Heartbeat::default()
        }
    }

    #[test]
    fn heartbeats_keep_the_latest_and_count_the_rest() {
        let mut outbox = Outbox::new();
        let total = HEARTBEAT_BACKLOG as u32 + 10;
        let dropped = (0..total)
            .filter(|&s| outbox.push_heartbeat(heartbeat(s)))
            .count();
        assert_eq!(dropped, 10);
        assert_eq!(outbox.heartbeats_dropped(), 10);
        let flushed: std::vec::Vec<u32> = core::iter::from_fn(|| outbox.pop_heartbeat())
            .map(|h| h.seq)
            .collect();
        assert_eq!(flushed, (10..total).collect::<std::vec::Vec<_>>());
    }

    #[test]
    fn events_leave_only_when_acknowledged() {
        let mut outbox = Outbox::new();
        for seq in 0..3 {
            outbox.push_event(event(seq)).expect("room");
        }
        assert_eq!(outbox.next_event().map(|e| e.seq), Some(0));
        assert_eq!(outbox.next_event().map(|e| e.seq), Some(1));
        assert_eq!(outbox.events_in_flight(), 2);
        // The link drops with 0 and 1 in flight: both are sent again, in order.
        outbox.requeue_in_flight();
        let resent: std::vec::Vec<u32> =
            core::iter::from_fn(|| outbox.next_event().map(|e| e.seq)).collect();
        assert_eq!(resent, [0, 1, 2]);
        assert_eq!(outbox.acked(0), 1);
        // An ack covers the in-flight events before it.
        assert_eq!(outbox.acked(2), 2);
        assert_eq!(outbox.acked(2), 0, "a late duplicate ack");
        assert_eq!(outbox.events_queued(), 0);
        assert_eq!(outbox.event_room(), EVENT_BACKLOG);
    }

    #[test]
    fn a_full_event_queue_refuses_and_keeps_everything() {
        let mut outbox = Outbox::new();
        for seq in 0..EVENT_BACKLOG as u32 {
            outbox.push_event(event(seq)).expect("room");
        }
        assert_eq!(outbox.event_room(), 0);
        assert_eq!(outbox.push_event(event(99)).map_err(|e| e.seq), Err(99));
        assert_eq!(outbox.next_event().map(|e| e.seq), Some(0));
        outbox.unsend_last();
        assert_eq!(outbox.next_event().map(|e| e.seq), Some(0));
        assert_eq!(outbox.acked(0), 1);
        assert_eq!(outbox.event_room(), 1);
        assert_eq!(outbox.events().next().map(|e| e.seq), Some(1));
    }
}
