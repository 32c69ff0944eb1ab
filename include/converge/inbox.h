// Inbox: the dedupe record of every consumer, and the only code that reads or writes the
// `consumer_inbox` table. See docs/design/consumer-inbox.md.
//
// A row (consumer, source, event id) says "this consumer has settled this event": either
// applied (its effect committed in the same transaction as the row) or dead-lettered
// (parked in dead_letters). A claim inserts the row through the caller's transaction, so
// the row and the effect commit or vanish together; a claim that finds the row already
// there is a duplicate, and the caller skips the effect. The consumer (consumer.h) claims
// before running a handler, dead letters (dead_letters.h) lift the dead-lettered mark on
// replay, and a webhook intake claims the webhook id before staging its work.
//
// Retention: a row lives `ttl` from its claim; Sweep deletes rows past that. The ttl
// must outlive every redelivery of the event (Consumer::Validate checks its own).
//
// Thread safety: Inbox holds only a clock; one object may be used from many threads.
#ifndef CONVERGE_INBOX_H_
#define CONVERGE_INBOX_H_

#include <cstdint>
#include <map>
#include <string>
#include <string_view>

#include "converge/clock.h"
#include "converge/database.h"
#include "converge/event.h"
#include "converge/status.h"

namespace converge {

enum class InboxClaim {
  kFirst,      // the row is new: this transaction settles the event
  kDuplicate,  // the consumer settled the event before: do nothing (and ack)
};

class Inbox {
 public:
  // `clock` (nullptr = Clock::System()) stamps claims and decides expiry; it must
  // outlive this object.
  explicit Inbox(Clock* clock = nullptr);

  // Records through `tx` that `consumer` applies `event` (Event::identity()) now; the
  // row expires after `ttl`. kFirst when no row existed. A claim inside a savepoint that
  // rolls back is gone with it. Errors: the store's.
  Result<InboxClaim> Claim(Tx& tx, std::string_view consumer, EventIdentity event,
                           Millis ttl) const;

  // Records through `tx` that `consumer` dead-lettered `event`, so that a redelivery is
  // absorbed instead of parked twice. kDuplicate when a row (applied or dead-lettered)
  // existed: the event was settled before, and must not be parked. Errors: the store's.
  Result<InboxClaim> MarkDeadLettered(Tx& tx, std::string_view consumer, EventIdentity event,
                                      Millis ttl) const;

  // Removes the dead-lettered mark of `event` for `consumer` through `tx`, so a replay of
  // the dead letter is processed. A row that says "applied" stays: the replay of an event
  // that had in fact been applied is absorbed as a duplicate. Returns whether a mark was
  // lifted. Errors: the store's.
  Result<bool> LiftDeadLettered(Tx& tx, std::string_view consumer, EventIdentity event) const;

  // Deletes up to `limit` rows whose ttl has passed; returns how many. On a
  // time-partitioned store (Tx::time_partitions) only rows of the DEFAULT partition: the
  // Sweeper drops the others a partition at a time. On a store that sweeps in key order
  // (Dialect::SweepsInKeyOrder: SQLite) the table has no expiry index, so this scans
  // until it has found `limit` expired rows; the Sweeper walks the table instead.
  // REQUIRES: limit > 0.
  Result<int64_t> Sweep(Tx& tx, int64_t limit) const;

  // Rows per consumer (for statistics and displays).
  Result<std::map<std::string, int64_t>> CountByConsumer(Tx& tx) const;

 private:
  Result<InboxClaim> Insert(Tx& tx, std::string_view consumer, EventIdentity event,
                            Millis ttl, std::string_view outcome) const;

  Clock* clock_;
};

}  // namespace converge

#endif  // CONVERGE_INBOX_H_
