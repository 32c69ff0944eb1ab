// Sagas: orchestrated process managers with explicit, persisted compensations. No
// distributed transaction is pretended: a saga is an ordered list of steps, each with an
// action and a compensation that undoes the action with a new effect. See
// docs/design/sagas.md.
//
//   SagaDefinition checkout{"checkout", {
//       {"reserve", {.local = Reserve}, {.local = Release}},
//       {"capture", {.call = Capture, .local = NoteCapture}, {.call = Refund}},
//       {"ship",    {.call = Ship}, {}}}};
//   SagaRunner& runner = runtime.AddSaga(checkout);
//   // in the request's transaction, next to the order row:
//   runner.Begin(tx, order_id, R"({"sku":"A","qty":1})");
//
// A step's action (and compensation) has two optional parts: `call`, an external call run
// outside any transaction, and `local`, writes run in the transaction that records the
// step. The runner, per step:
//   1. in one transaction: checks its fence and renews its lease on the saga, and records
//      the call's intent in the effects journal under the step's deterministic key
//      "<type>:<saga id>:<step>:action" (or ":compensation"), claimed by the saga's fence;
//      a call the journal records as done is not made again, its result is reused;
//   2. outside: call(ctx) with ctx.key passed to the external system as its idempotency
//      key;
//   3. in one transaction, again under the fence: the journal's result, local(tx, ctx,
//      result), a step-log row and the saga's next position (saga_instances). A crash
//      anywhere before this commits re-runs the step from 1 with the same key.
//
// Failures (status.h decides): a transient error retries the action with backoff, at most
// policy.max_attempts times and not past the step's deadline; a permanent error, or
// attempts or deadline exhausted, turns the saga to compensating. A permanent error means
// the action did nothing, so compensation starts at the step before it — unless an earlier
// attempt's outcome is unknown (a transient error, or a crash after the journalled intent);
// an exhausted step may have acted (a timeout is an unknown outcome), so its own
// compensation runs first — compensations must therefore treat "nothing to undo" as
// success. Compensations run in
// reverse order and are retried on transient errors until they succeed; a permanent one
// parks the saga as failed_to_compensate with a dead letter (queue "saga:<type>", event id
// = saga id) and counts in SagaStats::parked (metric converge_sagas_parked_total).
// Every start of a step counts until the saga records an outcome: a step that ends its
// runner each time (a crash, an OOM kill, a stall past the lease) is not started again
// after policy.max_unsettled_starts such starts, but fails as exhausted: an action
// compensates, itself included, and a compensation parks the saga with a dead letter of
// class "unsettled".
//
// Ownership: a runner claims a due saga with a fence from Tx::NextFence() and a lease;
// every write it makes is conditional on that fence, so of two runners (threads or
// processes) only the one holding the latest fence can move a saga, and a runner stalled
// past its lease writes nothing after another took over. If its action call returns after
// the takeover ran (or passed over) that step's compensation, it sends the saga back to
// compensating at that step (SagaStats::late_calls), so the compensation runs again after
// the call; a call in flight cannot be recalled (docs/design/sagas.md, the lease window).
// If the saga was settled and swept meanwhile, the call is parked as a dead letter for a
// person instead (kSagaLateCallAfterSweep, SagaStats::late_calls_after_sweep).
//
// Failpoints: saga.before_call (before each external call), saga.after_call_before_record
// (after it, before its transaction), saga.before_local (in that transaction, before the
// local part: an error fails the local part), saga.after_step (after a step's transaction
// committed), saga.before_reopen_commit (a late call's reopen, written, not yet committed).
//
// Thread safety: Begin, Load and List are safe from any thread; RunOnce must not run
// concurrently with itself on one runner; Start/Stop from one owner thread. Runners of one
// type may run in many threads and processes on one store.
#ifndef CONVERGE_SAGA_H_
#define CONVERGE_SAGA_H_

#include <chrono>
#include <atomic>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "converge/clock.h"
#include "converge/database.h"
#include "converge/dead_letters.h"
#include "converge/status.h"
#include "converge/worker.h"

