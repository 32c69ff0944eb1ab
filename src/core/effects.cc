#include "converge/effects.h"

#include <vector>

#include "converge/dead_letters.h"
#include "converge/failpoint.h"
#include "src/core/backoff.h"
#include "src/core/validate.h"

namespace converge {

EffectRunner::EffectRunner(Database& db, EffectRunnerOptions options, Executor executor,
                           Clock* clock)
    : db_(db),
      options_(std::move(options)),
      executor_(std::move(executor)),
      clock_(clock ? clock : Clock::System()) {}

EffectRunner::~EffectRunner() { Stop(); }

Result<bool> EffectRunner::Record(Tx& tx, const std::string& key, const std::string& payload) {
  CONVERGE_RETURN_IF_ERROR(internal::ValidateToken("effect key", key, 255));
  const int64_t now = clock_->NowMillis();
  CONVERGE_ASSIGN_OR_RETURN(
      int64_t n, tx.Exec("INSERT INTO effects (effect_key, kind, payload, state, attempts, "
                         "next_attempt_at, created_at, updated_at) "
                         "VALUES ($1, $2, $3, 'pending', 0, $4, $4, $4) "
                         "ON CONFLICT (effect_key) DO NOTHING",
                         key, options_.kind, payload, now));
  if (n == 1) {
    tx.OnCommit([this] { wakeup_.Notify(); });
    CONVERGE_RETURN_IF_ERROR(tx.Notify("converge_effects:" + options_.kind));
  }
  return n == 1;
}

Result<size_t> EffectRunner::RunOnce() {
  if (options_.kind.empty() || options_.max_attempts < 1) {
    return tl::unexpected(InvalidArgumentError("effect runner needs a kind and max_attempts >= 1"));
  }
  struct Claimed {
    std::string key, payload;
    int64_t attempts, created_at;
    Result<std::string> outcome = std::string();
  };
  std::vector<Claimed> claimed;
  CONVERGE_RETURN_IF_ERROR(db_.Transact([&](Tx& tx) -> Status {
    claimed.clear();
    const int64_t now = clock_->NowMillis();
    // The claim is a lease: a runner that dies mid-call lets it run out, and the intent
    // is executed again with the same key.
    // The outer conditions repeat the inner ones: after waiting on a row lock, PostgreSQL
    // re-checks them against the row's new version, so a row another runner claimed
    // meanwhile is left alone; SKIP LOCKED spares the wait.
    const std::string sql =
        std::string("UPDATE effects SET next_attempt_at = $1, attempts = attempts + 1, "
                    "updated_at = $2 WHERE state = 'pending' AND next_attempt_at <= $2 "
                    "AND effect_key IN (SELECT effect_key FROM effects "
                    "WHERE kind = $3 AND state = 'pending' AND next_attempt_at <= $2 "
                    "ORDER BY next_attempt_at LIMIT $4") +
        (tx.backend() == Backend::kPostgres ? " FOR UPDATE SKIP LOCKED" : "") +
        ") RETURNING effect_key, payload, attempts, created_at";
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows, tx.Query(sql, now + options_.lease.count(), now, options_.kind,
                            static_cast<int64_t>(options_.batch)));
    for (const Row& r : rows) claimed.push_back({r.Text(0), r.Text(1), r.Int(2), r.Int(3)});
    return OkStatus();
  }));
  if (claimed.empty()) return size_t{0};

  for (Claimed& c : claimed) {
    try {
      c.outcome = executor_(c.key, c.payload);
    } catch (const std::exception& e) {
      c.outcome = tl::unexpected(InternalError(std::string("effect executor threw: ") + e.what()));
    }
  }
  CONVERGE_RETURN_IF_ERROR(failpoint::Hit("effects.after_call_before_record"));

  int64_t done = 0, retries = 0, failed = 0;
  std::string last_error;
  CONVERGE_RETURN_IF_ERROR(db_.Transact([&](Tx& tx) -> Status {
    done = retries = failed = 0;
    const int64_t now = clock_->NowMillis();
    for (const Claimed& c : claimed) {
      if (c.outcome) {
        ++done;
        CONVERGE_RETURN_IF_ERROR(tx.Exec(
            "UPDATE effects SET state = 'done', result = $1, last_error = NULL, updated_at = $2 "
            "WHERE effect_key = $3 AND state = 'pending'",
            *c.outcome, now, c.key));
        continue;
      }
      const Status& err = c.outcome.error();
      last_error = err.ToString();
      if (err.transient() && c.attempts < options_.max_attempts) {
        ++retries;
        Millis delay = internal::FullJitterBackoff(c.attempts, options_.backoff_initial,
                                                   options_.backoff_max);
        CONVERGE_RETURN_IF_ERROR(tx.Exec(
            "UPDATE effects SET next_attempt_at = $1, last_error = $2, updated_at = $3 "
            "WHERE effect_key = $4 AND state = 'pending'",
            now + delay.count(), last_error, now, c.key));
        continue;
      }
      ++failed;
      CONVERGE_RETURN_IF_ERROR(tx.Exec(
          "UPDATE effects SET state = 'failed', last_error = $1, updated_at = $2 "
          "WHERE effect_key = $3 AND state = 'pending'",
          last_error, now, c.key));
      DeadLetter d;
      d.consumer = "effect:" + options_.kind;
      d.queue = "effect:" + options_.kind;
      d.event_id = c.key;
      d.source = "urn:converge:effects";
      d.type = options_.kind;
      d.envelope = c.payload;
      d.error_class = err.transient() ? "exhausted" : "permanent";
      d.error_code = std::string(StatusCodeName(err.code()));
      d.error = err.message();
      d.attempts = c.attempts;
      d.first_failure_at = c.created_at;
      d.last_failure_at = now;
      CONVERGE_RETURN_IF_ERROR(DeadLetters::Park(tx, d));
    }
    return OkStatus();
  }));
  std::lock_guard<std::mutex> l(stats_mu_);
  stats_.executed += done;
  stats_.retries += retries;
  stats_.failed += failed;
  if (!last_error.empty()) stats_.last_error = last_error;
  return claimed.size();
}

void EffectRunner::Start() {
  if (running_.exchange(true)) return;
  listener_ = db_.AddListener("converge_effects:" + options_.kind, [this] { wakeup_.Notify(); });
  thread_ = std::thread([this] {
    uint64_t seen = wakeup_.generation();
    while (running_.load()) {
      Result<size_t> r = RunOnce();
      if (r && *r >= options_.batch) continue;
      if (!running_.load()) break;
      wakeup_.WaitFor(options_.poll, &seen);
    }
  });
}

void EffectRunner::Stop() {
  if (!running_.exchange(false)) return;
  db_.RemoveListener(listener_);
  wakeup_.Notify();
  if (thread_.joinable()) thread_.join();
}

EffectStats EffectRunner::stats() const {
  std::lock_guard<std::mutex> l(stats_mu_);
  return stats_;
}

}  // namespace converge
