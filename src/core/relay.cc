#include "converge/relay.h"

#include <algorithm>
#include <set>

#include "converge/failpoint.h"
#include "src/core/crypto.h"
#include "src/core/relay_internal.h"

namespace converge {
namespace {

struct Pending {
  int64_t seq;
  int64_t partition;
  Event event;  // the routing fields and the envelope
};

// The claim: unpublished events of the partitions held, by seq, $1 at most.
//
// A relay holding every partition (one relay alone) asks without a partition filter: the
// query is then the partial index `outbox_unpublished (seq)` exactly, and PostgreSQL walks
// it in order and stops after $1 rows whatever its statistics say. With the filter
// "partition_no IN (all 64)", a backlog loaded since the last ANALYZE made it estimate a
// few matching rows and bitmap-scan `outbox_unpublished_partition`, then sort the whole
// backlog: 120-280 ms a claim of 1,000 out of 200,000 (docs/benchmarks.md, NATS).
// A relay holding a subset keeps "partition_no IN ($2, $3, ...)" and the planner's choice:
// on PostgreSQL, `outbox_unpublished_partition` or `outbox_unpublished`; on SQLite, which
// has no partition index (through it SQLite read and sorted every unpublished row of two
// or more partitions held: SqliteDialect::DropOutboxPartitionIndex), `outbox_unpublished`
// in seq order, skipping other partitions' rows until $1 match (OutboxRelayTest.
// OnSqliteAFilteredClaimWalksTheUnpublishedIndexInOrder).
std::string ClaimSql(const std::map<int64_t, int64_t>& owned, bool filter) {
  return internal::RelayClaimSql(owned.size(), filter);
}

Result<std::vector<Pending>> ClaimRows(Tx& tx, const std::map<int64_t, int64_t>& owned,
                                       size_t batch, bool filter) {
  std::vector<Value> params = {Value(static_cast<int64_t>(batch))};
  if (filter) {
    for (const auto& [p, fence] : owned) params.emplace_back(p);
  }
  CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.QueryParams(ClaimSql(owned, filter), params));
  std::vector<Pending> out;
  out.reserve(rows.size());
  for (const Row& r : rows) {
    // Unfiltered, a row outside the partitions held (a partition_no no relay can own,
    // written by hand) is left alone, as the filtered claim leaves it.
    if (!owned.count(r.Int(6))) continue;
    Pending& p = out.emplace_back(Pending{r.Int(0), r.Int(6), Event{}});
    p.event.id = r.Text(1);
    p.event.source = r.Text(2);
    p.event.type = r.Text(3);
    p.event.subject = r.Text(4);
    p.event.aggregate_type = r.Text(7);
    p.event.data.clear();  // inside the envelope
    p.event.envelope = r.Text(5);
  }
  if (out.empty() && rows.size() == batch && !filter) {
    // A whole batch of rows no relay can own at the head: ask again with the filter,
    // which skips them, rather than stall.
    return ClaimRows(tx, owned, batch, true);
  }
  return out;
}

Result<std::vector<Pending>> Claim(Tx& tx, const std::map<int64_t, int64_t>& owned, size_t batch) {
  return ClaimRows(tx, owned, batch, owned.size() < static_cast<size_t>(kOutboxPartitions));
}

// The publisher's transactional face if it writes to `db`, else nullptr.
TxPublisher* TxPublisherOn(Database& db, Publisher& publisher) {
  TxPublisher* tx_publisher = publisher.tx_publisher();
  return tx_publisher != nullptr && tx_publisher->database() == &db ? tx_publisher : nullptr;
}

}  // namespace

namespace internal {

std::string RelayClaimSql(size_t partitions, bool filter) {
  std::string sql =
      "SELECT seq, event_id, source, type, aggregate_id, payload, partition_no, aggregate_type "
      "FROM outbox_events WHERE published_at IS NULL";
  if (filter) {
    sql += " AND partition_no IN (";
    for (size_t i = 0; i < partitions; ++i) sql += (i ? ", $" : "$") + std::to_string(i + 2);
    sql += ")";
  }
  return sql + " ORDER BY seq LIMIT $1";
}

}  // namespace internal

