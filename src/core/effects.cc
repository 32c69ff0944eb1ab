// The effect runner: claim, one claim check per call, outcomes, dead letters.
//
// Method: the claim transaction marks a batch of due intents with one fresh claim token
// and a lease. The calls then run one by one, outside any transaction, and the batch's
// lease alone cannot cover them: the calls before a given one may take longer than the
// lease, and another runner may meanwhile have claimed the intent (its token replaces
// ours), executed it, even finished it. So right before each call a conditional renewal
// (pending, our token) re-checks the claim and gives the call a full lease of its own; a
// lost claim skips the call. Each outcome is then written at once, again only under our
// token, and a dead letter is parked only when this runner's `failed` transition changed
// the row. A stale runner thus never repeats a call it no longer owns and never parks an
// effect that another runner recorded; what remains is the at-least-once window every
// lease has (a single call that outlives its lease), which the effect key closes at the
// provider.
#include "converge/effects.h"

#include <algorithm>
#include <vector>

#include "converge/dead_letters.h"
#include "converge/failpoint.h"
#include "src/core/backoff.h"
#include "src/core/crypto.h"
#include "src/core/validate.h"

namespace converge {

namespace {

// The Tx::Notify channel a kind's runners listen on (Record and Start use the same).
std::string Channel(std::string_view kind) { return "converge_effects:" + std::string(kind); }

}  // namespace

EffectRequeuer::EffectRequeuer(Clock* clock) : clock_(clock ? clock : Clock::System()) {}

Status EffectRequeuer::Requeue(Tx& tx, const DeadLetter& letter) {
  const int64_t now = clock_->NowMillis();
  CONVERGE_ASSIGN_OR_RETURN(
      int64_t n, tx.Exec("UPDATE effects SET state = 'pending', attempts = 0, "
                         "next_attempt_at = $1, updated_at = $1 "
                         "WHERE effect_key = $2 AND state = 'failed'",
                         now, letter.event_id));
  if (n == 0) return OkStatus();
  // Runners listen on their kind's channel; the kind is the rest of the letter's queue.
  std::string_view kind = letter.queue;
  if (kind.substr(0, kEffectQueuePrefix.size()) == kEffectQueuePrefix) {
    kind.remove_prefix(kEffectQueuePrefix.size());
  }
  return tx.Notify(Channel(kind));
}

struct EffectRunner::Claim {
  std::string key, payload;
  int64_t attempts = 0, created_at = 0;
};

EffectRunner::EffectRunner(Database& db, EffectRunnerOptions options, Executor executor,
                           Clock* clock)
    : db_(db),
      options_(std::move(options)),
      executor_(std::move(executor)),
      clock_(clock ? clock : Clock::System()),
      worker_("effects " + options_.kind, options_.poll,
              [this] {
                Result<size_t> r = RunOnce();
                return r && *r >= options_.batch;
              },
              &wakeup_) {}

EffectRunner::~EffectRunner() { Stop(); }

Result<bool> EffectRunner::Record(Tx& tx, const std::string& key, const std::string& payload) {
  return Record(tx, key, payload, {});
}

Result<bool> EffectRunner::Record(Tx& tx, const std::string& key, const std::string& payload,
                                  std::string_view subject) {
  CONVERGE_RETURN_IF_ERROR(internal::ValidateToken("effect key", key, 255));
  const int64_t now = clock_->NowMillis();
  Value subject_column, seq;  // NULL: no order
  if (!subject.empty()) {
    // As in the outbox: without the lock, two transactions recording for one subject could
    // commit in the opposite order of their seqs, and the later intent would run first.
    CONVERGE_RETURN_IF_ERROR(
        tx.LockUntilCommit("converge.effects:" + options_.kind + ":" + std::string(subject)));
    CONVERGE_ASSIGN_OR_RETURN(int64_t next, tx.NextFence());
    seq = next;
    subject_column = std::string(subject);
  }
  CONVERGE_ASSIGN_OR_RETURN(
      int64_t n, tx.Exec("INSERT INTO effects (effect_key, kind, payload, state, attempts, "
                         "next_attempt_at, created_at, updated_at, subject, seq) "
                         "VALUES ($1, $2, $3, 'pending', 0, $4, $4, $4, $5, $6) "
                         "ON CONFLICT (effect_key) DO NOTHING",
                         key, options_.kind, payload, now, subject_column, seq));
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
  std::vector<Claim> claimed;
  const std::string token = internal::RandomHex(8);
  CONVERGE_RETURN_IF_ERROR(db_.Transact([&](Tx& tx) -> Status {
    claimed.clear();
    const int64_t now = clock_->NowMillis();
    // The claim is a lease: a runner that dies mid-call lets it run out, and the intent
    // is executed again with the same key.
    // The outer conditions repeat the inner ones: after waiting on a row lock, PostgreSQL
    // re-checks them against the row's new version, so a row another runner claimed
    // meanwhile is left alone; SKIP LOCKED spares the wait.
    // The picked rows are a MATERIALIZED CTE: as a subquery, PostgreSQL may rescan the
    // LIMITed, locking SELECT once per row it updates, skip the rows this very statement
    // locked, and so claim every due row whatever the LIMIT.
    const std::string sql =
        std::string("WITH picked AS MATERIALIZED (SELECT effect_key FROM effects "
                    "WHERE kind = $3 AND state = 'pending' AND next_attempt_at <= $2 "
                    // Order per subject: not while an earlier one of its subject is
                    // pending, nor while another one of it (a later one, when an earlier
                    // one was replayed) is claimed under a live lease: one at a time.
                    "AND (subject IS NULL OR NOT EXISTS (SELECT 1 FROM effects e "
                    "WHERE e.kind = $3 AND e.subject = effects.subject "
                    "AND e.state = 'pending' AND e.effect_key <> effects.effect_key "
                    "AND (e.seq < effects.seq "
                    "OR (e.claim_token IS NOT NULL AND e.next_attempt_at > $2)))) "
                    "ORDER BY next_attempt_at LIMIT $4") +
        std::string(tx.dialect().ForUpdateSkipLocked()) +
        ") UPDATE effects SET next_attempt_at = $1, attempts = attempts + 1, "
        "claim_token = $5, updated_at = $2 "
        "WHERE state = 'pending' AND next_attempt_at <= $2 "
        "AND effect_key IN (SELECT effect_key FROM picked) "
        "RETURNING effect_key, payload, attempts, created_at";
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows, tx.Query(sql, now + options_.lease.count(), now, options_.kind,
                            static_cast<int64_t>(options_.batch), token));
    for (const Row& r : rows) claimed.push_back({r.Text(0), r.Text(1), r.Int(2), r.Int(3)});
    return OkStatus();
  }));
  if (claimed.empty()) return size_t{0};
  // RETURNING has no order: run the oldest intents first, deterministically.
  std::sort(claimed.begin(), claimed.end(), [](const Claim& a, const Claim& b) {
    return a.created_at != b.created_at ? a.created_at < b.created_at : a.key < b.key;
  });

