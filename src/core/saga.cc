// The saga runner: claims, one step per transaction, compensations, parking.
//
// Method: a claim transaction picks due sagas of one type (running or compensating, lease
// lapsed, next attempt due), draws one fence from Tx::NextFence() and writes it with a
// lease on each. The runner then drives each saga step by step. Every step is two
// transactions around an optional external call. The first re-checks the fence (renewing
// the lease: on PostgreSQL the row lock also orders it against a concurrent takeover) and
// journals the call's intent under the step's deterministic key, claimed with the fence;
// a journal that already holds a result for that key spares the call. The second, again
// fenced, records the journal's result, runs the step's local writes, appends the step
// log row and moves the saga; so local effects and the saga's position commit together,
// and a crash before it commits re-runs the step with the same key. A failed step is also
// recorded in one fenced transaction: a retry (backoff, lease released so any runner may
// pick it up when due), the turn to compensating, or, for a compensation that failed for
// good, the park with its dead letter. A runner whose fence was replaced changes nothing:
// its write finds another fence and it stops driving that saga.
#include "converge/saga.h"

#include <set>
#include <thread>

#include <nlohmann/json.hpp>

#include "converge/failpoint.h"
#include "src/core/backoff.h"
#include "src/core/validate.h"

namespace converge {

namespace {

constexpr std::string_view kActive = "state IN ('running', 'compensating')";

std::string Channel(std::string_view type) { return "converge_sagas:" + std::string(type); }

// The effect key of a step's call: the same on every re-run of the step.
std::string StepKey(const std::string& type, const std::string& saga_id,
                    const std::string& step, bool compensation) {
  return type + ":" + saga_id + ":" + step + (compensation ? ":compensation" : ":action");
}

Status Fenced(const std::string& saga_id) {
  return Status(StatusCode::kFailedPrecondition,
                "saga " + saga_id + " was taken over by another runner", reason::kFenced);
}

bool IsFenced(const Status& s) { return s.reason() == reason::kFenced; }

SagaInstance InstanceOf(const Row& r) {
  SagaInstance s;
  s.saga_id = r.Text(0);
  s.type = r.Text(1);
  s.state = r.Text(2);
  s.step = static_cast<int>(r.Int(3));
  s.data = r.Text(4);
  s.error = r.Text(5);
  s.version = r.Int(6);
  s.created_at = r.Int(7);
  s.updated_at = r.Int(8);
  return s;
}

constexpr std::string_view kInstanceColumns =
    "saga_id, type, state, step, data, error, version, created_at, updated_at";

}  // namespace

bool saga_state::Known(std::string_view state) {
  return state == kRunning || state == kCompensating || state == kCompleted ||
         state == kCompensated || state == kFailedToCompensate;
}

// Where a claimed saga stands, as read under its fence.
struct SagaRunner::Position {
  std::string saga_id;
  bool compensating = false;
  int step = 0;
  int attempts = 0;
  // Starts of this step, this one included, since the saga last recorded an outcome:
  // more than one means an earlier start ended without one (its runner died or stalled).
  int unsettled_starts = 0;
  std::string data;
  int64_t step_started_at = 0;
  int64_t version = 0;
  // An earlier attempt of this step's call left its outcome unknown (a transient error,
  // or a crash between the journalled intent and the record): the call may have acted.
  bool maybe_acted = false;
};

SagaRunner::SagaRunner(Database& db, SagaDefinition definition, SagaRunnerOptions options,
                       Clock* clock)
    : db_(db),
      definition_(std::move(definition)),
      options_(options),
      clock_(clock ? clock : Clock::System()),
      worker_(
          "saga " + definition_.type, options_.poll,
          [this] {
            Result<size_t> r = RunOnce();
            return r && *r >= options_.batch;
          },
          &wakeup_) {}

SagaRunner::~SagaRunner() { Stop(); }

Status SagaRunner::Validate() const {
  const std::string what = "saga '" + definition_.type + "': ";
  CONVERGE_RETURN_IF_ERROR(internal::ValidateToken("saga type", definition_.type, 64));
  // Effect keys are "<type>:<saga id>:<step>:<phase>": with no ':' in the type and the
  // step names, the saga id (which may hold ':') is what lies between, and two sagas'
  // keys never meet (type "order", id "s:x" and type "order:s", id "x" would).
  if (definition_.type.find(':') != std::string::npos) {
    return InvalidArgumentError(what + "the type must not contain ':'");
  }
  if (definition_.steps.empty()) return InvalidArgumentError(what + "has no steps");
  std::set<std::string> names;
  for (const SagaStep& s : definition_.steps) {
    if (s.name.empty()) return InvalidArgumentError(what + "a step has no name");
    if (s.name.find(':') != std::string::npos) {
      return InvalidArgumentError(what + "step '" + s.name + "': a name must not contain ':'");
    }
    if (!names.insert(s.name).second) {
      return InvalidArgumentError(what + "step '" + s.name + "' is defined twice");
    }
    const SagaStepPolicy& p = s.policy;
    if (p.max_attempts < 1) {
      return InvalidArgumentError(what + "step '" + s.name + "': max_attempts must be >= 1");
    }
    if (p.max_compensation_attempts < 0 || p.max_unsettled_starts < 0 ||
        p.backoff_initial < Millis(0) ||
        p.backoff_max < Millis(0) || p.deadline < Millis(0)) {
      return InvalidArgumentError(what + "step '" + s.name +
                                  "': durations and attempts must not be negative");
    }
  }
  if (options_.lease <= Millis(0) || options_.batch < 1) {
    return InvalidArgumentError(what + "lease must be positive and batch >= 1");
  }
  return OkStatus();
}

Result<bool> SagaRunner::Begin(Tx& tx, const std::string& saga_id, const std::string& data) {
  CONVERGE_RETURN_IF_ERROR(internal::ValidateToken("saga id", saga_id, 128));
  const int64_t now = clock_->NowMillis();
  const Millis deadline =
      definition_.steps.empty() ? Millis(0) : definition_.steps[0].policy.deadline;
  const Value deadline_at = deadline > Millis(0) ? Value(now + deadline.count()) : Value();
  CONVERGE_ASSIGN_OR_RETURN(
      int64_t n,
      tx.Exec("INSERT INTO saga_instances (saga_id, type, state, step, data, version, "
              "attempts, step_started_at, deadline, next_attempt_at, lease_until, fence, "
              "created_at, updated_at) "
              "VALUES ($1, $2, 'running', 0, $3, 0, 0, $4, $5, $4, 0, 0, $4, $4) "
              "ON CONFLICT (saga_id) DO NOTHING",
              saga_id, definition_.type, data, now, deadline_at));
  if (n == 1) {
    tx.OnCommit([this] { wakeup_.Notify(); });
    CONVERGE_RETURN_IF_ERROR(tx.Notify(Channel(definition_.type)));
  }
  return n == 1;
}

Result<size_t> SagaRunner::RunOnce() {
  CONVERGE_RETURN_IF_ERROR(Validate());
  std::vector<std::string> claimed;
  int64_t fence = 0;
  CONVERGE_RETURN_IF_ERROR(db_.Transact([&](Tx& tx) -> Status {
    claimed.clear();
    const int64_t now = clock_->NowMillis();
    const std::string due =
        std::string(kActive) + " AND lease_until <= $1 AND next_attempt_at <= $1";
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows, tx.Query("SELECT saga_id FROM saga_instances WHERE type = $2 AND " + due +
                                " ORDER BY next_attempt_at LIMIT $3" +
                                std::string(tx.dialect().ForUpdateSkipLocked()),
                            now, definition_.type, static_cast<int64_t>(options_.batch)));
    if (rows.empty()) return OkStatus();
    CONVERGE_ASSIGN_OR_RETURN(fence, tx.NextFence());
    for (const Row& r : rows) {
      // The conditions again: a row another runner claimed meanwhile is left alone.
      CONVERGE_ASSIGN_OR_RETURN(int64_t n,
                                tx.Exec("UPDATE saga_instances SET fence = $2, lease_until = $3 "
                                        "WHERE saga_id = $4 AND " +
                                            due,
                                        now, fence, now + options_.lease.count(), r.Text(0)));
      if (n == 1) claimed.push_back(r.Text(0));
    }
    return OkStatus();
  }));
  // A saga that cannot be driven now (a store error, a changed definition) does not hold
  // back the others claimed with it: they are driven, and the first error is returned.
  Status first_error;
  for (const std::string& id : claimed) {
    for (;;) {
      Result<Drive> d = Step(id, fence);
      if (!d) {
        Count(nullptr, d.error().ToString());
        if (first_error.ok()) first_error = d.error();
        break;
      }
      if (*d == Drive::kLost) break;
      CONVERGE_RETURN_IF_ERROR(failpoint::Hit("saga.after_step"));
      if (*d != Drive::kDone) break;
    }
  }
  if (!first_error.ok()) return tl::unexpected(first_error);
  return claimed.size();
}

