// Journalled external effects: what a handler cannot do inside its transaction (send an
// email, call a payment provider) is recorded as an intent in that transaction, executed
// afterwards outside any transaction with a deterministic key, and its result recorded.
// See docs/design/consumer-inbox.md ("External effects").
//
//   consumer handler, in its Tx:   runner.Record(tx, {"receipt:pay_1", payload})
//   EffectRunner, later:           claim due intents (lease + claim token), then per intent:
//                                  re-check and renew the claim -> executor(key, payload)
//                                  -> record result | retry with backoff | dead letter
//
// The key is the effect's identity at the provider (Idempotency-Key): a crash between the
// call and the recorded result re-executes with the same key once the claim lease runs
// out, and the provider answers with the first result instead of acting twice. Transient
// errors retry with exponential backoff and full jitter (never sooner than the error's
// retry_after_ms(), e.g. a callee's Retry-After); permanent errors and exhausted
// attempts park a dead letter (queue "effect:<kind>"); EffectRequeuer, routed for the
// prefix kEffectQueuePrefix in DeadLetters, re-opens the intent when it is replayed.
// Every claim counts as an attempt, so a call that kills its process each time (or
// outlasts the lease each time) is not called again past max_attempts: its next claim
// parks it uncalled ("exhausted"), where it would otherwise be retried for ever. A call
// still running past its lease at that point may succeed after the park: its outcome is
// dropped (the claim is no longer its) and the journal says failed; the letter's replay
// calls again with the same key, which the provider answers with its first result.
//
// Invariant: every call runs under a claim that is this runner's own and valid when the
// call starts. A claim writes a fresh claim token; right before each call the runner renews
// the lease only where the intent is still pending under its token, and skips the call
// when it is not (its lease lapsed and another runner claimed the intent, maybe finished
// it). Every outcome write is conditional on the same token, and a dead letter is parked
// only when this runner's `failed` transition changed the row. So a runner that stalled
// past its lease neither repeats a call it lost nor parks an effect recorded as done. The
// one window left is a single call that outlives its own lease; the key covers it.
//
// Order per subject: an intent recorded with a subject is not claimed while an earlier
// intent of the same kind and subject (recorded, and committed, before it) is pending -
// waiting for its first attempt, claimed, or backing off after a transient failure. So
// intents of one subject execute one at a time, in the order they were recorded, and a
// failing one holds the later ones back until it succeeds. One that fails for good (a
// dead letter) stops holding them back; replayed, it is pending again and holds back the
// ones recorded after it that have not run yet (a later one claimed but not yet called is
// put back, right before its call), and it waits while a later one is being called: one
// call of a subject at a time, even across a replay. Intents without a subject are
// unordered.
//
// Failpoints: effects.before_call (before each claim check and call),
// effects.after_call_before_record (after a call, before its outcome is written).
//
// Thread safety: Record is safe from any thread; RunOnce must not run concurrently with
// itself on one runner; Start/Stop from one owner thread. Runners of one kind may run in
// many threads and processes on one store. EffectRequeuer is safe from any thread.
#ifndef CONVERGE_EFFECTS_H_
#define CONVERGE_EFFECTS_H_

#include <atomic>
#include <chrono>
#include <functional>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>

#include "converge/clock.h"
#include "converge/database.h"
#include "converge/dead_letters.h"
#include "converge/status.h"
#include "converge/worker.h"

namespace converge {

// The queue of an effect's dead letter is this prefix and the effect's kind.
inline constexpr std::string_view kEffectQueuePrefix = "effect:";

// Replays an effect's dead letter: re-opens the failed intent (pending, attempts from 0,
// due now) in the replay's transaction and notifies the runners of its kind (Tx::Notify;
// where the store has no notifications they find it on their next poll). A runner then
// executes it again with the same key, so a provider that had in fact acted answers with
// its first result. An intent that is no longer failed (done, or swept) is left alone.
// Route it in DeadLetters for kEffectQueuePrefix; it needs no runner in this process.
class EffectRequeuer : public Requeuer {
 public:
  // `clock` (nullptr = Clock::System()) must outlive this object.
  explicit EffectRequeuer(Clock* clock = nullptr);
  Status Requeue(Tx& tx, const DeadLetter& letter) override;

 private:
  Clock* clock_;
};

struct EffectRunnerOptions {
  std::string kind;  // required: which intents this runner executes, e.g. "email.receipt"
  int max_attempts = 8;
  Millis backoff_initial = std::chrono::milliseconds(200);
  Millis backoff_max = std::chrono::seconds(60);
  Millis lease = std::chrono::seconds(30);  // a claimed intent is retried after this
  size_t batch = 16;
  Millis poll = std::chrono::seconds(1);
};

struct EffectStats {
  int64_t executed = 0;  // succeeded and recorded
  int64_t retries = 0;
  int64_t failed = 0;  // parked as dead letters
  // Calls skipped, or outcomes dropped, because another runner had claimed the intent
  // since this one did (its lease had lapsed).
  int64_t lost_claims = 0;
  // Claimed calls put back because an earlier intent of their subject was pending again
  // (replayed) when their turn came.
  int64_t deferred = 0;
  std::string last_error;
};

class EffectRunner {
 public:
  // Runs the effect for `key`; returns a result to record (e.g. the provider's id).
  using Executor = std::function<Result<std::string>(const std::string& key,
                                                     const std::string& payload)>;

  // Everything passed must outlive the runner. clock nullptr = Clock::System().
  EffectRunner(Database& db, EffectRunnerOptions options, Executor executor,
               Clock* clock = nullptr);
  ~EffectRunner();

  // Records the intent through `tx` (it commits with the caller's effects). Recording the
  // same key again is a no-op; returns whether this call created it.
  // kInvalidArgument for an empty or oversized key.
  Result<bool> Record(Tx& tx, const std::string& key, const std::string& payload);
  // The same, in order with the other intents of this kind recorded with `subject` (see
  // "Order per subject" above). Serialises the transactions recording for one subject
  // (Tx::LockUntilCommit), so recording order is commit order. An empty subject is no
  // order. A key recorded before keeps its first subject.
  Result<bool> Record(Tx& tx, const std::string& key, const std::string& payload,
                      std::string_view subject);

  // Claims due intents, executes them one by one, each under a re-checked claim, and
  // records each outcome right after its call. Returns how many intents it claimed
  // (calls skipped because their claim was lost included). A store error stops the batch
  // and is returned; the intents not yet recorded run again after their lease.
  Result<size_t> RunOnce();
  void Start();
  void Stop();
  EffectStats stats() const;
  const std::string& kind() const { return options_.kind; }
  Wakeup& wakeup() { return wakeup_; }

 private:
  struct Claim;  // one claimed intent (effects.cc)
  // Writes one call's outcome under `token` and parks a dead letter when it failed for
  // good; changes nothing when the claim was lost.
  Status RecordOutcome(const Claim& c, const std::string& token,
                       const Result<std::string>& outcome);

  Database& db_;
  const EffectRunnerOptions options_;
  Executor executor_;
  Clock* clock_;
  Wakeup wakeup_;
  int64_t listener_ = 0;
  mutable std::mutex stats_mu_;
  EffectStats stats_;
  PollingWorker worker_;  // last: stopped and destroyed before what its passes use
};

}  // namespace converge

#endif  // CONVERGE_EFFECTS_H_