namespace {

// The longest acquire_interval a relay honours (RelayOptions: an Acquire renews the
// partitions a pass does not publish from, so Acquires must come less than half a lease
// apart, the worker's idle wait included); a longer one is cut to it. Beyond it leases
// would lapse between Acquires, and other relays take them over: never a double publish
// (the fences hold), but needless takeovers.
Millis MaxAcquireInterval(const RelayOptions& options) {
  return std::max(Millis(0), options.lease / 2 - std::min(options.poll, options.lease / 3));
}

}  // namespace

Relay::Relay(Database& db, Outbox& outbox, Publisher& publisher, RelayOptions options,
             Clock* clock)
    : db_(db),
      outbox_(outbox),
      publisher_(publisher),
      tx_publisher_(TxPublisherOn(db, publisher)),
      options_(options),
      acquire_every_(std::min(options_.acquire_interval.value_or(
                                  tx_publisher_ != nullptr ? options_.lease / 10 : Millis(0)),
                              MaxAcquireInterval(options_))),
      clock_(clock ? clock : Clock::System()),
      name_(options_.name.empty() ? "relay-" + internal::RandomHex(6) : options_.name),
      // Wakes before the leases lapse, even when idle.
      worker_("relay " + name_, std::min(options_.poll, options_.lease / 3),
              [this] {
                Result<size_t> r = RunOnce();
                // More is waiting: a full batch, or one the publisher cut short.
                return r && (*r >= options_.batch || cut_short_);
              },
              &outbox_.wakeup()) {}

Relay::~Relay() { Stop(); }

Result<std::map<int64_t, int64_t>> Relay::Acquire() {
  std::map<int64_t, int64_t> owned;
  // The incarnation's number is this incarnation's only once the transaction that drew
  // it commits: one that rolls back may have its number handed out again (SQLite's
  // sequence is a table), and a restart drawing the same number would tie with this one,
  // neither superseding the other. So each attempt draws anew until one commits.
  const bool draw = incarnation_ == 0;
  Status st = db_.Transact([&](Tx& tx) {
    if (draw) incarnation_ = 0;
    return AcquireIn(tx, &owned);
  });
  if (!st.ok() && draw) incarnation_ = 0;
  return Acquired(st, std::move(owned));
}

Result<std::map<int64_t, int64_t>> Relay::Acquired(const Status& st,
                                                   std::map<int64_t, int64_t> owned) {
  if (!st.ok()) {
    if (st.code() == StatusCode::kFailedPrecondition) held_.clear();  // superseded
    return tl::unexpected(st);
  }
  held_ = owned;
  return owned;
}

