// Failpoints: named places in converge's code paths where a test, the demo or the chaos
// harness can make the process crash, a call fail, a step stall, or a thread pause until
// the test lets it go (so every race is a deterministic test, never a lucky sleep).
//
// Points in the library (each documented where it sits):
//   relay.after_publish_before_mark   consumer.before_commit
//   consumer.after_commit_before_ack  idempotency.after_phase
//   idempotency.after_effect_before_response  idempotency.before_takeover
//   idempotency.after_replay_read     (Begin: between its snapshot read and its answer)
//   effects.before_call               effects.after_call_before_record
//   dead_letters.after_claim
//   saga.before_call  saga.after_call_before_record  saga.before_local  saga.after_step
//   saga.before_reopen_commit         (saga.cc: a late call's reopen written, not committed)
//   sweeper.before_saga_instances     (sweeper.cc: settled sagas' journal gone, rows not yet)
//   postgres.before_commit            (a Transact on PostgreSQL, fn done, COMMIT not sent)
//   sqlite.before_checkpoint          (sqlite_database.cc: the checkpointer woken, not run)
//   sqlite.after_bare_rollback        (sqlite_database.cc: a batch without savepoints
//                                      rolled back for a failing call, not begun again)
//   outbox_table.finalize_before_commit (outbox_table.h: published rows' delete/mark)
//   outbox_table.between_pages        (outbox_table.cc: an ingest about to read a page after
//                                      its first)
//   nats.pull_answer_late             (nats_pull.cc: a pull request sent, its wait skipped)
//   nats.before_publish_async         (nats_transport.cc: an error here is a failed send)
//   nats.ack_answer                   (nats_transport.cc: an error here fails a stored
//                                      message's ack)
//   nats.before_abandoned_read        (nats_transport.cc: an error here is JetStream
//                                      answering "temporarily unavailable" to the read of
//                                      a message the server gave up on)
//   nats.on_advisory                  (nats_transport.cc: a MAX_DELIVERIES advisory
//                                      received, not yet counted)
//   nats.before_notice_look           (nats_transport.cc: an error here skips a Fetch's
//                                      look for notices of abandoned messages)
//
// Configuration is a spec string, from Configure() or the CONVERGE_FAILPOINTS
// environment variable (read by ConfigureFromEnv(), which the converge CLI calls):
//
//   spec   := entry (';' entry)*
//   entry  := name '=' action ['@' N] ['*' M]
//   action := 'crash' | 'error(' code [',' message] ')' | 'delay(' millis ')' | 'pause'
//           | 'off'
//
// `crash` kills the process with SIGKILL (no destructors, no flushing: as a power cut is
// to the process). `error(unavailable)` makes Hit() return that code. `pause` blocks the
// thread in Hit() until Release(name) (or a new Configure) lets it go; WaitPaused() tells
// a test that a thread has arrived. `@N` first fires on the N-th hit (1-based); `*M` fires
// at most M times. Example (one line in the environment; split here):
//   CONVERGE_FAILPOINTS='relay.after_publish_before_mark=crash@3;
//                        consumer.before_commit=error(unavailable)*2'
//
// Cost when no failpoint is configured: one relaxed atomic load per Hit().
// Thread safety: all functions are safe to call from many threads.
#ifndef CONVERGE_FAILPOINT_H_
#define CONVERGE_FAILPOINT_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string_view>

#include "converge/status.h"

namespace converge::failpoint {

// Replaces the whole configuration with `spec` ("" clears it) and releases every paused
// thread. On kInvalidArgument the previous configuration stays.
Status Configure(std::string_view spec);
// Configure(getenv("CONVERGE_FAILPOINTS")), or nothing when unset.
Status ConfigureFromEnv();
// How often `name` was reached since it was configured (0 when not configured).
int64_t Hits(std::string_view name);

// How many threads are paused at `name` right now.
int64_t Paused(std::string_view name);
// Waits until at least `count` threads are paused at `name`; false when `timeout` passed
// first (the caller's test fails then, instead of hanging).
bool WaitPaused(std::string_view name, std::chrono::milliseconds timeout,
                int64_t count = 1);
// Lets every thread paused at `name` go on (their Hit() returns OK). Later hits pause
// again if the point still fires. Returns how many threads it released.
int64_t Release(std::string_view name);

namespace internal {
extern std::atomic<bool> g_armed;
Status Evaluate(std::string_view name);
}  // namespace internal

// Called at the named point: OK to go on, or the injected error. May not return (crash).
inline Status Hit(std::string_view name) {
  if (!internal::g_armed.load(std::memory_order_relaxed)) return Status();
  return internal::Evaluate(name);
}

}  // namespace converge::failpoint

#endif  // CONVERGE_FAILPOINT_H_