Result<SagaRunner::Drive> SagaRunner::Step(const std::string& saga_id, int64_t fence) {
  const int steps = static_cast<int>(definition_.steps.size());
  const std::string fence_text = std::to_string(fence);
  Position p;
  bool ours = false;
  std::optional<std::string> journalled;  // the call's result, when the journal has it
  int64_t lease_until = 0;  // what the claim wrote, in the clock's milliseconds
  CONVERGE_RETURN_IF_ERROR(db_.Transact([&](Tx& tx) -> Status {
    ours = false;
    journalled.reset();
    p.maybe_acted = false;
    const int64_t now = clock_->NowMillis();
    lease_until = now + options_.lease.count();
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows,
        tx.Query("UPDATE saga_instances SET lease_until = $1, "
                 "unsettled_starts = unsettled_starts + 1 WHERE saga_id = $2 AND fence = $3 "
                 "AND " +
                     std::string(kActive) +
                     " RETURNING state, step, attempts, data, step_started_at, version, "
                     "unsettled_starts",
                 lease_until, saga_id, fence));
    if (rows.empty()) return OkStatus();
    ours = true;
    p.saga_id = saga_id;
    p.compensating = rows[0].Text(0) == saga_state::kCompensating;
    p.step = static_cast<int>(rows[0].Int(1));
    p.attempts = static_cast<int>(rows[0].Int(2));
    p.data = rows[0].Text(3);
    p.step_started_at = rows[0].Int(4);
    p.version = rows[0].Int(5);
    p.unsettled_starts = static_cast<int>(rows[0].Int(6));
    if (p.step < 0 || p.step >= steps) {
      return FailedPreconditionError("saga " + saga_id + " is at step " + std::to_string(p.step) +
                                     " of " + std::to_string(steps) +
                                     ": its definition changed under it");
    }
    const SagaStep& s = definition_.steps[static_cast<size_t>(p.step)];
    if (!(p.compensating ? s.compensation : s.action).call) return OkStatus();
    // An intent still pending from an earlier attempt is an outcome nobody learnt: that
    // attempt's call may have acted, whatever this one answers.
    const std::string key = StepKey(definition_.type, saga_id, s.name, p.compensating);
    CONVERGE_ASSIGN_OR_RETURN(
        Rows fx, tx.Query("SELECT state, result FROM effects WHERE effect_key = $1", key));
    if (!fx.empty() && fx[0].Text(0) == "done") {
      journalled = fx[0].Text(1);
      return OkStatus();  // a call already done is not repeated
    }
    p.maybe_acted = !fx.empty() && fx[0].Text(0) == "pending";
    // The intent, claimed with our fence; one that failed before (a replayed compensation)
    // is pending again. The row names its saga: it lives as long as the saga (sweeper.h).
    return StatusOf(tx.Exec(
        "INSERT INTO effects (effect_key, kind, payload, state, attempts, next_attempt_at, "
        "created_at, updated_at, claim_token, saga_id) "
        "VALUES ($1, $2, $3, 'pending', 1, $4, $4, $4, $5, $6) "
        "ON CONFLICT (effect_key) DO UPDATE SET state = 'pending', "
        "claim_token = excluded.claim_token, attempts = effects.attempts + 1, "
        "saga_id = excluded.saga_id, updated_at = excluded.updated_at "
        "WHERE effects.state <> 'done'",
        key, std::string(kSagaQueuePrefix) + definition_.type, p.data, now, fence_text, saga_id));
  }));
  if (!ours) {
    Count(&SagaStats::lost_fences);
    return Drive::kLost;
  }

  const SagaStep& s = definition_.steps[static_cast<size_t>(p.step)];
  const SagaAction& act = p.compensating ? s.compensation : s.action;
  SagaStepContext ctx;
  ctx.saga_id = saga_id;
  ctx.type = definition_.type;
  ctx.step = s.name;
  ctx.compensation = p.compensating;
  ctx.key = StepKey(definition_.type, saga_id, s.name, p.compensating);
  ctx.fence = fence;
  ctx.attempt = p.attempts + 1;
  // The lease's end in steady time, from the clock's now: a millisecond short, for the
  // clock's truncation to whole milliseconds. The steady clock is read first: time
  // passing between the two reads moves the deadline earlier, never later (as one
  // expression, the order of the two reads was the compiler's).
  const auto steady_now = std::chrono::steady_clock::now();
  const int64_t clock_now = clock_->NowMillis();
  ctx.lease_deadline = steady_now + Millis(lease_until - clock_now - 1);
  ctx.data = p.data;
  const std::string_view phase = p.compensating ? "compensation" : "action";

  const int64_t started = clock_->NowMillis();
  const bool past_deadline = !p.compensating && s.policy.deadline > Millis(0) &&
                             started >= p.step_started_at + s.policy.deadline.count();
  Status failure;
  std::string result;
  bool call_done = journalled.has_value();  // the external call succeeded
  bool called = false;                      // this runner made the call, now
  // Every start counts, and only a recorded outcome resets the count: a step that ends
  // its runner each time (a crash in its call or local part) is not started again past
  // its limit, but fails as exhausted (it may have acted): an action then compensates,
  // a compensation parks. Otherwise it would be claimed again after every lease, for ever.
  const int start_limit = s.policy.max_unsettled_starts;
  const bool unsettled = start_limit > 0 && p.unsettled_starts > start_limit;
  if (unsettled) {
    failure = UnavailableError(
        std::to_string(p.unsettled_starts - 1) + " starts of the " +
        (p.compensating ? "compensation" : "action") + " of step '" + s.name +
        "' ended without an outcome (the runner died or outlasted its lease each time); "
        "not started again");
  } else if (past_deadline) {
    failure = DeadlineExceededError("step '" + s.name + "' passed its deadline");
  } else if (act.call && !journalled) {
    CONVERGE_RETURN_IF_ERROR(failpoint::Hit("saga.before_call"));
    called = true;
    Result<std::string> out = std::string();
    try {
      out = act.call(ctx);
    } catch (const std::exception& e) {
      out = tl::unexpected(InternalError(std::string("saga call threw: ") + e.what()));
    } catch (...) {
      out = tl::unexpected(InternalError("saga call threw a non-standard exception"));
    }
    // A crash here repeats the call with the same key once the lease lapses.
    CONVERGE_RETURN_IF_ERROR(failpoint::Hit("saga.after_call_before_record"));
    if (out) {
      result = *out;
      call_done = true;
    } else {
      failure = out.error();
    }
  } else if (journalled) {
    result = *journalled;
  }

  // Success: the journal's result, the local writes, the log and the next position.
  bool terminal = false;
  if (failure.ok()) {
    Status local_status;
    auto record = [&] { return db_.Transact([&](Tx& tx) -> Status {
      local_status = OkStatus();
      const int64_t now = clock_->NowMillis();
      CONVERGE_ASSIGN_OR_RETURN(int64_t n, tx.Exec("UPDATE saga_instances SET lease_until = $1 "
                                                   "WHERE saga_id = $2 AND fence = $3",
                                                   now + options_.lease.count(), saga_id, fence));
      if (n != 1) return Fenced(saga_id);
      if (act.call) {
        CONVERGE_RETURN_IF_ERROR(
            StatusOf(tx.Exec("UPDATE effects SET state = 'done', result = $1, last_error = NULL, "
                             "claim_token = NULL, updated_at = $2 "
                             "WHERE effect_key = $3 AND state = 'pending' AND claim_token = $4",
                             result, now, ctx.key, fence_text)));
      }
      SagaStepContext local_ctx = ctx;
      if (act.local) {
        // A local part that throws failed as a step, permanently: it is not the store's
        // failure, so it must not be retried as one forever.
        try {
          // An injected error here fails the local part as its own error would.
          local_status = failpoint::Hit("saga.before_local");
          if (local_status.ok()) local_status = act.local(tx, local_ctx, result);
        } catch (const std::exception& e) {
          local_status = InternalError(std::string("the step's local part threw: ") + e.what());
        } catch (...) {
          local_status = InternalError("the step's local part threw");
        }
        CONVERGE_RETURN_IF_ERROR(local_status);
      }
      const int next = p.compensating ? p.step - 1 : p.step + 1;
      std::string_view state = p.compensating ? saga_state::kCompensating : saga_state::kRunning;
      if (p.compensating && next < 0) state = saga_state::kCompensated;
      if (!p.compensating && next >= steps) state = saga_state::kCompleted;
      terminal = state == saga_state::kCompensated || state == saga_state::kCompleted;
      return Finish(tx, p, fence, state, phase, "done", result, "", next, local_ctx.data);
    }); };
    // A call made just now is known only here: its record survives store errors. A
    // failing local part is the step's failure (below), not the store's: not retried here.
    Status st = called ? UntilRecorded([&] {
      Status r = record();
      return local_status.ok() ? r : OkStatus();
    }) : record();
    if (!local_status.ok()) st = local_status;
    if (IsFenced(st)) {
      if (called && p.compensating) JournalFencedOutCompensation(ctx.key, fence, result);
      return Lost(p, fence, called && !p.compensating, true, result, "");
    }
    if (st.ok()) {
      Count(&SagaStats::steps);
      if (terminal) {
        Count(p.compensating ? &SagaStats::compensated : &SagaStats::completed);
        return Drive::kStop;
      }
      return Drive::kDone;
    }
    if (local_status.ok()) return tl::unexpected(st);  // the store failed, not the step
    failure = local_status;
  }

  // Failure: retry, turn to compensating, or park.
  const int attempts = p.attempts + 1;
  const bool transient = failure.transient();
  enum class Next { kRetry, kCompensate, kPark } next;
  if (!p.compensating) {
    const int64_t now = clock_->NowMillis();
    const bool deadline_passed =
        s.policy.deadline > Millis(0) && now >= p.step_started_at + s.policy.deadline.count();
    next = transient && attempts < s.policy.max_attempts && !deadline_passed && !unsettled
               ? Next::kRetry
               : Next::kCompensate;
  } else {
    const int max = s.policy.max_compensation_attempts;
    next = transient && (max == 0 || attempts < max) && !unsettled ? Next::kRetry : Next::kPark;
  }
  auto record = [&] { return db_.Transact([&](Tx& tx) -> Status {
    terminal = false;
    const int64_t now = clock_->NowMillis();
    const std::string error = failure.ToString();
    if (act.call && call_done) {
      // The call succeeded and its local part failed: keep the call's result, so a retry
      // (or a replayed compensation) reuses it instead of calling again.
      CONVERGE_RETURN_IF_ERROR(
          StatusOf(tx.Exec("UPDATE effects SET state = 'done', result = $1, claim_token = NULL, "
                           "updated_at = $2 WHERE effect_key = $3 AND state = 'pending' AND "
                           "claim_token = $4",
                           result, now, ctx.key, fence_text)));
    } else if (act.call) {
      CONVERGE_RETURN_IF_ERROR(StatusOf(tx.Exec(
          "UPDATE effects SET state = $1, last_error = $2, claim_token = NULL, updated_at = $3 "
          "WHERE effect_key = $4 AND state = 'pending' AND claim_token = $5",
          next == Next::kRetry ? "pending" : "failed", error, now, ctx.key, fence_text)));
    }
    if (next == Next::kRetry) {
      const Millis delay =
          internal::FullJitterBackoff(attempts, s.policy.backoff_initial, s.policy.backoff_max);
      CONVERGE_ASSIGN_OR_RETURN(
          int64_t n, tx.Exec("UPDATE saga_instances SET attempts = $1, next_attempt_at = $2, "
                             "lease_until = 0, error = $3, version = version + 1, "
                             "unsettled_starts = 0, updated_at = $4 "
                             "WHERE saga_id = $5 AND fence = $6",
                             attempts, now + delay.count(), error, now, saga_id, fence));
      if (n != 1) return Fenced(saga_id);
      return StatusOf(tx.Exec(
          "INSERT INTO saga_steps (saga_id, seq, step, phase, outcome, attempt, result, error, "
          "fence, at) VALUES ($1, $2, $3, $4, 'retry', $5, NULL, $6, $7, $8)",
          saga_id, p.version + 1, s.name, phase, attempts, error, fence, now));
    }
    if (next == Next::kCompensate) {
      // A permanent error from a step whose call did not succeed says the step did
      // nothing: undo the steps before it. A step that may have acted (an exhausted
      // transient error is an unknown outcome; so is an earlier attempt's; a call that
      // succeeded before its local part failed) is undone too.
      const int from = transient || call_done || p.maybe_acted ? p.step : p.step - 1;
      const std::string_view state =
          from < 0 ? saga_state::kCompensated : saga_state::kCompensating;
      terminal = from < 0;
      return Finish(tx, p, fence, state, phase, "failed", "", error, from, p.data);
    }
    // A compensation failed for good: park the saga for an operator, with a dead letter.
    CONVERGE_RETURN_IF_ERROR(Finish(tx, p, fence, saga_state::kFailedToCompensate, phase, "failed",
                                    "", error, p.step, p.data));
    DeadLetter d;
    d.consumer = std::string(kSagaQueuePrefix) + definition_.type;
    d.queue = d.consumer;
    d.event_id = saga_id;
    d.source = "urn:converge:sagas";
    d.type = definition_.type;
    d.envelope = p.data;
    d.error_class = unsettled ? "unsettled" : transient ? "exhausted" : "permanent";
    d.error_code = std::string(StatusCodeName(failure.code()));
    d.error = "compensation of step '" + s.name + "': " + failure.message();
    d.attempts = attempts;
    d.first_failure_at = p.step_started_at;
    d.last_failure_at = now;
    return StatusOf(DeadLetters::Park(tx, d));
  }); };
  Status st = called ? UntilRecorded(record) : record();
  if (IsFenced(st)) {
    // The call may have acted when it succeeded (a local part failed after it) or its
    // outcome is unknown; a permanent error says it did nothing.
    const bool late = called && !p.compensating && (call_done || transient);
    if (called && call_done && p.compensating) {
      JournalFencedOutCompensation(ctx.key, fence, result);
    }
    return Lost(p, fence, late, call_done, result, failure.ToString());
  }
  CONVERGE_RETURN_IF_ERROR(st);
  const std::string error = failure.ToString();
  switch (next) {
    case Next::kRetry:
      Count(&SagaStats::retries, error);
      return Drive::kStop;
    case Next::kCompensate:
      Count(nullptr, error);
      if (terminal) {
        Count(&SagaStats::compensated);
        return Drive::kStop;
      }
      return Drive::kDone;
    case Next::kPark:
      Count(&SagaStats::parked, error);
      return Drive::kStop;
  }
  return Drive::kStop;
}