Status Relay::AcquireIn(Tx& tx, std::map<int64_t, int64_t>* owned_out) {
  std::map<int64_t, int64_t>& owned = *owned_out;
  owned.clear();
  const int64_t now = clock_->NowMillis();
  const int64_t until = now + options_.lease.count();
  // This incarnation's number, drawn once from the store-wide sequence: a restart under
  // the same name always gets a higher one.
  if (incarnation_ == 0) {
    CONVERGE_ASSIGN_OR_RETURN(incarnation_, tx.NextFence());
  }
  // Membership: every relay announces itself each Acquire, owning partitions or not, so
  // the others can compute a fair share that includes it. The newest incarnation of a
  // name keeps the row; an older one still alive learns here that it was superseded,
  // and owns nothing from then on (without this, two live incarnations of one name
  // would take the partitions from each other on every pass).
  CONVERGE_RETURN_IF_ERROR(tx.Exec(
      "INSERT INTO relay_members (owner, lease_until, incarnation) VALUES ($1, $2, $3) "
      "ON CONFLICT (owner) DO UPDATE SET lease_until = excluded.lease_until, "
      "incarnation = excluded.incarnation "
      "WHERE relay_members.incarnation <= excluded.incarnation",
      name_, until, incarnation_));
  CONVERGE_ASSIGN_OR_RETURN(
      Rows current, tx.Query("SELECT incarnation FROM relay_members WHERE owner = $1", name_));
  if (current.empty() || current[0].Int(0) != incarnation_) {
    return FailedPreconditionError("relay '" + name_ + "' incarnation " +
                                   std::to_string(incarnation_) +
                                   " was superseded by a newer one under the same name");
  }
  CONVERGE_ASSIGN_OR_RETURN(
      Rows members, tx.Query("SELECT owner FROM relay_members WHERE lease_until > $1", now));
  std::set<std::string> live = {name_};
  for (const Row& m : members) live.insert(m.Text(0));
  CONVERGE_ASSIGN_OR_RETURN(
      Rows rows,
      tx.Query("SELECT partition_no, owner, fence, lease_until FROM relay_partitions"));
  std::map<int64_t, const Row*> by_partition;
  for (const Row& r : rows) by_partition[r.Int(0)] = &r;
  const int64_t share = (kOutboxPartitions + static_cast<int64_t>(live.size()) - 1) /
                        static_cast<int64_t>(live.size());
  std::set<int64_t> renew;  // ours at the fence this incarnation holds
  // Renew what is still ours, shedding any excess over the fair share. A partition
  // under our name that this incarnation did not acquire (a restart that reuses the
  // name, while the previous process may still be alive) is taken at once but with a
  // raised fence, so the previous process can no longer mark or publish in it.
  for (const Row& r : rows) {
    if (r.Text(1) != name_ || r.Int(3) <= now) continue;
    if (static_cast<int64_t>(owned.size()) >= share) {
      CONVERGE_RETURN_IF_ERROR(tx.Exec(
          "UPDATE relay_partitions SET lease_until = 0 WHERE partition_no = $1 AND owner = $2 "
          "AND fence = $3", r.Int(0), name_, r.Int(2)));
      continue;
    }
    auto held = held_.find(r.Int(0));
    if (held != held_.end() && held->second == r.Int(2)) {
      owned[r.Int(0)] = r.Int(2);  // renewed below, all in one statement
      renew.insert(r.Int(0));
      continue;
    }
    const int64_t fence = r.Int(2) + 1;
    CONVERGE_ASSIGN_OR_RETURN(
        int64_t n, tx.Exec("UPDATE relay_partitions SET lease_until = $1, fence = $2 "
                           "WHERE partition_no = $3 AND owner = $4 AND fence = $5",
                           until, fence, r.Int(0), name_, r.Int(2)));
    if (n == 1) owned[r.Int(0)] = fence;
  }
  CONVERGE_ASSIGN_OR_RETURN(std::set<int64_t> renewed, Renew(tx, renew, owned, now));
  for (int64_t p : renew) {
    if (!renewed.count(p)) owned.erase(p);
  }
  // Take free or expired partitions up to the share. Each take raises the fence; the
  // WHERE makes two relays racing for one partition end with one winner.
  for (int64_t p = 0; p < kOutboxPartitions && static_cast<int64_t>(owned.size()) < share; ++p) {
    if (owned.count(p)) continue;
    auto it = by_partition.find(p);
    if (it == by_partition.end()) {
      CONVERGE_ASSIGN_OR_RETURN(
          int64_t n,
          tx.Exec("INSERT INTO relay_partitions (partition_no, owner, fence, lease_until) "
                  "VALUES ($1, $2, 1, $3) ON CONFLICT (partition_no) DO NOTHING",
                  p, name_, until));
      if (n == 1) owned[p] = 1;
    } else if (it->second->Int(3) <= now) {
      const int64_t fence = it->second->Int(2) + 1;
      CONVERGE_ASSIGN_OR_RETURN(
          int64_t n,
          tx.Exec("UPDATE relay_partitions SET owner = $1, fence = $2, lease_until = $3 "
                  "WHERE partition_no = $4 AND fence = $5 AND lease_until <= $6",
                  name_, fence, until, p, fence - 1, now));
      if (n == 1) owned[p] = fence;
    }
  }
  return OkStatus();
}