  for (const Claim& c : claimed) {
    // A test pauses a runner here to let its claim lapse and another runner take over.
    CONVERGE_RETURN_IF_ERROR(failpoint::Hit("effects.before_call"));
    enum class Check { kOurs, kLost, kDeferred } check = Check::kLost;
    CONVERGE_RETURN_IF_ERROR(db_.Transact([&](Tx& tx) -> Status {
      const int64_t now = clock_->NowMillis();
      // Renews the claim, unless an earlier intent of the subject is pending again (a
      // replayed dead letter, recorded before this one): then the call waits for it.
      CONVERGE_ASSIGN_OR_RETURN(
          int64_t n,
          tx.Exec("UPDATE effects SET next_attempt_at = $1, updated_at = $2 "
                  "WHERE effect_key = $3 AND state = 'pending' AND claim_token = $4 "
                  "AND (subject IS NULL OR NOT EXISTS (SELECT 1 FROM effects e "
                  "WHERE e.kind = effects.kind AND e.subject = effects.subject "
                  "AND e.state = 'pending' AND e.seq < effects.seq))",
                  now + options_.lease.count(), now, c.key, token));
      check = n == 1 ? Check::kOurs : Check::kLost;
      if (check == Check::kOurs) return OkStatus();
      // Put back, not counted as an attempt, claimable as soon as the earlier one is done.
      CONVERGE_ASSIGN_OR_RETURN(
          int64_t back, tx.Exec("UPDATE effects SET claim_token = NULL, next_attempt_at = $1, "
                                "attempts = attempts - 1, updated_at = $1 "
                                "WHERE effect_key = $2 AND state = 'pending' AND claim_token = $3",
                                now, c.key, token));
      if (back == 1) check = Check::kDeferred;
      return OkStatus();
    }));
    if (check != Check::kOurs) {
      std::lock_guard<std::mutex> l(stats_mu_);
      ++(check == Check::kLost ? stats_.lost_claims : stats_.deferred);
      continue;
    }

    if (c.attempts > options_.max_attempts) {
      // Every claim counts an attempt, and a recorded failure ends the intent at
      // max_attempts; so each attempt past that was claimed and never recorded: the call
      // killed its process (or stalled past the lease) every time. Calling once more would
      // go on for ever; parked instead, uncalled, for a person to look at and replay.
      CONVERGE_RETURN_IF_ERROR(RecordOutcome(
          c, token,
          tl::unexpected(UnavailableError(
              std::to_string(c.attempts - 1) + " attempts were claimed and none recorded an "
              "outcome: the call ended its runner (a crash) or outlasted its lease (" +
              std::to_string(options_.lease.count()) + " ms) each time; not called again"))));
      continue;
    }
    Result<std::string> outcome = std::string();
    try {
      outcome = executor_(c.key, c.payload);
    } catch (const std::exception& e) {
      outcome = tl::unexpected(InternalError(std::string("effect executor threw: ") + e.what()));
    } catch (...) {
      outcome = tl::unexpected(InternalError("effect executor threw a non-standard exception"));
    }
    // A crash here re-executes the call with the same key after the lease; a pause lets
    // another runner take the claim over before this one records the outcome.
    CONVERGE_RETURN_IF_ERROR(failpoint::Hit("effects.after_call_before_record"));
    CONVERGE_RETURN_IF_ERROR(RecordOutcome(c, token, outcome));
  }
  return claimed.size();
}