Result<SagaRunner::Drive> SagaRunner::Lost(const Position& p, int64_t fence, bool late,
                                           bool succeeded, const std::string& result,
                                           const std::string& error) {
  Count(&SagaStats::lost_fences);
  if (!late) return Drive::kLost;
  const SagaStep& s = definition_.steps[static_cast<size_t>(p.step)];
  if (!s.compensation.call && !s.compensation.local) return Drive::kLost;  // nothing to undo
  // Method: this runner's action call returned (it succeeded, or its outcome is unknown)
  // after another runner had taken the saga over. If the takeover has already started,
  // run or passed over this step's compensation, that compensation may have looked for
  // the effect before the call made it: run it again. Our call has returned, so a
  // compensation that starts after this commits finds whatever it did. The saga gets a
  // fence nobody holds (the runner still driving it, if any, is fenced out and its
  // in-flight compensation discarded), goes back to compensating at this step, and the
  // compensation's journal entry is reopened so its call is made again with the same key.
  // One transaction, conditional on the saga's state: on PostgreSQL the UPDATE's row lock
  // orders it against the takeover's own writes.
  const std::string comp_key = StepKey(definition_.type, p.saga_id, s.name, true);
  bool reopened = false, swept = false;
  Status st = UntilRecorded([&] { return db_.Transact([&](Tx& tx) -> Status {
    reopened = swept = false;
    const int64_t now = clock_->NowMillis();
    CONVERGE_ASSIGN_OR_RETURN(int64_t reopen_fence, tx.NextFence());
    const std::string why = "a late " + std::string(succeeded ? "successful " : "") +
                            "call of step '" + s.name + "' by a runner that had lost the saga " +
                            "(fence " + std::to_string(fence) + "): its compensation runs again";
    CONVERGE_ASSIGN_OR_RETURN(
        Rows rows,
        tx.Query("UPDATE saga_instances SET state = CASE WHEN state = 'failed_to_compensate' "
                 "THEN state ELSE 'compensating' END, step = $1, attempts = 0, "
                 "unsettled_starts = 0, "
                 "next_attempt_at = $2, lease_until = 0, fence = $3, version = version + 1, "
                 "error = $4, updated_at = $2 WHERE saga_id = $5 AND (state = 'compensated' OR "
                 "(state IN ('compensating', 'failed_to_compensate') AND step <= $1)) "
                 "RETURNING version",
                 p.step, now, reopen_fence, why, p.saga_id));
    if (rows.empty()) {
      // The saga is still there: its compensation of this step is still ahead and will see
      // what the call did. Or the sweeper deleted it (settled past retention): the sweep
      // locked it first, so this UPDATE waited and found no row (sweeper.cc).
      CONVERGE_ASSIGN_OR_RETURN(
          Rows found, tx.Query("SELECT 1 FROM saga_instances WHERE saga_id = $1", p.saga_id));
      if (!found.empty()) return OkStatus();
      swept = true;
      return ParkLateCallAfterSweep(tx, p, fence, succeeded, result, error);
    }
    reopened = true;
    // The compensation's journal entry: a result is discarded, and an intent still pending
    // is released from the fence it was claimed with, so that the runner whose call it is
    // cannot journal that call's result when it finds itself fenced out: that call may
    // have looked before ours acted (JournalFencedOutCompensation).
    CONVERGE_RETURN_IF_ERROR(StatusOf(
        tx.Exec("UPDATE effects SET state = CASE WHEN state = 'done' THEN 'failed' "
                "ELSE state END, claim_token = NULL, last_error = $1, updated_at = $2 "
                "WHERE effect_key = $3 AND state IN ('done', 'pending')",
                why, now, comp_key)));
    CONVERGE_RETURN_IF_ERROR(StatusOf(tx.Exec(
        "INSERT INTO saga_steps (saga_id, seq, step, phase, outcome, attempt, result, error, "
        "fence, at) VALUES ($1, $2, $3, 'action', $4, $5, $6, $7, $8, $9)",
        p.saga_id, rows[0].Int(0), s.name, succeeded ? "done" : "failed", p.attempts + 1,
        succeeded ? Value(result) : Value(), error.empty() ? why : error + "; " + why, fence,
        now)));
    // A test holds the reopen here, the saga's row locked, to run a sweep against it.
    CONVERGE_RETURN_IF_ERROR(failpoint::Hit("saga.before_reopen_commit"));
    tx.OnCommit([this] { wakeup_.Notify(); });
    return tx.Notify(Channel(definition_.type));
  }); });
  CONVERGE_RETURN_IF_ERROR(st);
  if (reopened) {
    Count(&SagaStats::late_calls,
          "saga " + p.saga_id + ": late call of step '" + s.name + "', compensation reopened");
  }
  if (swept) {
    Count(&SagaStats::late_calls);
    Count(&SagaStats::late_calls_after_sweep,
          "saga " + p.saga_id + ": late call of step '" + s.name +
              "' after the saga was swept: dead letter, undo it by hand");
  }
  return Drive::kLost;
}

