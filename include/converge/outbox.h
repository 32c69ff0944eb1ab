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

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>

#include "converge/clock.h"
#include "converge/database.h"
#include "converge/event.h"
#include "converge/status.h"

namespace converge {

class TxPublisher;

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
  std::string lock_key_;  // its aggregate's lock (Tx::LockUntilCommit)
};

struct OutboxOptions {
  std::string source = "urn:converge";
};

// Events this outbox enqueued in transactions that committed, by the way they took.
struct OutboxStats {
  int64_t for_relay = 0;                 // written unpublished, for a relay
  int64_t published_in_transaction = 0;  // PublishInTransaction: on the queue at commit
};

class Outbox {
 public:
  explicit Outbox(OutboxOptions options = {}, Clock* clock = nullptr);

  // Writes `event` to outbox_events through `tx` and returns its id. The relay is woken
  // when tx commits (or, with PublishInTransaction, the event is published through tx).
  // Errors: kInvalidArgument (empty type or subject, data not JSON or nested deeper than
  // 256 levels, fields over 255 bytes, with control characters or not UTF-8, malformed
  // traceparent), kAlreadyExists (an event with this source and id exists), store
  // errors. The insert and its per-aggregate lock are deferred statements
  // (Tx::ExecDeferred): on PostgreSQL kAlreadyExists and lock timeouts come from tx's
  // next waiting statement or its commit (with PublishInTransaction, Enqueue itself waits
  // for the lock and its read).
  Result<std::string> Enqueue(Tx& tx, Event event);

  // Enqueue's checks and encoding without the insert, for callers that can do them
  // outside the transaction (PreparedEvent says why). Same kInvalidArgument errors.
  Result<PreparedEvent> Prepare(Event event) const;
  // Writes a prepared event through `tx`; returns its id. Errors: kAlreadyExists, store
  // errors.
  Result<std::string> Enqueue(Tx& tx, const PreparedEvent& event);

  // Publish in the producer's own transaction: from now on, Enqueue writes the event's
  // outbox row already marked published and publishes it through `publisher` in the same
  // transaction, so its subscribers see it when the producer commits, with no relay pass
  // in between (one durable commit less between a producer and its consumers). Only
  // while no event waits unpublished in the outbox: an event published here must not
  // overtake an earlier one of its aggregate that a relay has still to publish, so while
  // any waits, events take the relay's way, and they take this one again once the relay
  // has caught up. A duplicate event id still fails with kAlreadyExists (the outbox row
  // is written); a publisher's error fails the producer's transaction. nullptr turns it
  // off. REQUIRES: every tx passed to Enqueue belongs to publisher->database(), and
  // every relay of this outbox publishes to `publisher` (Runtime checks both:
  // RuntimeOptions::publish_in_transaction); `publisher` outlives this outbox.
  // docs/design/outbox-relay.md, "Publishing in the producer's transaction".
  void PublishInTransaction(TxPublisher* publisher) {
    direct_.store(publisher, std::memory_order_release);
  }
  TxPublisher* publishes_in_transaction() const {
    return direct_.load(std::memory_order_acquire);
  }

  // Signalled after each commit that enqueued events for a relay.
  Wakeup& wakeup() { return wakeup_; }

  // With PublishInTransaction on, events still go to a relay while one waits unpublished:
  // for_relay growing beside it says that some event does (a relay behind, stopped or
  // unable to publish one).
  OutboxStats stats() const {
    return {for_relay_.load(std::memory_order_relaxed),
            in_transaction_.load(std::memory_order_relaxed)};
  }

 private:
  const OutboxOptions options_;
  Clock* clock_;
  Wakeup wakeup_;
  std::atomic<TxPublisher*> direct_{nullptr};
  std::atomic<int64_t> for_relay_{0}, in_transaction_{0};
};

}  // namespace converge

#endif  // CONVERGE_OUTBOX_H_
