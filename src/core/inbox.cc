// The consumer inbox: every statement on `consumer_inbox` is in this file.
//
// Method: a claim is one INSERT ... ON CONFLICT DO NOTHING on the primary key (consumer,
// source, event_id); the number of rows it changed tells a first claim from a duplicate.
// No SELECT comes first: under READ COMMITTED two claimers could both read "absent",
// while the insert makes the second one wait on the first one's uncommitted row and then
// find it (PostgreSQL), or queue behind the one writer (SQLite). The `outcome` column
// tells an applied event from a dead-lettered one, so a replay can lift only the latter.
// On a time-partitioned PostgreSQL store the primary key also holds processed_at, so the
// INSERT names no conflict target and a BEFORE INSERT trigger keeps the identity unique
// across partitions: the second claimer waits on an advisory lock of the identity, then
// finds the first one's row and the insert is skipped (docs/design/retention.md). The
// Sweeper drops whole partitions there, and Sweep deletes only from the DEFAULT one.
#include "converge/inbox.h"

namespace converge {

Inbox::Inbox(Clock* clock) : clock_(clock ? clock : Clock::System()) {}

Result<InboxClaim> Inbox::Insert(Tx& tx, std::string_view consumer, EventIdentity event,
                                 Millis ttl, std::string_view outcome) const {
  const int64_t now = clock_->NowMillis();
  CONVERGE_ASSIGN_OR_RETURN(
      int64_t inserted,
      tx.Exec("INSERT INTO consumer_inbox (consumer, source, event_id, processed_at, "
              "expires_at, outcome) VALUES ($1, $2, $3, $4, $5, $6) "
              "ON CONFLICT DO NOTHING",
              consumer, event.source, event.id, now, now + ttl.count(), outcome));
  return inserted == 0 ? InboxClaim::kDuplicate : InboxClaim::kFirst;
}

Result<InboxClaim> Inbox::Claim(Tx& tx, std::string_view consumer, EventIdentity event,
                                Millis ttl) const {
  return Insert(tx, consumer, event, ttl, "applied");
}

Result<InboxClaim> Inbox::MarkDeadLettered(Tx& tx, std::string_view consumer,
                                           EventIdentity event, Millis ttl) const {
  return Insert(tx, consumer, event, ttl, "dead_lettered");
}

Result<bool> Inbox::LiftDeadLettered(Tx& tx, std::string_view consumer,
                                     EventIdentity event) const {
  CONVERGE_ASSIGN_OR_RETURN(
      int64_t n, tx.Exec("DELETE FROM consumer_inbox WHERE consumer = $1 AND source = $2 "
                         "AND event_id = $3 AND outcome = 'dead_lettered'",
                         consumer, event.source, event.id));
  return n > 0;
}

Result<int64_t> Inbox::Sweep(Tx& tx, int64_t limit) const {
  if (limit < 1) return tl::unexpected(InvalidArgumentError("inbox sweep limit must be >= 1"));
  // Victims by primary key through a LIMITed subquery: bounded work on both backends.
  // The expiry is checked again outside it, as the sweeper does for keys: on PostgreSQL a
  // DELETE that waited for a row lock re-checks only its own WHERE. (Inbox rows are not
  // updated in place today; the check keeps that from mattering.)
  std::string table = "consumer_inbox";
  if (TimePartitions* partitions = tx.time_partitions()) {
    CONVERGE_ASSIGN_OR_RETURN(table, partitions->DefaultPartition(table));
  }
  return tx.Exec("DELETE FROM " + table + " WHERE (consumer, source, event_id) IN (SELECT "
                 "consumer, source, event_id FROM " + table + " WHERE expires_at <= $1 LIMIT "
                 "$2) AND expires_at <= $1",
                 clock_->NowMillis(), limit);
}

Result<std::map<std::string, int64_t>> Inbox::CountByConsumer(Tx& tx) const {
  CONVERGE_ASSIGN_OR_RETURN(
      Rows rows, tx.Query("SELECT consumer, count(*) FROM consumer_inbox GROUP BY consumer"));
  std::map<std::string, int64_t> out;
  for (const Row& r : rows) out[r.Text(0)] = r.Int(1);
  return out;
}

}  // namespace converge