// Method: the runner that took the saga over (or the reopen's next round) runs this
// compensation again, and finds our intent still pending: the call may have acted, so it
// calls again with the same key. It need not: our call succeeded. The write is
// conditional on the intent still being ours (claimed with `fence`, pending): a taker
// that claimed it since has its own call under way, and a reopen of this very step
// released it (Lost), because our call may have looked for the effect before the late
// call made it and must be made again. Compensations of other steps are not touched by a
// reopen and keep what we learnt. One attempt: if it fails, the call is repeated with its
// key, as before.
void SagaRunner::JournalFencedOutCompensation(const std::string& key, int64_t fence,
                                              const std::string& result) {
  Status st = db_.Transact([&](Tx& tx) -> Status {
    return StatusOf(tx.Exec(
        "UPDATE effects SET state = 'done', result = $1, last_error = NULL, claim_token = NULL, "
        "updated_at = $2 WHERE effect_key = $3 AND state = 'pending' AND claim_token = $4",
        result, clock_->NowMillis(), key, std::to_string(fence)));
  });
  if (!st.ok()) Count(nullptr, "journal of a fenced-out compensation's result: " + st.ToString());
}

// Method: the saga this late call belongs to was settled and swept, with its step log and
// its journal. Nothing can compensate the call automatically: a saga made again from what
// this runner read would lack the journal (the compensations below this step would call
// again, trusting the provider to still know keys older than the retention), carry stale
// data, and could meet a new saga begun since under the same id (sagas.md, "what is and
// is not guaranteed"). So the call goes to a person: a dead letter that names it, counted
// in SagaStats::late_calls_after_sweep.
Status SagaRunner::ParkLateCallAfterSweep(Tx& tx, const Position& p, int64_t fence,
                                          bool succeeded, const std::string& result,
                                          const std::string& error) {
  const int64_t now = clock_->NowMillis();
  const SagaStep& s = definition_.steps[static_cast<size_t>(p.step)];
  const std::string key = StepKey(definition_.type, p.saga_id, s.name, false);
  nlohmann::json payload = {
      {"reason", kSagaLateCallAfterSweep},
      {"saga_id", p.saga_id},
      {"type", definition_.type},
      {"step", s.name},
      {"effect_key", key},
      {"compensation_key", StepKey(definition_.type, p.saga_id, s.name, true)},
      {"outcome", succeeded ? "succeeded" : "unknown"},
      {"fence", fence},
      {"attempt", p.attempts + 1}};
  if (succeeded) payload["result"] = result;
  if (!error.empty()) payload["error"] = error;
  DeadLetter d;
  d.consumer = std::string(kSagaQueuePrefix) + definition_.type;
  d.queue = d.consumer;
  d.event_id = p.saga_id;
  d.source = "urn:converge:sagas";
  d.type = definition_.type;
  d.envelope = payload.dump();
  d.error_class = std::string(kSagaLateCallAfterSweep);
  d.error_code = std::string(StatusCodeName(StatusCode::kNotFound));
  d.error = "a late " + std::string(succeeded ? "successful" : "unknown-outcome") +
            " call of step '" + s.name + "' (key " + key + ") returned after saga " + p.saga_id +
            " was swept: nothing compensates it; undo it by hand, then discard this letter";
  d.attempts = p.attempts + 1;
  d.first_failure_at = now;
  d.last_failure_at = now;
  return StatusOf(DeadLetters::Park(tx, d));
}