Status EffectRunner::RecordOutcome(const Claim& c, const std::string& token,
                                   const Result<std::string>& outcome) {
  enum class Recorded { kLost, kDone, kRetry, kFailed } recorded = Recorded::kLost;
  std::string error;
  // Every write below is conditional on our claim token: a runner that lost its claim
  // (another one re-claimed the intent, and may have finished it) changes nothing.
  CONVERGE_RETURN_IF_ERROR(db_.Transact([&](Tx& tx) -> Status {
    recorded = Recorded::kLost;
    const int64_t now = clock_->NowMillis();
    if (outcome) {
      CONVERGE_ASSIGN_OR_RETURN(
          int64_t n,
          tx.Exec("UPDATE effects SET state = 'done', result = $1, last_error = NULL, "
                  "claim_token = NULL, updated_at = $2 "
                  "WHERE effect_key = $3 AND state = 'pending' AND claim_token = $4",
                  *outcome, now, c.key, token));
      if (n == 1) recorded = Recorded::kDone;
      return OkStatus();
    }
    const Status& err = outcome.error();
    error = err.ToString();
    if (err.transient() && c.attempts < options_.max_attempts) {
      // Backoff with full jitter, but never sooner than the callee asked (Retry-After).
      const Millis delay = std::max(
          internal::FullJitterBackoff(c.attempts, options_.backoff_initial, options_.backoff_max),
          Millis(err.retry_after_ms()));
      CONVERGE_ASSIGN_OR_RETURN(
          int64_t n,
          tx.Exec("UPDATE effects SET next_attempt_at = $1, last_error = $2, "
                  "claim_token = NULL, updated_at = $3 "
                  "WHERE effect_key = $4 AND state = 'pending' AND claim_token = $5",
                  now + delay.count(), error, now, c.key, token));
      if (n == 1) recorded = Recorded::kRetry;
      return OkStatus();
    }
    CONVERGE_ASSIGN_OR_RETURN(
        int64_t n,
        tx.Exec("UPDATE effects SET state = 'failed', last_error = $1, claim_token = NULL, "
                "updated_at = $2 "
                "WHERE effect_key = $3 AND state = 'pending' AND claim_token = $4",
                error, now, c.key, token));
    // Only the runner whose transition happened parks: otherwise a stale runner would
    // park a dead letter for an effect the journal records as done (or parked already).
    if (n != 1) return OkStatus();
    recorded = Recorded::kFailed;
    DeadLetter d;
    d.consumer = std::string(kEffectQueuePrefix) + options_.kind;
    d.queue = d.consumer;
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
    return StatusOf(DeadLetters::Park(tx, d));
  }));
  std::lock_guard<std::mutex> l(stats_mu_);
  switch (recorded) {
    case Recorded::kLost: ++stats_.lost_claims; break;
    case Recorded::kDone: ++stats_.executed; break;
    case Recorded::kRetry: ++stats_.retries; break;
    case Recorded::kFailed: ++stats_.failed; break;
  }
  if (!error.empty() && recorded != Recorded::kLost) stats_.last_error = error;
  return OkStatus();
}

void EffectRunner::Start() {
  if (worker_.running()) return;
  listener_ = db_.AddListener("converge_effects:" + options_.kind, [this] { wakeup_.Notify(); });
  worker_.Start();
}

void EffectRunner::Stop() {
  if (!worker_.running()) return;
  db_.RemoveListener(listener_);
  worker_.Stop();
}

EffectStats EffectRunner::stats() const {
  std::lock_guard<std::mutex> l(stats_mu_);
  return stats_;
}

}  // namespace converge
