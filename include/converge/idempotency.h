// Idempotency keys: a (scope, key) names one intended operation; its first outcome is
// stored and every retry gets that outcome back instead of running the operation again.
// This is the producer side of effective-once (IETF draft-ietf-httpapi-idempotency-key-
// header, Stripe's practice). See docs/design/idempotency.md.
//
// Two shapes:
//  * Single-phase (`Execute`): the operation only writes to the database. Key row,
//    business rows, outbox rows and stored response commit in one transaction, so there
//    is never a half-done state. Concurrent callers with one key: exactly one runs fn,
//    the others get its stored outcome.
//  * Multi-phase (`Begin` / `Advance` / `Complete`): the operation calls something
//    outside the database (a payment provider) between atomic phases. Each phase commits
//    a named recovery point. A lease (`lease_until`) marks the record as being worked on;
//    a fencing token (`fence`) is raised every time another worker takes over an expired
//    lease, and every phase checks it in its own transaction, so a worker that lost its
//    lease can never advance or complete the record. A retry after a crash resumes from
//    the last recovery point and passes the same downstream key, so the external effect
//    converges.
//
// Errors shared by every call (the HTTP layer maps them):
//   kInvalidArgument                       bad scope or key (empty, over 255 bytes,
//                                          control characters)  -> 400
//   kFailedPrecondition, reason
//     "fingerprint_mismatch"               same key, different request          -> 422
//   kUnavailable, reason "in_flight",
//     retry_after_ms() set (the remaining
//     lease, at most 2 s)                  another attempt holds a live lease   -> 409
//   kFailedPrecondition, reason "fenced"   this worker's lease was taken over
// Expiry: a key past expires_at behaves as if it had never existed once it is finished,
// or was never past its first phase ("started") and is no longer leased. Unfinished work
// past its first phase never expires: it may have acted outside the database, and only a
// resume from its recovery point converges.
//
// Fencing tokens come from one store-wide sequence (Tx::NextFence): a fence is never
// handed out twice for a (scope, key), not after expiry, sweep or re-creation, so a
// stalled attempt can never write again once another attempt holds the key. A takeover is
// one conditional statement (in progress, lease lapsed, fence unchanged) that returns the
// recovery point it took over. A Completer (completer.h) finishes requests whose client
// went away.
//
// Begin, Advance, Complete and Release commit on their own: do not call them inside
// another Transact (a lease drawn in a transaction that later rolls back is not a lease).
//
// Thread safety: IdempotencyKeys is safe to use from many threads.
#ifndef CONVERGE_IDEMPOTENCY_H_
#define CONVERGE_IDEMPOTENCY_H_

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "converge/clock.h"
#include "converge/database.h"
#include "converge/status.h"