namespace converge {

// The queue of a saga's dead letter is this prefix and the saga's type.
inline constexpr std::string_view kSagaQueuePrefix = "saga:";

// The error class of the dead letter a late action call writes when it returns after its
// saga was settled and swept (SagaStats::late_calls_after_sweep): nothing can compensate
// it any more, a person must undo it. Its envelope is JSON naming the saga, the step, the
// effect key and the call's outcome. SagaRequeuer refuses to replay it; discard it once
// the call is undone.
inline constexpr std::string_view kSagaLateCallAfterSweep = "saga-late-call-after-sweep";

// The states of saga_instances.state.
namespace saga_state {
inline constexpr std::string_view kRunning = "running";
inline constexpr std::string_view kCompensating = "compensating";
inline constexpr std::string_view kCompleted = "completed";
inline constexpr std::string_view kCompensated = "compensated";
inline constexpr std::string_view kFailedToCompensate = "failed_to_compensate";
// Whether `state` is one of the above.
bool Known(std::string_view state);
}  // namespace saga_state

// What an action or a compensation sees.
struct SagaStepContext {
  std::string saga_id;
  std::string type;
  std::string step;
  bool compensation = false;
  // "<type>:<saga id>:<step>:action" or ":compensation": pass it to the external system
  // as the idempotency key; a re-run (retry, crash, takeover) passes the same key.
  std::string key;
  int64_t fence = 0;  // the runner's fencing token on this saga
  int attempt = 1;    // 1 for the first attempt of this action or compensation
  // When this runner's lease on the saga ends (the lease_until its claim wrote, in steady
  // time as of just before the call, a millisecond short). Past it another runner may
  // start the same step, so a call that makes several requests starts none that could
  // end past it and answers a transient error instead: the next attempt goes on from what
  // is done. The lease is measured by the runner's Clock: a wall clock stepped backwards
  // between runners' hosts moves when another may take over, and this does not follow.
  std::chrono::steady_clock::time_point lease_deadline;
  // The saga's data (JSON text by convention). `local` may replace it; the new value is
  // stored with the step.
  std::string data;
};

struct SagaAction {
  // The external call, outside any transaction; its result is stored in the journal and
  // handed to `local`. Empty: no external call.
  std::function<Result<std::string>(const SagaStepContext&)> call;
  // Local writes, in the transaction that records the step. An error rolls them back and
  // counts as the step's failure (transient or permanent by its code). Empty: none. It
  // may run more than once (Database::Transact); each run gets a fresh context.
  std::function<Status(Tx&, SagaStepContext&, const std::string& call_result)> local;
};

struct SagaStepPolicy {
  int max_attempts = 5;  // of the action, on transient errors; at least 1
  Millis backoff_initial = std::chrono::milliseconds(100);
  Millis backoff_max = std::chrono::seconds(30);
  // The step fails when it has not succeeded this long after it started; 0 = no deadline.
  Millis deadline = Millis(0);
  // Attempts of the compensation on transient errors before it is parked; 0 = retry until
  // it succeeds.
  int max_compensation_attempts = 0;
  // Starts in a row of the action or a compensation that ended without any outcome
  // recorded (the runner died, or outlasted its lease, each time) before the step is not
  // started again but fails as exhausted: an action compensates, itself included, and a
  // compensation parks the saga ("unsettled"). 0 = no limit (such a step then runs for
  // ever). Generous: a takeover after a stall counts too.
  int max_unsettled_starts = 10;
};

struct SagaStep {
  std::string name;  // unique within the definition; part of the effect keys
  SagaAction action;
  SagaAction compensation;  // empty = nothing to undo
  SagaStepPolicy policy;
};

struct SagaDefinition {
  std::string type;  // e.g. "checkout"
  std::vector<SagaStep> steps;
};

struct SagaRunnerOptions {
  Millis lease = std::chrono::seconds(30);  // a claimed saga is taken over after this
  Millis poll = std::chrono::seconds(1);
  size_t batch = 16;
};

struct SagaStats {
  int64_t steps = 0;        // actions and compensations that succeeded and were recorded
  int64_t retries = 0;      // transient failures scheduled for another attempt
  int64_t completed = 0;    // sagas that finished every step
  int64_t compensated = 0;  // sagas whose completed steps were all compensated
  int64_t parked = 0;       // sagas parked as failed_to_compensate (alert on this)
  // Steps whose outcome was dropped because another runner had taken the saga over.
  int64_t lost_fences = 0;
  // Action calls that returned after their runner had lost the saga, after the step's
  // compensation had run or been passed over: the compensation was made to run again.
  int64_t late_calls = 0;
  // Of those, calls whose saga had been settled and swept meanwhile: nothing compensates
  // them; each left a dead letter (kSagaLateCallAfterSweep). Alert on any.
  int64_t late_calls_after_sweep = 0;
  std::string last_error;
};

// One row of the step log.
struct SagaStepRecord {
  int64_t seq = 0;
  std::string step;
  std::string phase;    // "action" | "compensation"
  std::string outcome;  // "done" | "retry" | "failed"
  int attempt = 0;
  std::string result, error;
  int64_t fence = 0, at = 0;
};

struct SagaInstance {
  std::string saga_id, type, state;
  int step = 0;  // running: the next action; compensating: the next compensation
  std::string data, error;
  int64_t version = 0, created_at = 0, updated_at = 0;
  std::vector<SagaStepRecord> history;  // Load only, in order
};

class SagaRunner {
 public:
  // `db` and `clock` (nullptr = Clock::System()) must outlive the runner.
  SagaRunner(Database& db, SagaDefinition definition, SagaRunnerOptions options = {},
             Clock* clock = nullptr);
  ~SagaRunner();
  SagaRunner(const SagaRunner&) = delete;
  SagaRunner& operator=(const SagaRunner&) = delete;