Status SagaRunner::Finish(Tx& tx, const Position& p, int64_t fence, std::string_view state,
                          std::string_view phase, std::string_view outcome,
                          const std::string& result, const std::string& error, int next_step,
                          const std::string& data) {
  const int64_t now = clock_->NowMillis();
  const int steps = static_cast<int>(definition_.steps.size());
  const SagaStep& s = definition_.steps[static_cast<size_t>(p.step)];
  const bool active = state == saga_state::kRunning || state == saga_state::kCompensating;
  // The next action's deadline, kept in the row for operators (the runner computes it
  // from step_started_at).
  Value deadline;
  if (state == saga_state::kRunning && next_step < steps) {
    const Millis d = definition_.steps[static_cast<size_t>(next_step)].policy.deadline;
    if (d > Millis(0)) deadline = now + d.count();
  }
  CONVERGE_ASSIGN_OR_RETURN(
      int64_t n,
      tx.Exec("UPDATE saga_instances SET state = $1, step = $2, attempts = 0, data = $3, "
              "unsettled_starts = 0, "
              "version = $4, step_started_at = $5, deadline = $6, next_attempt_at = $5, "
              "lease_until = $7, error = $8, updated_at = $5 "
              "WHERE saga_id = $9 AND fence = $10",
              state, next_step, data, p.version + 1, now, deadline,
              active ? now + options_.lease.count() : 0, error.empty() ? Value() : Value(error),
              p.saga_id, fence));
  if (n != 1) return Fenced(p.saga_id);
  return StatusOf(
      tx.Exec("INSERT INTO saga_steps (saga_id, seq, step, phase, outcome, attempt, result, error, "
              "fence, at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
              p.saga_id, p.version + 1, s.name, phase, outcome, p.attempts + 1,
              result.empty() ? Value() : Value(result), error.empty() ? Value() : Value(error),
              fence, now));
}