Result<bool> Relay::StillOwns(Tx& tx, int64_t partition, int64_t fence, int64_t now) {
  // Renewing is the check: one row changes only if the partition is still ours at this
  // fence. On PostgreSQL the row stays locked until commit, so no takeover interleaves.
  CONVERGE_ASSIGN_OR_RETURN(
      int64_t n, tx.Exec("UPDATE relay_partitions SET lease_until = $1 WHERE partition_no = $2 "
                         "AND owner = $3 AND fence = $4",
                         now + options_.lease.count(), partition, name_, fence));
  return n == 1;
}

namespace {

// Marks the events `seqs` published at `now`, a few statements for the whole batch (not a
// round trip per event); returns how many were still unpublished.
Result<size_t> MarkPublished(Tx& tx, const std::vector<int64_t>& seqs, int64_t now) {
  constexpr size_t kChunk = 500;
  size_t marked = 0;
  for (size_t i = 0; i < seqs.size(); i += kChunk) {
    std::string sql =
        "UPDATE outbox_events SET published_at = $1, publish_attempts = publish_attempts + 1, "
        "last_error = NULL WHERE published_at IS NULL AND seq IN (";
    std::vector<Value> params = {Value(now)};
    for (size_t j = i; j < std::min(seqs.size(), i + kChunk); ++j) {
      sql += (j > i ? ", $" : "$") + std::to_string(params.size() + 1);
      params.emplace_back(seqs[j]);
    }
    CONVERGE_ASSIGN_OR_RETURN(int64_t n, tx.ExecParams(sql + ")", params));
    marked += static_cast<size_t>(n);
  }
  return marked;
}

}  // namespace

Result<std::set<int64_t>> Relay::Renew(Tx& tx, const std::set<int64_t>& partitions,
                                       const std::map<int64_t, int64_t>& owned, int64_t now) {
  if (partitions.empty()) return std::set<int64_t>{};
  // The common case in one statement: every partition still ours at its fence.
  std::string sql =
      "UPDATE relay_partitions SET lease_until = $1 WHERE owner = $2 AND (partition_no, fence) "
      "IN (";
  std::vector<Value> params = {Value(now + options_.lease.count()), Value(name_)};
  for (int64_t p : partitions) {
    sql += (params.size() > 2 ? ", ($" : "($") + std::to_string(params.size() + 1) + ", $" +
           std::to_string(params.size() + 2) + ")";
    params.emplace_back(p);
    params.emplace_back(owned.at(p));
  }
  CONVERGE_ASSIGN_OR_RETURN(int64_t n, tx.ExecParams(sql + ")", params));
  if (n == static_cast<int64_t>(partitions.size())) return partitions;
  // Some were taken over: find out which, one by one. One that is not ours at its fence
  // leaves held_ at once, so the passes until the next Acquire neither claim from it nor
  // count it in partitions_owned: a takeover that committed is for good (fences only
  // rise; rows are never deleted), even if `tx` rolls back. On SQLite `tx` may also see
  // a takeover by another relay's transaction in the same batch that then fails to
  // commit; the partition is then still ours, unclaimed until the next Acquire takes it
  // back (with a raised fence) or another relay takes it once its lease lapses. Nothing is
  // published twice or lost either way.
  std::set<int64_t> mine;
  for (int64_t p : partitions) {
    CONVERGE_ASSIGN_OR_RETURN(bool ours, StillOwns(tx, p, owned.at(p), now));
    if (ours) {
      mine.insert(p);
      continue;
    }
    auto held = held_.find(p);
    if (held != held_.end() && held->second == owned.at(p)) held_.erase(held);
  }
  return mine;
}