namespace converge {

using namespace std::chrono_literals;

struct IdempotencyOptions {
  // How long a key and its stored response live after the request started.
  Millis ttl = 24h;
  // How long one attempt may work on a multi-phase request before another may take over.
  // Each phase renews it.
  Millis lease = 30s;
  // The replay cache: completed keys' responses kept in this process, so that a replay
  // (or a 422 for another request under a completed key) is answered without reading
  // the store. A completed key changes only by being forgotten after expires_at, so an
  // entry answers exactly as the store would until then: it answers only while
  // now < expires_at - max_clock_skew, and is filled only from committed rows. Keys
  // completed by another process are not in it until this one reads them. At most
  // `replay_cache_bytes` (an estimate of what entries take) and `replay_cache_entries`;
  // the least recently used go first. 0 in either turns the cache off.
  size_t replay_cache_bytes = size_t{16} << 20;
  size_t replay_cache_entries = 100'000;
  // How far the clocks of the processes sharing the store (including a sweeper run from
  // elsewhere) may disagree. Another process forgets a key when its own clock reaches
  // expires_at; this one stops answering the key from memory that much earlier. Must be
  // >= 0; a skew larger than this can make a cached replay answer a key that another
  // process already forgot and gave to a new request.
  Millis max_clock_skew = 5s;
  // Execute with `before`: whether a key missing from the replay cache is looked for in a
  // read snapshot before `before` runs. kAlways: every time, so `before` runs only for
  // requests the write path may have to run. kAdaptive: the same, except while almost
  // none of the recent such requests were replays (fewer than 1 in 16 in a window of 256:
  // IdempotencyKeys::kSnapshotWindow); then the read is skipped, since on a stream of new
  // keys it finds nothing and costs a read transaction each (orders-lite's creates ran
  // 14-21% faster without it: docs/benchmarks.md). A replay that comes meanwhile runs
  // `before` and gets the same answer from the write path, which also counts it, so
  // replays coming back turn the read on again at the end of a window.
  enum class SnapshotFirst { kAlways, kAdaptive };
  SnapshotFirst snapshot_first = SnapshotFirst::kAdaptive;
};

// What the replay cache holds now (IdempotencyKeys::replay_cache_stats).
struct ReplayCacheStats {
  int64_t entries = 0;
  int64_t bytes = 0;  // the cache's estimate, bounded by replay_cache_bytes
  int64_t hits = 0;   // requests answered from it since the start (replays and 422s)
};

// What a handler answered, stored to be replayed byte for byte.
struct StoredResponse {
  int status = 200;
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;
  friend bool operator==(const StoredResponse&, const StoredResponse&) = default;
};

struct Outcome {
  StoredResponse response;
  bool replayed = false;  // true: a stored outcome, fn did not run now
};

struct KeyRequest {
  std::string scope;        // the principal or tenant; keys never cross scopes
  std::string key;          // the client's Idempotency-Key
  std::string fingerprint;  // what makes two requests "the same"; see RequestFingerprint
};

// The hold a multi-phase attempt has on a key. Pass it back to Advance/Complete.
struct KeyLease {
  std::string scope;
  std::string key;
  int64_t fence = 0;
  std::string recovery_point;  // "started" for a fresh request
  std::string recovery_data;   // what the last phase saved for the next (caller's format)
};

struct Begun {
  enum class Kind {
    kStarted,   // first attempt: run from the start
    kResumed,   // an earlier attempt stopped (crash, timeout): go on from recovery_point
    kReplayed,  // already completed: `response` is the stored outcome
  };
  Kind kind = Kind::kStarted;
  KeyLease lease;           // kStarted, kResumed
  StoredResponse response;  // kReplayed
};

// SHA-256 hex over method, path and the canonical body: what makes two requests "the
// same" (KeyRequest::fingerprint). Two requests that differ in meaning never share a
// fingerprint. A body nlohmann's parser accepts is canonicalised without passing its
// numbers through a double: object keys sorted (a repeated key keeps its last value),
// no whitespace, strings re-escaped, integers within 64 bits exact, every other number
// (fractions, exponents, huge integers) by its source text. So whitespace and key order
// do not make two requests differ, while 1.0 and 1.00 do (the safe direction: 422, never
// a wrong replay). Any other body is hashed as raw bytes, tagged so that it never meets a
// JSON body. Method and path are escaped, so no field can run into the next.
// See docs/design/http-idempotency.md, "The fingerprint".
std::string RequestFingerprint(std::string_view method, std::string_view path,
                               std::string_view body);

namespace internal {
class ReplayCache;
}  // namespace internal

class IdempotencyKeys {
 public:
  using Fn = std::function<Result<StoredResponse>(Tx&)>;

  // `db` and `clock` must outlive this object; clock nullptr = Clock::System().
  IdempotencyKeys(Database& db, IdempotencyOptions options = {}, Clock* clock = nullptr);
  ~IdempotencyKeys();
  IdempotencyKeys(const IdempotencyKeys&) = delete;
  IdempotencyKeys& operator=(const IdempotencyKeys&) = delete;

  // Single-phase. First call for the key: runs fn(tx) and stores its response in the
  // same transaction (a response with any status, 4xx included, is stored and replayed).
  // If fn returns an error nothing is stored, the error is returned, and a retry runs
  // fn again. Later calls: the stored response with replayed = true. Here and in Advance
  // and Complete, fn runs inside Database::Transact and may run more than once (there).
  Result<Outcome> Execute(const KeyRequest& request, const Fn& fn);
  // The same, with `before` run first on the calling thread: work that needs no
  // transaction (parsing, ids drawn ahead, Outbox::Prepare) kept off the thread that runs
  // every transaction on SQLite (database.h). A completed key is answered first (replay
  // or mismatch, from the replay cache or a read snapshot, as Begin does), so `before`
  // runs only for a request the write path may have to run; but while the read is
  // skipped (IdempotencyOptions::snapshot_first, kAdaptive by default) a replay runs
  // `before` too, and the write path answers it. When `before` fails, nothing is written
  // and the key is looked at again: a stored answer (or mismatch), or an attempt in
  // flight, is what the caller gets, never `before`'s error in its place; the read's
  // error if that look fails; otherwise `before`'s error, as is.
  Result<Outcome> Execute(const KeyRequest& request, const std::function<Status()>& before,
                          const Fn& fn);

  // Execute with `before`, for a caller that must not block (an I/O thread): `done` gets
  // what Execute would have returned, once. What needs no store runs on the calling
  // thread: the key's checks, the replay cache, `before`. The write path runs through
  // Database::TransactAsync and `done` after its commit; on SQLite both on the writer
  // thread, so `done` must be brief and must not block (Database::TransactAsync). What
  // needs a read (the snapshot read while snapshot_first(), the look at the key after
  // `before` fails), and the whole call on a store without transacts_async(), run through
  // `blocking`, which must run its argument on a thread that may block (a worker pool's);
  // `done` is called there then. It may also be called on the calling thread before
  // ExecuteAsync returns (a replay from the cache, a malformed key). `before` may be
  // empty: then this is Execute without it.
  using Done = std::function<void(Result<Outcome>)>;
  using Blocking = std::function<void(std::function<void()>)>;
  void ExecuteAsync(KeyRequest request, std::function<Status()> before, Fn fn, Done done,
                    const Blocking& blocking);