void SagaRunner::Count(int64_t SagaStats::*field, const std::string& error) {
  std::lock_guard<std::mutex> l(stats_mu_);
  if (field != nullptr) ++(stats_.*field);
  if (!error.empty()) stats_.last_error = error;
}

Status SagaRunner::UntilRecorded(const std::function<Status()>& write) {
  Status st = write();
  for (int attempt = 1; st.transient() && !IsFenced(st) && !stopping_.load(); ++attempt) {
    Count(nullptr, "recording a call's outcome failed, retrying: " + st.ToString());
    std::this_thread::sleep_for(
        Millis(20) + internal::FullJitterBackoff(attempt, Millis(50), Millis(2000)));
    st = write();
  }
  return st;
}

void SagaRunner::Start() {
  if (worker_.running()) return;
  listener_ = db_.AddListener(Channel(definition_.type), [this] { wakeup_.Notify(); });
  worker_.Start();
}

void SagaRunner::Stop() {
  if (!worker_.running()) return;
  stopping_ = true;  // a pass retrying a record gives up, as a crash would
  db_.RemoveListener(listener_);
  worker_.Stop();
  stopping_ = false;
}

SagaStats SagaRunner::stats() const {
  std::lock_guard<std::mutex> l(stats_mu_);
  return stats_;
}