Result<size_t> Relay::RunOnce() {
  cut_short_ = false;
  const int64_t now = clock_->NowMillis();
  Result<std::map<int64_t, int64_t>> owned = held_;
  const bool acquire = held_.empty() || acquire_every_ <= Millis(0) ||
                       now - acquired_at_ >= acquire_every_.count() ||
                       now < acquired_at_;
  Result<size_t> r = size_t{0};
  if (acquire && tx_publisher_ != nullptr && incarnation_ != 0) {
    // Shared database, incarnation known: renew, take and shed the partitions in the
    // transaction that publishes, one durable commit per pass instead of two. (The first
    // pass acquires on its own: the incarnation's number is drawn from a sequence that a
    // rollback would hand out again on SQLite, and a publish failure rolls back.)
    std::map<int64_t, int64_t> acquired;
    r = RunShared(held_, &acquired);
    owned = r ? Acquired(OkStatus(), std::move(acquired))
              : Acquired(r.error(), std::move(acquired));
    if (owned) acquired_at_ = now;
  } else {
    if (acquire) {
      owned = Acquire();
      if (owned) acquired_at_ = now;
    }
    if (!owned) {
      r = tl::unexpected(owned.error());
    } else if (!owned->empty()) {
      r = tx_publisher_ != nullptr ? RunShared(*owned, nullptr) : RunSeparate(*owned);
    }
  }
  std::lock_guard<std::mutex> l(stats_mu_);
  ++stats_.passes;
  // held_, not *owned: a pass that found partitions taken over dropped them (Renew).
  if (owned) stats_.partitions_owned = static_cast<int64_t>(held_.size());
  if (r) {
    stats_.published += static_cast<int64_t>(*r);
  } else {
    stats_.last_error = r.error().ToString();
  }
  return r;
}

// Outbox and transport share the database (the publisher's TxPublisher writes to it):
// claim, publish and mark in one transaction, which also proves ownership of every
// partition it touches. The batch is published and marked in a few statements, not a few
// per event.
//
// With `acquired`, the pass first renews, takes and sheds partitions (AcquireIn) in that
// same transaction and claims in what it then holds, returned in *acquired: those
// partitions are proven this relay's by the statements that just renewed or took them
// (on PostgreSQL their rows stay locked until commit), so no second Renew is needed.
Result<size_t> Relay::RunShared(const std::map<int64_t, int64_t>& held,
                                std::map<int64_t, int64_t>* acquired) {
  size_t published = 0;
  Status st = db_.Transact([&](Tx& tx) -> Status {
    published = 0;
    const std::map<int64_t, int64_t>* owned = &held;
    if (acquired != nullptr) {
      CONVERGE_RETURN_IF_ERROR(AcquireIn(tx, acquired));
      owned = acquired;
    }
    if (owned->empty()) return OkStatus();
    const int64_t now = clock_->NowMillis();
    CONVERGE_ASSIGN_OR_RETURN(std::vector<Pending> batch, Claim(tx, *owned, options_.batch));
    std::set<int64_t> touched;
    for (const Pending& p : batch) touched.insert(p.partition);
    std::set<int64_t> mine = touched;
    if (acquired == nullptr) {
      CONVERGE_ASSIGN_OR_RETURN(mine, Renew(tx, touched, *owned, now));
    }
    std::vector<Event> events;
    std::vector<int64_t> seqs;
    for (const Pending& p : batch) {
      if (!mine.count(p.partition)) continue;
      events.push_back(p.event);
      seqs.push_back(p.seq);
    }
    if (seqs.empty()) return OkStatus();
    CONVERGE_RETURN_IF_ERROR(tx_publisher_->PublishInTx(tx, events));
    CONVERGE_RETURN_IF_ERROR(failpoint::Hit("relay.after_publish_before_mark"));
    CONVERGE_ASSIGN_OR_RETURN(published, MarkPublished(tx, seqs, now));
    return OkStatus();
  });
  if (!st.ok()) return tl::unexpected(st);
  return published;
}

