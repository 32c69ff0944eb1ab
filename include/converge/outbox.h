// Transactional outbox: an event is written in the same transaction as the business
// change that caused it, so the two commit or vanish together. A relay (relay.h) later
// publishes it at least once. See docs/design/outbox-relay.md.
//
// Events (event.h) are CloudEvents 1.0 (JSON format) plus a W3C `traceparent` extension;
// the pair (source, id) identifies an event end to end and is what consumer inboxes
// dedupe on.
//
// Thread safety: Outbox is safe to use from many threads.
#ifndef CONVERGE_OUTBOX_H_
#define CONVERGE_OUTBOX_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "converge/clock.h"
#include "converge/database.h"
#include "converge/event.h"
#include "converge/status.h"

namespace converge {

// Outbox events are spread over this many relay partitions by a stable hash of their
// subject (aggregate id). Fixed: every writer and relay must agree on it.
inline constexpr int64_t kOutboxPartitions = 64;
// The partition of an aggregate (FNV-1a of the subject, modulo kOutboxPartitions).
int64_t OutboxPartition(std::string_view subject);

// The Tx::Notify channel an enqueue signals (other processes' relays listen on it).
inline constexpr const char* kOutboxChannel = "converge_outbox";

// An event completed, checked and encoded ahead of its transaction (Outbox::Prepare).
// Preparing costs a UUID, JSON parsing and encoding; Enqueue of a prepared event costs
// only the insert. On SQLite every transaction runs on the one writer thread that all
// callers share (database.h), so an event prepared on the caller's thread, before
// Transact, is work taken off that thread. Enqueue it once: its id is fixed, so a second
// committed enqueue fails with kAlreadyExists (a re-run of the same transaction function
// after a rollback is fine).
class PreparedEvent {
 public:
  const Event& event() const { return event_; }  // every field filled in, envelope too

 private:
  friend class Outbox;
  Event event_;
  std::string headers_;
  int64_t partition_ = 0;
};

struct OutboxOptions {
  std::string source = "urn:converge";
};

class Outbox {
 public:
  explicit Outbox(OutboxOptions options = {}, Clock* clock = nullptr);

  // Writes `event` to outbox_events through `tx` and returns its id. The relay is woken
  // when tx commits. Errors: kInvalidArgument (empty type or subject, data not JSON or
  // nested deeper than 256 levels, fields over 255 bytes, with control characters or not
  // UTF-8, malformed traceparent),
  // kAlreadyExists (an event with this source and id exists), store errors. The insert
  // and its per-aggregate lock are deferred statements (Tx::ExecDeferred): on PostgreSQL
  // kAlreadyExists and lock timeouts come from tx's next waiting statement or its commit.
  Result<std::string> Enqueue(Tx& tx, Event event);

  // Enqueue's checks and encoding without the insert, for callers that can do them
  // outside the transaction (PreparedEvent says why). Same kInvalidArgument errors.
  Result<PreparedEvent> Prepare(Event event) const;
  // Writes a prepared event through `tx`; returns its id. Errors: kAlreadyExists, store
  // errors.
  Result<std::string> Enqueue(Tx& tx, const PreparedEvent& event);

  // Signalled after each commit that enqueued events.
  Wakeup& wakeup() { return wakeup_; }

 private:
  const OutboxOptions options_;
  Clock* clock_;
  Wakeup wakeup_;
};

}  // namespace converge

#endif  // CONVERGE_OUTBOX_H_