  // Multi-phase: claims the key (kStarted), takes over an attempt whose lease lapsed
  // (kResumed, new fence, from the recovery point that attempt last committed), or returns
  // the stored outcome (kReplayed). A takeover that loses to a concurrent attempt (which
  // advanced, renewed or took over first) answers kUnavailable/reason::kInFlight.
  Result<Begun> Begin(const KeyRequest& request);

  // Commits fn(tx) together with the new recovery point and data, and renews the lease.
  // On success `lease` holds the new point. kFailedPrecondition/"fenced" if another
  // worker took over; nothing fn wrote is kept then. kInvalidArgument, before anything
  // is written, for an empty point or one of the two the library keeps for itself:
  // "started" (nothing acted yet, so the key may expire) and "finished".
  Status Advance(KeyLease& lease, std::string recovery_point, std::string recovery_data,
                 const std::function<Status(Tx&)>& fn);

  // Runs fn(tx) and stores its response, completing the record, in one transaction.
  Result<Outcome> Complete(KeyLease& lease, const Fn& fn);

  // kInvalidArgument unless 0 < lease < ttl. A key must outlive the longest attempt on it:
  // were it forgotten while an attempt still works, a retry would start the request afresh.
  // Execute and Begin refuse to run with such options; services check them at start.
  static Status ValidateOptions(const IdempotencyOptions& options);
  const IdempotencyOptions& options() const { return options_; }

  // Gives up the lease at once (the outcome is unknown: a retry resumes from the last
  // recovery point without waiting for the lease to run out).
  Status Release(const KeyLease& lease);

  // What the replay cache holds, and how many requests it answered.
  ReplayCacheStats replay_cache_stats() const;

  // IdempotencyOptions::snapshot_first: the requests in a window, and the share of them
  // that must be replays for the read to stay on (1 / kSnapshotReplayShare).
  static constexpr int64_t kSnapshotWindow = 256;
  static constexpr int64_t kSnapshotReplayShare = 16;
  // Whether Execute with `before` now reads the key before `before` runs (always with
  // SnapshotFirst::kAlways).
  bool snapshot_first() const;

 private:
  Status Validate(const KeyRequest& r) const;
  Status CheckFence(Tx& tx, const KeyLease& lease, int64_t now, bool deferred);
  Status StoreResponse(Tx& tx, const KeyLease& lease, const StoredResponse& r, int64_t now);
  // The cached answer for `req` (a replay, or a mismatch), if the cache may give one now.
  std::optional<Result<StoredResponse>> FromCache(const KeyRequest& req,
                                                  const std::string& hash);
  // Keeps a completed row (read with kSelectKey) in the cache, if it may answer a while.
  // REQUIRES: the row is committed.
  void Remember(const KeyRequest& req, const Row& row);
  // What a read snapshot says of the key when it settles `req` without the write path: a
  // completed key's replay or mismatch, and with `in_flight` also an attempt whose lease
  // is valid (kUnavailable/in_flight, or the mismatch). nullopt: anything else (no row,
  // forgettable, to take over, a failed read). With `read`, also how the read went and
  // whether it found the key completed.
  struct SnapshotRead {
    Status status;
    bool completed = false;
  };
  std::optional<Result<StoredResponse>> FromSnapshot(const KeyRequest& req,
                                                     const std::string& hash, bool in_flight,
                                                     SnapshotRead* read = nullptr);
  // Execute's write path in `tx`: claims the key and runs fn, or answers the row it found
  // (setting `found_completed` to whether that row was completed).
  Result<Outcome> WritePath(Tx& tx, const KeyRequest& req, const std::string& hash,
                            const Fn& fn, std::optional<bool>* found_completed);
  // What Execute answers once `before` failed with `st`: the key's answer if a read finds
  // one, else the read's error or `st`.
  Result<Outcome> AfterBeforeFailed(const KeyRequest& req, const std::string& hash,
                                    bool read_first, const Status& st);
  static Result<Outcome> Answered(Result<StoredResponse> settled);
  // Counts one request of Execute with `before` that reached the snapshot or the write
  // path: `replay` when a snapshot read would have answered it (a completed key).
  void CountForSnapshot(bool replay);

  Database& db_;
  const IdempotencyOptions options_;
  Clock* clock_;
  std::unique_ptr<internal::ReplayCache> cache_;  // nullptr: off
  std::atomic<int64_t> cache_hits_{0};
  // SnapshotFirst::kAdaptive: the window's requests and replays so far, and whether the
  // last full window had too few replays to read first.
  std::atomic<int64_t> window_requests_{0};
  std::atomic<int64_t> window_replays_{0};
  std::atomic<bool> skip_snapshot_{false};
};

}  // namespace converge

#endif  // CONVERGE_IDEMPOTENCY_H_