// An external transport: publish each event, then mark the published ones. A crash in
// between re-publishes them on the next pass. A relay that lost a partition meanwhile
// does not mark its events; the new owner publishes them again (at least once).
Result<size_t> Relay::RunSeparate(const std::map<int64_t, int64_t>& owned) {
  std::vector<Pending> batch;
  CONVERGE_RETURN_IF_ERROR(db_.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(batch, Claim(tx, owned, options_.batch));
    return OkStatus();
  }));
  if (batch.empty()) return size_t{0};
  // Subjects whose last attempted publish failed go after the others, each in its own
  // order: a target that fails slowly on one aggregate would otherwise spend every pass's
  // time on it (a publisher may cut its batch short: PublishWhile) while the others wait.
  // One that is then not attempted leaves the set and heads the next pass, so it is
  // tried at least every other pass, and the others get at least every other pass.
  std::stable_partition(batch.begin(), batch.end(), [&](const Pending& p) {
    return !failing_subjects_.count(p.event.subject);
  });

  // One PublishBatch for the whole batch (a broker keeps a window of publishes in flight);
  // per aggregate, only what precedes its first failure counts as published.
  std::vector<Event> events;
  events.reserve(batch.size());
  for (const Pending& p : batch) events.push_back(p.event);
  const std::vector<Status> results = publisher_.PublishBatch(events);
  if (results.size() != batch.size()) {
    return tl::unexpected(InternalError("PublishBatch answered " +
                                        std::to_string(results.size()) + " results for " +
                                        std::to_string(batch.size()) + " events"));
  }
  std::set<std::string> stopped;  // aggregates whose batch ended at a failed publish
  std::set<std::string> still_failing;  // subjects attempted in this pass that failed
  bool cut_short = false;  // an event was not attempted: run again at once
  std::vector<const Pending*> done;
  std::vector<std::pair<const Pending*, const Status*>> refused;  // parked, then marked
  std::vector<std::pair<int64_t, std::string>> failed;
  for (size_t i = 0; i < batch.size(); ++i) {
    const Pending& p = batch[i];
    if (stopped.count(p.event.subject)) continue;
    if (results[i].code() == StatusCode::kAborted &&
        results[i].reason() == reason::kNotAttempted) {
      stopped.insert(p.event.subject);  // not attempted (Publisher::PublishBatch): next pass
      cut_short = true;
      continue;
    }
    if (!results[i].ok() && !results[i].transient()) {
      // Refused for good: parked, so it stops heading every claim; its aggregate goes on.
      refused.emplace_back(&p, &results[i]);
      continue;
    }
    if (!results[i].ok()) {
      stopped.insert(p.event.subject);
      still_failing.insert(p.event.subject);
      failed.emplace_back(p.seq, results[i].ToString());
      continue;
    }
    done.push_back(&p);
  }
  failing_subjects_ = std::move(still_failing);
  // Run again at once only while it moves: a pass whose every attempt failed waits for the
  // poll, or a target failing fast would be called in a loop.
  cut_short_ = cut_short && !done.empty();
  if (!done.empty()) CONVERGE_RETURN_IF_ERROR(failpoint::Hit("relay.after_publish_before_mark"));

  size_t marked = 0;
  size_t parked = 0;
  CONVERGE_RETURN_IF_ERROR(db_.Transact([&](Tx& tx) -> Status {
    marked = 0;
    parked = 0;
    const int64_t now = clock_->NowMillis();
    std::set<int64_t> touched;
    for (const Pending* p : done) touched.insert(p->partition);
    for (const auto& [p, error] : refused) touched.insert(p->partition);
    CONVERGE_ASSIGN_OR_RETURN(std::set<int64_t> mine, Renew(tx, touched, owned, now));
    std::vector<int64_t> seqs;
    for (const Pending* p : done) {
      if (mine.count(p->partition)) seqs.push_back(p->seq);
    }
    CONVERGE_ASSIGN_OR_RETURN(marked, MarkPublished(tx, seqs, now));
    for (const auto& [p, error] : refused) {
      if (!mine.count(p->partition)) continue;
      CONVERGE_ASSIGN_OR_RETURN(
          int64_t n, tx.Exec("UPDATE outbox_events SET published_at = $1, "
                             "publish_attempts = publish_attempts + 1, last_error = $2 "
                             "WHERE seq = $3 AND published_at IS NULL",
                             now, "refused by the broker, parked: " + error->ToString(), p->seq));
      if (n == 0) continue;
      DeadLetter letter;
      letter.consumer = "relay";
      letter.queue = std::string(kRelayDeadLetterQueue);
      letter.event_id = p->event.id;
      letter.source = p->event.source;
      letter.type = p->event.type;
      letter.envelope = p->event.envelope;
      letter.error_class = "refused";
      letter.error_code = std::string(StatusCodeName(error->code()));
      letter.error = error->message();
      letter.attempts = 1;
      letter.first_failure_at = letter.last_failure_at = now;
      CONVERGE_RETURN_IF_ERROR(StatusOf(DeadLetters::Park(tx, letter)));
      ++parked;
    }
    std::vector<std::vector<Value>> failures;
    for (const auto& [seq, error] : failed) failures.push_back({Value(error), Value(seq)});
    CONVERGE_RETURN_IF_ERROR(
        tx.ExecMany("UPDATE outbox_events SET publish_attempts = publish_attempts + 1, "
                    "last_error = $1 WHERE seq = $2",
                    failures));
    return OkStatus();
  }));
  if (!failed.empty() || parked > 0) {
    std::lock_guard<std::mutex> l(stats_mu_);
    stats_.publish_failures += static_cast<int64_t>(failed.size());
    stats_.refused += static_cast<int64_t>(parked);
    if (!failed.empty()) stats_.last_error = failed.back().second;
    if (parked > 0) stats_.last_error = refused.back().second->ToString();
  }
  return marked;
}

