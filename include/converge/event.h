// Events: the one type for what a producer enqueues, a relay publishes, a transport
// carries and a consumer handles. See docs/design/outbox-relay.md.
//
// An event is a CloudEvents 1.0 event (JSON format) plus the `aggregatetype` and W3C
// `traceparent` extensions. The pair (source, id) identifies it end to end: it is unique
// in the outbox, it is the broker's dedupe id, and it is what consumer inboxes (inbox.h)
// dedupe on. On the wire an event travels as its encoded envelope; a transport copies
// the few fields it routes on (id, source, type, subject) next to it.
//
// Thread safety: plain values and pure functions; safe from any thread.
#ifndef CONVERGE_EVENT_H_
#define CONVERGE_EVENT_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "converge/status.h"

namespace converge {

// What an event is known by end to end. A view: it must not outlive the strings it
// points into.
struct EventIdentity {
  std::string_view source;
  std::string_view id;
};

struct Event {
  std::string id;              // empty on Enqueue: a new UUIDv7
  std::string source;          // empty on Enqueue: OutboxOptions::source
  std::string type;            // required, e.g. "payment.captured"
  std::string subject;         // required: the aggregate id; order is kept per subject
  std::string aggregate_type;  // empty on Enqueue: the part of `type` before the first '.'
  int64_t time = 0;            // milliseconds since the epoch; 0 on Enqueue: now
  std::string data = "{}";     // a JSON document
  std::string traceparent;     // optional W3C traceparent
  // The encoded CloudEvents document (EncodeEnvelope), where one exists: set by the relay
  // for what it publishes, by transports on deliveries and by DecodeEnvelope. Ignored by
  // Outbox::Enqueue and EncodeEnvelope. A delivery's envelope is the authority: the
  // fields above it may be only the transport's routing copy until it is decoded.
  std::string envelope;

  EventIdentity identity() const { return {source, id}; }
};

// A new UUIDv7 (RFC 9562: time-ordered, 74 random bits), as Outbox::Enqueue draws for an
// event without an id: for ids a caller draws before its transaction (an aggregate's id
// that its event names, so that the event can be prepared off the store's writer).
std::string NewUuidV7();

// Whether `data` can be an event's data: a JSON document nesting at most 256 levels of
// arrays and objects. kInvalidArgument otherwise. Outbox::Enqueue checks it; so must a
// caller of EncodeEnvelope with data from outside (its encoding recurses once per level,
// and data deep enough would overflow the stack).
Status ValidateEventData(std::string_view data);

// The CloudEvents JSON envelope of `e` (all fields but `envelope` must be filled in, and
// `data` pass ValidateEventData).
std::string EncodeEnvelope(const Event& e);
// Parses a CloudEvents JSON envelope into every field, `envelope` included.
// kInvalidArgument names what is wrong (including data nested deeper than 256 levels of
// arrays and objects, an id or source over 255 bytes, or a NUL in the id, source or
// type, none of which Outbox::Enqueue writes).
Result<Event> DecodeEnvelope(std::string_view envelope);

}  // namespace converge

#endif  // CONVERGE_EVENT_H_