Result<std::optional<SagaInstance>> SagaRunner::Load(Tx& tx, const std::string& saga_id) {
  CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query("SELECT " + std::string(kInstanceColumns) +
                                                    " FROM saga_instances WHERE saga_id = $1",
                                                saga_id));
  if (rows.empty()) return std::optional<SagaInstance>();
  SagaInstance s = InstanceOf(rows[0]);
  CONVERGE_ASSIGN_OR_RETURN(
      Rows log, tx.Query("SELECT seq, step, phase, outcome, attempt, result, error, fence, at "
                         "FROM saga_steps WHERE saga_id = $1 ORDER BY seq",
                         saga_id));
  for (const Row& r : log) {
    s.history.push_back({r.Int(0), r.Text(1), r.Text(2), r.Text(3), static_cast<int>(r.Int(4)),
                         r.Text(5), r.Text(6), r.Int(7), r.Int(8)});
  }
  return std::optional<SagaInstance>(std::move(s));
}

Result<std::vector<SagaInstance>> SagaRunner::List(Tx& tx, std::string_view state,
                                                   std::string_view type, int64_t limit) {
  if (!state.empty() && !saga_state::Known(state)) {
    return tl::unexpected(InvalidArgumentError(
        "unknown saga state '" + std::string(state) +
        "' (running, compensating, completed, compensated, failed_to_compensate)"));
  }
  if (limit < 1) return tl::unexpected(InvalidArgumentError("limit must be >= 1"));
  CONVERGE_ASSIGN_OR_RETURN(
      Rows rows, tx.Query("SELECT " + std::string(kInstanceColumns) +
                              " FROM saga_instances WHERE ($1 = '' OR state = $1) AND "
                              "($2 = '' OR type = $2) ORDER BY created_at DESC, saga_id LIMIT $3",
                          std::string(state), std::string(type), limit));
  std::vector<SagaInstance> out;
  for (const Row& r : rows) out.push_back(InstanceOf(r));
  return out;
}

SagaRequeuer::SagaRequeuer(Clock* clock) : clock_(clock ? clock : Clock::System()) {}

Status SagaRequeuer::Requeue(Tx& tx, const DeadLetter& letter) {
  if (letter.error_class == kSagaLateCallAfterSweep) {
    return FailedPreconditionError(
        "dead letter " + std::to_string(letter.id) + ": a late call after its saga was swept "
        "has no saga to replay into; undo the call by hand, then discard the letter");
  }
  const int64_t now = clock_->NowMillis();
  CONVERGE_ASSIGN_OR_RETURN(
      int64_t n, tx.Exec("UPDATE saga_instances SET state = 'compensating', attempts = 0, "
                         "unsettled_starts = 0, "
                         "next_attempt_at = $1, lease_until = 0, updated_at = $1 "
                         "WHERE saga_id = $2 AND state = 'failed_to_compensate'",
                         now, letter.event_id));
  if (n == 0) return OkStatus();
  std::string_view type = letter.queue;
  if (type.substr(0, kSagaQueuePrefix.size()) == kSagaQueuePrefix) {
    type.remove_prefix(kSagaQueuePrefix.size());
  }
  return tx.Notify(Channel(type));
}

}  // namespace converge