Status OutboxRequeuer::Requeue(Tx& tx, const DeadLetter& letter) {
  // The aggregate's lock, as a producer takes it (Outbox::Enqueue): a producer that
  // publishes in its own transaction and commits after this replay sees the event
  // unpublished again, and goes the relay's way behind it.
  CONVERGE_ASSIGN_OR_RETURN(
      Rows agg, tx.Query("SELECT aggregate_id FROM outbox_events WHERE source = $1 AND "
                         "event_id = $2",
                         letter.source, letter.event_id));
  if (!agg.empty()) {
    CONVERGE_RETURN_IF_ERROR(tx.LockUntilCommit(internal::OutboxLockKey(agg[0].Text(0))));
  }
  CONVERGE_ASSIGN_OR_RETURN(
      int64_t n, tx.Exec("UPDATE outbox_events SET published_at = NULL, last_error = NULL "
                         "WHERE source = $1 AND event_id = $2 AND published_at IS NOT NULL",
                         letter.source, letter.event_id));
  if (n == 0) {
    return NotFoundError("outbox event '" + letter.event_id +
                         "' is gone (swept after the published retention) or unpublished");
  }
  return tx.Notify(kOutboxChannel);
}

void Relay::ReleaseAll() {
  // Hand back what this incarnation holds, at the fences it holds them, so another relay
  // need not wait for the leases (and a newer incarnation of the name keeps its own).
  (void)db_.Transact([&](Tx& tx) -> Status {
    CONVERGE_RETURN_IF_ERROR(
        tx.Exec("UPDATE relay_members SET lease_until = 0 WHERE owner = $1 AND incarnation = $2",
                name_, incarnation_));
    for (const auto& [partition, fence] : held_) {
      CONVERGE_RETURN_IF_ERROR(
          tx.Exec("UPDATE relay_partitions SET lease_until = 0 WHERE partition_no = $1 "
                  "AND owner = $2 AND fence = $3",
                  partition, name_, fence));
    }
    return OkStatus();
  });
}

void Relay::Start() {
  if (worker_.running()) return;
  listener_ = db_.AddListener(kOutboxChannel, [this] { outbox_.wakeup().Notify(); });
  worker_.Start();
}

void Relay::Stop() {
  if (!worker_.running()) return;
  db_.RemoveListener(listener_);
  worker_.Stop();
  ReleaseAll();  // the worker is joined: held_ is ours to read
}

RelayStats Relay::stats() const {
  std::lock_guard<std::mutex> l(stats_mu_);
  return stats_;
}

}  // namespace converge