  // kInvalidArgument naming what is wrong: no type or steps, a ':' in the type or a step
  // name (it separates the parts of effect keys), an empty or repeated step name,
  // max_attempts < 1, a negative duration, a zero lease.
  Status Validate() const;

  // Starts a saga through `tx` (it commits with the caller's writes). Starting the same id
  // again is a no-op; returns whether this call created it. kInvalidArgument for an empty
  // or oversized id.
  Result<bool> Begin(Tx& tx, const std::string& saga_id, const std::string& data);

  // Claims due sagas of this type and drives each until it ends, waits for a retry, or is
  // taken over. Returns how many it claimed. A store error stops the pass and is returned;
  // the sagas not finished are taken over after their lease.
  Result<size_t> RunOnce();
  void Start();
  void Stop();
  SagaStats stats() const;
  const SagaDefinition& definition() const { return definition_; }
  Wakeup& wakeup() { return wakeup_; }

  // The saga `saga_id` with its step log; nullopt when there is none.
  static Result<std::optional<SagaInstance>> Load(Tx& tx, const std::string& saga_id);
  // Sagas (without history), newest first; `state` empty = every state, else one of
  // saga_state (kInvalidArgument otherwise); `type` empty = every type.
  static Result<std::vector<SagaInstance>> List(Tx& tx, std::string_view state,
                                                std::string_view type = {}, int64_t limit = 100);

 private:
  struct Position;
  enum class Drive { kDone, kStop, kLost };  // kDone: drive on; kStop: wait or ended
  // Runs the saga's next action or compensation under `fence`.
  Result<Drive> Step(const std::string& saga_id, int64_t fence);
  // A step's outcome was dropped: `fence` lost the saga. `late`: the action's call was
  // made under it and may have acted (`succeeded` with `result`, or an unknown outcome);
  // if the step's compensation already ran or was passed over, it is made to run again.
  Result<Drive> Lost(const Position& p, int64_t fence, bool late, bool succeeded,
                     const std::string& result, const std::string& error);
  // A compensation call this runner made under `fence` succeeded with `result`, and its
  // record was fenced out: journals the result for the runner that takes over, so that
  // it is not called again, unless a reopen has since released the intent (Lost).
  void JournalFencedOutCompensation(const std::string& key, int64_t fence,
                                    const std::string& result);
  // The saga of a late call was swept: parks a dead letter naming the call through `tx`.
  Status ParkLateCallAfterSweep(Tx& tx, const Position& p, int64_t fence, bool succeeded,
                                const std::string& result, const std::string& error);
  Status Finish(Tx& tx, const Position& p, int64_t fence, std::string_view state,
                std::string_view phase, std::string_view outcome, const std::string& result,
                const std::string& error, int next_step, const std::string& data);
  void Count(int64_t SagaStats::*field, const std::string& error = {});
  // Runs `write`, a transaction that records what a call this runner just made did, until
  // it commits or fails for good (fenced included): a transient store error is retried
  // with backoff, since nobody else knows the call's outcome. Gives up only when Stop()
  // was called, as a crash would.
  Status UntilRecorded(const std::function<Status()>& write);

  Database& db_;
  const SagaDefinition definition_;
  const SagaRunnerOptions options_;
  Clock* clock_;
  Wakeup wakeup_;
  int64_t listener_ = 0;
  std::atomic<bool> stopping_{false};
  mutable std::mutex stats_mu_;
  SagaStats stats_;
  PollingWorker worker_;  // last: stopped and destroyed before what its passes use
};

// Replays a saga's dead letter: a saga parked as failed_to_compensate goes back to
// compensating at the compensation that failed, with its attempts reset, and the runners
// of its type are notified. Route it in DeadLetters for kSagaQueuePrefix. A letter of
// class kSagaLateCallAfterSweep has no saga to go back to: kFailedPrecondition (it stays
// parked until discarded).
class SagaRequeuer : public Requeuer {
 public:
  explicit SagaRequeuer(Clock* clock = nullptr);
  Status Requeue(Tx& tx, const DeadLetter& letter) override;

 private:
  Clock* clock_;
};

}  // namespace converge

#endif  // CONVERGE_SAGA_H_
