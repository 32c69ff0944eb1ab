#include "converge/relay.h"

#include <set>

#include "converge/failpoint.h"

namespace converge {
namespace {

constexpr std::string_view kClaim =
    "SELECT seq, event_id, source, type, aggregate_id, payload FROM outbox_events "
    "WHERE published_at IS NULL ORDER BY seq LIMIT $1";

struct Pending {
  int64_t seq;
  Message message;
};

std::vector<Pending> ToPending(const Rows& rows) {
  std::vector<Pending> out;
  out.reserve(rows.size());
  for (const Row& r : rows) {
    out.push_back({r.Int(0), Message{r.Text(1), r.Text(2), r.Text(3), r.Text(4), r.Text(5)}});
  }
  return out;
}

}  // namespace

Relay::Relay(Database& db, Outbox& outbox, Publisher& publisher, RelayOptions options,
             Clock* clock)
    : db_(db),
      outbox_(outbox),
      publisher_(publisher),
      options_(options),
      clock_(clock ? clock : Clock::System()) {}

Relay::~Relay() { Stop(); }

Result<size_t> Relay::RunOnce() {
  Database* shared = publisher_.SharedDatabase();
  Result<size_t> r = shared == &db_ ? RunShared(db_) : RunSeparate();
  std::lock_guard<std::mutex> l(stats_mu_);
  ++stats_.passes;
  if (r) {
    stats_.published += static_cast<int64_t>(*r);
  } else {
    stats_.last_error = r.error().ToString();
  }
  return r;
}

// Outbox and transport share the database: claim, publish and mark in one transaction.
Result<size_t> Relay::RunShared(Database& db) {
  size_t published = 0;
  Status st = db.Transact([&](Tx& tx) -> Status {
    published = 0;
    CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query(kClaim, static_cast<int64_t>(options_.batch)));
    const int64_t now = clock_->NowMillis();
    for (const Pending& p : ToPending(rows)) {
      CONVERGE_RETURN_IF_ERROR(publisher_.PublishInTx(tx, p.message));
      CONVERGE_RETURN_IF_ERROR(failpoint::Hit("relay.after_publish_before_mark"));
      CONVERGE_RETURN_IF_ERROR(
          tx.Exec("UPDATE outbox_events SET published_at = $1, publish_attempts = "
                  "publish_attempts + 1 WHERE seq = $2",
                  now, p.seq));
      ++published;
    }
    return OkStatus();
  });
  if (!st.ok()) return tl::unexpected(st);
  return published;
}

// An external transport: publish each event, then mark the published ones. A crash in
// between re-publishes them on the next pass.
Result<size_t> Relay::RunSeparate() {
  std::vector<Pending> batch;
  CONVERGE_RETURN_IF_ERROR(db_.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query(kClaim, static_cast<int64_t>(options_.batch)));
    batch = ToPending(rows);
    return OkStatus();
  }));
  if (batch.empty()) return size_t{0};

  std::set<std::string> stopped;  // aggregates whose batch ended at a failed publish
  std::vector<int64_t> done;
  std::vector<std::pair<int64_t, std::string>> failed;
  for (const Pending& p : batch) {
    if (stopped.count(p.message.subject)) continue;
    Status st = publisher_.Publish(p.message);
    if (!st.ok()) {
      stopped.insert(p.message.subject);
      failed.emplace_back(p.seq, st.ToString());
      continue;
    }
    done.push_back(p.seq);
  }
  if (!done.empty()) CONVERGE_RETURN_IF_ERROR(failpoint::Hit("relay.after_publish_before_mark"));

  const int64_t now = clock_->NowMillis();
  CONVERGE_RETURN_IF_ERROR(db_.Transact([&](Tx& tx) -> Status {
    for (int64_t seq : done) {
      CONVERGE_RETURN_IF_ERROR(
          tx.Exec("UPDATE outbox_events SET published_at = $1, publish_attempts = "
                  "publish_attempts + 1, last_error = NULL WHERE seq = $2 "
                  "AND published_at IS NULL",
                  now, seq));
    }
    for (const auto& [seq, error] : failed) {
      CONVERGE_RETURN_IF_ERROR(
          tx.Exec("UPDATE outbox_events SET publish_attempts = publish_attempts + 1, "
                  "last_error = $1 WHERE seq = $2",
                  error, seq));
    }
    return OkStatus();
  }));
  if (!failed.empty()) {
    std::lock_guard<std::mutex> l(stats_mu_);
    stats_.publish_failures += static_cast<int64_t>(failed.size());
    stats_.last_error = failed.back().second;
  }
  return done.size();
}

void Relay::Start() {
  if (running_.exchange(true)) return;
  thread_ = std::thread([this] {
    uint64_t seen = outbox_.wakeup().generation();
    while (running_.load()) {
      Result<size_t> r = RunOnce();
      if (r && *r >= options_.batch) continue;  // more is waiting
      if (!running_.load()) break;
      outbox_.wakeup().WaitFor(options_.poll, &seen);
    }
  });
}

void Relay::Stop() {
  if (!running_.exchange(false)) return;
  outbox_.wakeup().Notify();
  if (thread_.joinable()) thread_.join();
}

RelayStats Relay::stats() const {
  std::lock_guard<std::mutex> l(stats_mu_);
  return stats_;
}

}  // namespace converge
