#include "converge/idempotency.h"

#include <algorithm>
#include <optional>

#include <nlohmann/json.hpp>

#include "converge/failpoint.h"
#include "src/core/crypto.h"
#include "src/core/idempotency_internal.h"
#include "src/core/replay_cache.h"
#include "src/core/validate.h"

namespace converge {
namespace {

using json = nlohmann::json;

constexpr std::string_view kSelectKey =
    "SELECT request_hash, status, lease_until, fence, recovery_point, recovery_data, "
    "response_status, response_headers, response_body, expires_at "
    "FROM idempotency_keys WHERE scope = $1 AND key = $2";

// When a row may be forgotten and its key used afresh: past expires_at, and either
// finished or never past its first phase and no longer leased. Work that reached a later
// recovery point is never forgotten while unfinished: it may have acted outside the
// database (a charge), and only a resume from that point converges. The sweeper deletes by
// the same rule.

Result<std::string> EncodeHeaders(
    const std::vector<std::pair<std::string, std::string>>& headers) {
  if (headers.empty()) return std::string("[]");  // the common case, without a JSON document
  json a = json::array();
  for (const auto& [k, v] : headers) a.push_back({k, v});
  try {
    return a.dump();
  } catch (const json::exception&) {
    return tl::unexpected(
        InvalidArgumentError("a response header to store is not UTF-8 text; leave it out"));
  }
}

std::vector<std::pair<std::string, std::string>> DecodeHeaders(const std::string& text) {
  std::vector<std::pair<std::string, std::string>> out;
  json a = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!a.is_array()) return out;
  for (const auto& h : a) {
    if (h.is_array() && h.size() == 2 && h[0].is_string() && h[1].is_string()) {
      out.emplace_back(h[0].get<std::string>(), h[1].get<std::string>());
    }
  }
  return out;
}

StoredResponse ResponseOf(const Row& r) {
  StoredResponse s;
  s.status = static_cast<int>(r.Int(6));
  s.headers = DecodeHeaders(r.Text(7));
  s.body = r.Text(8);
  return s;
}

Status Mismatch(const KeyRequest& req) {
  return Status(StatusCode::kFailedPrecondition,
                "idempotency key '" + req.key +
                    "' was already used for a different request",
                reason::kFingerprintMismatch);
}

constexpr int64_t kInFlightRetryHintMaxMs = 2000;

Status InFlight(const KeyRequest& req, int64_t retry_after_ms) {
  return Status(StatusCode::kUnavailable,
                "a request with idempotency key '" + req.key + "' is still in progress",
                reason::kInFlight)
      // A hint, not the whole lease: most attempts finish in milliseconds, and the
      // remaining lease only bounds the wait when the holder died.
      .WithRetryAfter(std::clamp<int64_t>(retry_after_ms, 1, kInFlightRetryHintMaxMs));
}

Status Fenced(const KeyLease& lease) {
  return Status(StatusCode::kFailedPrecondition,
                "lease on idempotency key '" + lease.key + "' (fence " +
                    std::to_string(lease.fence) + ") was taken over by another attempt",
                reason::kFenced);
}

// ForgettableKeyCondition, on a row read with kSelectKey.
bool Forgettable(const Row& r, int64_t now) {
  return r.Int(9) <= now &&
         (r.Text(1) == "completed" || (r.Text(4) == "started" && r.Int(2) <= now));
}

// The key as this transaction left it: either claimed afresh (`claimed`, holding
// `fence`) or the row another attempt owns or finished.
struct ClaimResult {
  bool claimed = false;
  int64_t fence = 0;
  Row row;
};

// Claims the key for a fresh attempt when it is absent or forgettable; otherwise returns
// its row. A fresh claim draws its fence from the store-wide sequence, so a fence is never
// handed out twice for one (scope, key), whatever expired or was swept in between.
Result<ClaimResult> Claim(Tx& tx, const KeyRequest& req, const std::string& hash, int64_t now,
                          int64_t lease_until, int64_t expires_at) {
  // Insert first where the store draws a fence inside a statement (PostgreSQL): a fresh
  // key, the common case, is claimed in one round trip. A fence drawn by an insert that
  // conflicts is simply never used. When the key exists, the read below decides.
  if (const std::string_view next_fence = tx.dialect().NextFenceExpression();
      !next_fence.empty()) {
    CONVERGE_ASSIGN_OR_RETURN(
        Rows inserted,
        tx.Query("INSERT INTO idempotency_keys (scope, key, request_hash, status, "
                 "recovery_point, lease_until, fence, created_at, updated_at, expires_at) "
                 "VALUES ($1, $2, $3, 'in_progress', 'started', $4, " + std::string(next_fence) +
                     ", $5, $5, $6) ON CONFLICT DO NOTHING RETURNING fence",
                 req.scope, req.key, hash, lease_until, now, expires_at));
    if (!inserted.empty()) return ClaimResult{true, inserted[0].Int(0), {}};
  }
  for (int round = 0; round < 2; ++round) {
    CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query(kSelectKey, req.scope, req.key));
    if (rows.empty()) {
      CONVERGE_ASSIGN_OR_RETURN(int64_t fence, tx.NextFence());
      CONVERGE_ASSIGN_OR_RETURN(
          int64_t inserted,
          tx.Exec("INSERT INTO idempotency_keys (scope, key, request_hash, status, "
                  "recovery_point, lease_until, fence, created_at, updated_at, expires_at) "
                  "VALUES ($1, $2, $3, 'in_progress', 'started', $4, $5, $6, $6, $7) "
                  // No conflict target: on a time-partitioned store the primary key
                  // also holds created_at, and a trigger skips the duplicate instead
                  // (docs/design/retention.md); elsewhere (scope, key) is the only key.
                  "ON CONFLICT DO NOTHING",
                  req.scope, req.key, hash, lease_until, fence, now, expires_at));
      if (inserted == 1) return ClaimResult{true, fence, {}};
      continue;  // another attempt inserted it first: read what it left
    }
    if (!Forgettable(rows[0], now)) return ClaimResult{false, 0, std::move(rows[0])};
    // Re-use the row in place, conditional on the state just read (another attempt may
    // claim it between the read and this update on PostgreSQL).
    CONVERGE_ASSIGN_OR_RETURN(int64_t fence, tx.NextFence());
    CONVERGE_ASSIGN_OR_RETURN(
        int64_t n,
        tx.Exec("UPDATE idempotency_keys SET request_hash = $1, status = 'in_progress', "
                "recovery_point = 'started', recovery_data = '', lease_until = $2, "
                "fence = $3, response_status = NULL, response_headers = NULL, "
                "response_body = NULL, created_at = $4, updated_at = $4, expires_at = $5 "
                "WHERE scope = $6 AND key = $7 AND fence = $8 AND " +
                    internal::ForgettableKeyCondition("$4"),
                hash, lease_until, fence, now, expires_at, req.scope, req.key,
                rows[0].Int(3)));
    if (n == 1) return ClaimResult{true, fence, {}};
  }
  return tl::unexpected(AbortedError("idempotency key changed while being claimed"));
}

// A wait for the key's row that outlasts the store's lock timeout (PostgreSQL) means
// another attempt holds the key inside a transaction: this one is a duplicate in flight,
// answered at once instead of holding a connection until the holder commits.
template <class T>
Result<T> InFlightOnLockTimeout(Result<T> r, const KeyRequest& req) {
  if (!r && r.error().reason() == reason::kLockTimeout) {
    return tl::unexpected(InFlight(req, kInFlightRetryHintMaxMs));
  }
  return r;
}

}  // namespace

namespace internal {

std::string ForgettableKeyCondition(std::string_view now) {
  const std::string n(now);
  return "expires_at <= " + n + " AND (status = 'completed' OR (recovery_point = 'started' "
         "AND lease_until <= " + n + "))";
}

std::string UnforgettableKeyCondition(std::string_view now) {
  // NOT ForgettableKeyCondition, pushed inward (every column is NOT NULL, and status is
  // 'in_progress' or 'completed'), so that each half can use an index: the expiry index,
  // and the partial index of in-progress keys.
  const std::string n(now);
  return "expires_at > " + n + " OR (status = 'in_progress' AND (recovery_point <> 'started' "
         "OR lease_until > " + n + "))";
}

Result<std::optional<KeyLease>> TakeOver(Tx& tx, const std::string& scope,
                                         const std::string& key, int64_t fence,
                                         int64_t lapsed_before, int64_t lease_until,
                                         int64_t now) {
  CONVERGE_ASSIGN_OR_RETURN(int64_t next, tx.NextFence());
  // One statement decides: still in progress, lease lapsed, fence unchanged. It returns
  // the recovery point it took over, never one read before another attempt advanced it.
  CONVERGE_ASSIGN_OR_RETURN(
      Rows rows,
      tx.Query("UPDATE idempotency_keys SET fence = $1, lease_until = $2, updated_at = $3 "
               "WHERE scope = $4 AND key = $5 AND status = 'in_progress' AND fence = $6 "
               "AND lease_until <= $7 RETURNING recovery_point, recovery_data",
               next, lease_until, now, scope, key, fence, lapsed_before));
  if (rows.empty()) return std::optional<KeyLease>();
  return std::optional<KeyLease>(KeyLease{scope, key, next, rows[0].Text(0), rows[0].Text(1)});
}

}  // namespace internal

IdempotencyKeys::IdempotencyKeys(Database& db, IdempotencyOptions options, Clock* clock)
    : db_(db), options_(options), clock_(clock ? clock : Clock::System()) {
  if (options_.replay_cache_bytes > 0 && options_.replay_cache_entries > 0) {
    cache_ = std::make_unique<internal::ReplayCache>(options_.replay_cache_bytes,
                                                     options_.replay_cache_entries);
  }
}

IdempotencyKeys::~IdempotencyKeys() = default;

ReplayCacheStats IdempotencyKeys::replay_cache_stats() const {
  ReplayCacheStats s = cache_ ? cache_->stats() : ReplayCacheStats{};
  s.hits = cache_hits_.load(std::memory_order_relaxed);
  return s;
}

// The replay cache's rule (docs/design/idempotency.md, "The replay cache"). A completed
// row changes only by being forgotten, and no process forgets it before its own clock
// reaches expires_at: while now < expires_at - max_clock_skew the row is the one cached,
// so its answer is the store's answer. At or past that instant the store decides.
std::optional<Result<StoredResponse>> IdempotencyKeys::FromCache(const KeyRequest& req,
                                                                 const std::string& hash) {
  if (!cache_) return std::nullopt;
  std::shared_ptr<const internal::CachedReplay> e = cache_->Find(
      req.scope, req.key, clock_->NowMillis() + options_.max_clock_skew.count());
  if (!e) return std::nullopt;
  cache_hits_.fetch_add(1, std::memory_order_relaxed);
  if (e->request_hash != hash) return Result<StoredResponse>(tl::unexpected(Mismatch(req)));
  return Result<StoredResponse>(e->response);
}

// A completed key that may not be forgotten yet changes only by being swept after it
// expires, so the answer a snapshot gives is the one the write path would give. An
// attempt in flight may finish or lapse meanwhile: its answer (409, retry) is only a hint.
std::optional<Result<StoredResponse>> IdempotencyKeys::FromSnapshot(const KeyRequest& req,
                                                                    const std::string& hash,
                                                                    bool in_flight,
                                                                    SnapshotRead* read) {
  std::optional<Result<StoredResponse>> settled;
  bool completed = false;
  Status st = db_.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query(kSelectKey, req.scope, req.key));
    // Failpoint: the snapshot is read; the key may expire and change hands right here.
    CONVERGE_RETURN_IF_ERROR(failpoint::Hit("idempotency.after_replay_read"));
    const int64_t now = clock_->NowMillis();
    if (rows.empty() || Forgettable(rows[0], now)) return OkStatus();
    const Row& r = rows[0];
    if (r.Text(1) == "completed") {
      completed = true;
      Remember(req, r);  // a read snapshot holds committed rows only
      settled = r.Text(0) != hash ? Result<StoredResponse>(tl::unexpected(Mismatch(req)))
                                  : Result<StoredResponse>(ResponseOf(r));
    } else if (in_flight && r.Int(2) > now) {
      settled = tl::unexpected(r.Text(0) != hash ? Mismatch(req)
                                                 : InFlight(req, r.Int(2) - now));
    }
    return OkStatus();
  });
  if (read != nullptr) *read = SnapshotRead{std::move(st), completed};
  return settled;
}

void IdempotencyKeys::Remember(const KeyRequest& req, const Row& r) {
  if (!cache_ || r.Text(1) != "completed") return;
  const int64_t expires_at = r.Int(9);
  if (expires_at - options_.max_clock_skew.count() <= clock_->NowMillis()) return;
  auto e = std::make_shared<internal::CachedReplay>();
  e->request_hash = r.Text(0);
  e->response = ResponseOf(r);
  e->expires_at = expires_at;
  cache_->Insert(req.scope, req.key, std::move(e));
}

Status IdempotencyKeys::Validate(const KeyRequest& r) const {
  CONVERGE_RETURN_IF_ERROR(ValidateOptions(options_));
  CONVERGE_RETURN_IF_ERROR(internal::ValidateToken("idempotency scope", r.scope, 255));
  CONVERGE_RETURN_IF_ERROR(internal::ValidateToken("idempotency key", r.key, 255));
  return OkStatus();
}

Status IdempotencyKeys::ValidateOptions(const IdempotencyOptions& o) {
  if (o.lease <= Millis(0)) return InvalidArgumentError("idempotency lease must be positive");
  if (o.max_clock_skew < Millis(0)) {
    return InvalidArgumentError("idempotency max_clock_skew must not be negative");
  }
  if (o.ttl <= o.lease) {
    return InvalidArgumentError(
        "idempotency ttl (" + std::to_string(o.ttl.count()) + " ms) must exceed the lease (" +
        std::to_string(o.lease.count()) +
        " ms): a key must outlive the longest attempt, or a retry would start the request "
        "afresh while the first attempt still works on it");
  }
  return OkStatus();
}

Result<Outcome> IdempotencyKeys::Execute(const KeyRequest& req, const Fn& fn) {
  return Execute(req, nullptr, fn);
}

Result<Outcome> IdempotencyKeys::Execute(const KeyRequest& req,
                                         const std::function<Status()>& before, const Fn& fn) {
  CONVERGE_RETURN_IF_ERROR(Validate(req));
  const std::string hash = internal::Sha256Hex(req.fingerprint);
  if (auto cached = FromCache(req, hash)) {
    if (!*cached) return tl::unexpected(cached->error());
    return Outcome{std::move(**cached), true};
  }
  bool read_first = false;  // a snapshot read looked for a completed key
  if (before) {
    if (snapshot_first()) {
      read_first = true;
      std::optional<Result<StoredResponse>> settled =
          FromSnapshot(req, hash, /*in_flight=*/false);
      CountForSnapshot(settled.has_value());
      if (settled) return Answered(std::move(*settled));
    }
    if (Status st = before(); !st.ok()) return AfterBeforeFailed(req, hash, read_first, st);
  }
  // Whether the write path found the key completed (a replay, or a mismatch): what the
  // snapshot read would have answered, counted when it was skipped.
  std::optional<bool> found_completed;
  Result<Outcome> out = TransactValue<Outcome>(db_, [&](Tx& tx) -> Result<Outcome> {
    return WritePath(tx, req, hash, fn, &found_completed);
  });
  if (before && !read_first && found_completed) CountForSnapshot(*found_completed);
  return out;
}

Result<Outcome> IdempotencyKeys::Answered(Result<StoredResponse> settled) {
  if (!settled) return tl::unexpected(settled.error());
  return Outcome{std::move(*settled), true};
}

Result<Outcome> IdempotencyKeys::AfterBeforeFailed(const KeyRequest& req,
                                                   const std::string& hash, bool read_first,
                                                   const Status& st) {
  // The key may have been completed (or claimed) since: its answer, not this error.
  SnapshotRead read;
  std::optional<Result<StoredResponse>> settled =
      FromSnapshot(req, hash, /*in_flight=*/true, &read);
  // With the read skipped, this is the first look at the key: count it, or replays
  // whose `before` fails (a dependency of it down) would never turn the read on again.
  if (!read_first && read.status.ok()) CountForSnapshot(read.completed);
  if (settled) return Answered(std::move(*settled));
  // Whether a stored answer exists is unknown: not `before`'s error in its place
  // (its answer may be a permanent 4xx, where a retry would get the stored one).
  if (!read.status.ok()) return tl::unexpected(read.status);
  return tl::unexpected(st);
}

Result<Outcome> IdempotencyKeys::WritePath(Tx& tx, const KeyRequest& req,
                                           const std::string& hash, const Fn& fn,
                                           std::optional<bool>* found_completed) {
  found_completed->reset();
  const int64_t now = clock_->NowMillis();
  CONVERGE_ASSIGN_OR_RETURN(
      ClaimResult c,
      InFlightOnLockTimeout(
          Claim(tx, req, hash, now, now + options_.lease.count(), now + options_.ttl.count()),
          req));
  *found_completed = !c.claimed && c.row.Text(1) == "completed";
  if (!c.claimed) {
    const Row& r = c.row;
    // Cached once this transaction commits (the row it read is committed then, even
    // when it was written earlier in the same group commit); never if it rolls back.
    if (cache_ && r.Text(1) == "completed") {
      tx.OnCommit([this, req, row = r] { Remember(req, row); });
    }
    if (r.Text(0) != hash) return tl::unexpected(Mismatch(req));
    if (r.Text(1) == "completed") return Outcome{ResponseOf(r), true};
    if (r.Int(2) > now) return tl::unexpected(InFlight(req, r.Int(2) - now));
    return tl::unexpected(Status(
        StatusCode::kFailedPrecondition,
        "idempotency key '" + req.key +
            "' belongs to an interrupted multi-phase request; resume it with Begin",
        reason::kMultiPhase));
  }
  CONVERGE_ASSIGN_OR_RETURN(StoredResponse response, fn(tx));
  CONVERGE_RETURN_IF_ERROR(failpoint::Hit("idempotency.after_effect_before_response"));
  KeyLease lease{req.scope, req.key, c.fence, "started", ""};
  CONVERGE_RETURN_IF_ERROR(StoreResponse(tx, lease, response, now));
  return Outcome{std::move(response), false};
}

void IdempotencyKeys::ExecuteAsync(KeyRequest req, std::function<Status()> before, Fn fn,
                                   Done done, const Blocking& blocking) {
  if (Status st = Validate(req); !st.ok()) return done(tl::unexpected(std::move(st)));
  std::string hash = internal::Sha256Hex(req.fingerprint);
  if (auto cached = FromCache(req, hash)) {
    if (!*cached) return done(tl::unexpected(cached->error()));
    return done(Outcome{std::move(**cached), true});
  }
  if ((before && snapshot_first()) || !db_.transacts_async()) {
    blocking([this, req = std::move(req), before = std::move(before), fn = std::move(fn),
              done = std::move(done)] { done(Execute(req, before, fn)); });
    return;
  }
  if (before) {
    if (Status st = before(); !st.ok()) {
      blocking([this, req = std::move(req), hash = std::move(hash), st = std::move(st),
                done = std::move(done)] {
        done(AfterBeforeFailed(req, hash, /*read_first=*/false, st));
      });
      return;
    }
  }
  // What the write path shares with its completion; the transaction may run fn more than
  // once (Database::Transact), and only the last run's outcome counts.
  struct Write {
    KeyRequest req;
    std::string hash;
    Fn fn;
    Done done;
    bool count;  // with `before`: counted for the snapshot read, as Execute does
    std::optional<bool> found_completed;
    std::optional<Outcome> out;
  };
  auto w = std::make_shared<Write>(Write{std::move(req), std::move(hash), std::move(fn),
                                         std::move(done), static_cast<bool>(before), {}, {}});
  db_.TransactAsync(
      [this, w](Tx& tx) -> Status {
        w->out.reset();
        Result<Outcome> r = WritePath(tx, w->req, w->hash, w->fn, &w->found_completed);
        if (!r) return r.error();
        w->out = std::move(*r);
        return OkStatus();
      },
      [this, w](Status st) {
        if (w->count && w->found_completed) CountForSnapshot(*w->found_completed);
        if (!st.ok()) return w->done(tl::unexpected(std::move(st)));
        w->done(std::move(*w->out));
      });
}

bool IdempotencyKeys::snapshot_first() const {
  return options_.snapshot_first == IdempotencyOptions::SnapshotFirst::kAlways ||
         !skip_snapshot_.load(std::memory_order_relaxed);
}

// Approximate on purpose: requests that race at a window's end may be counted in the next
// window. It only decides whether a read is worth making; every answer is the same.
void IdempotencyKeys::CountForSnapshot(bool replay) {
  if (options_.snapshot_first != IdempotencyOptions::SnapshotFirst::kAdaptive) return;
  if (replay) window_replays_.fetch_add(1, std::memory_order_relaxed);
  if ((window_requests_.fetch_add(1, std::memory_order_relaxed) + 1) % kSnapshotWindow != 0) {
    return;
  }
  const int64_t replays = window_replays_.exchange(0, std::memory_order_relaxed);
  skip_snapshot_.store(replays * kSnapshotReplayShare < kSnapshotWindow,
                       std::memory_order_relaxed);
}

Result<Begun> IdempotencyKeys::Begin(const KeyRequest& req) {
  CONVERGE_RETURN_IF_ERROR(Validate(req));
  const std::string hash = internal::Sha256Hex(req.fingerprint);
  if (auto cached = FromCache(req, hash)) {
    if (!*cached) return tl::unexpected(cached->error());
    Begun b;
    b.kind = Begun::Kind::kReplayed;
    b.response = std::move(**cached);
    return b;
  }
  // Replays first, from a read snapshot, off the one writer (SQLite) and without row locks.
  if (auto settled = FromSnapshot(req, hash, /*in_flight=*/false)) {
    if (!*settled) return tl::unexpected(settled->error());
    Begun b;
    b.kind = Begun::Kind::kReplayed;
    b.response = std::move(**settled);
    return b;
  }
  return TransactValue<Begun>(db_, [&](Tx& tx) -> Result<Begun> {
    const int64_t now = clock_->NowMillis();
    const int64_t lease_until = now + options_.lease.count();
    CONVERGE_ASSIGN_OR_RETURN(
        ClaimResult c,
        InFlightOnLockTimeout(
            Claim(tx, req, hash, now, lease_until, now + options_.ttl.count()), req));
    Begun b;
    if (c.claimed) {
      b.kind = Begun::Kind::kStarted;
      b.lease = KeyLease{req.scope, req.key, c.fence, "started", ""};
      return b;
    }
    const Row& r = c.row;
    if (r.Text(0) != hash) return tl::unexpected(Mismatch(req));
    if (r.Text(1) == "completed") {
      b.kind = Begun::Kind::kReplayed;
      b.response = ResponseOf(r);
      return b;
    }
    if (r.Int(2) > now) return tl::unexpected(InFlight(req, r.Int(2) - now));
    // Failpoint: another attempt may advance or finish the row right here (PostgreSQL).
    CONVERGE_RETURN_IF_ERROR(failpoint::Hit("idempotency.before_takeover"));
    // The previous attempt's lease ran out: take over with a new fence so that attempt can
    // no longer write. If it advanced, renewed or finished since the read above, the
    // conditional takeover changes nothing and this attempt is told to come back.
    CONVERGE_ASSIGN_OR_RETURN(
        std::optional<KeyLease> taken,
        InFlightOnLockTimeout(
            internal::TakeOver(tx, req.scope, req.key, r.Int(3), now, lease_until, now), req));
    if (!taken) return tl::unexpected(InFlight(req, 1000));
    b.kind = Begun::Kind::kResumed;
    b.lease = std::move(*taken);
    return b;
  });
}

Status IdempotencyKeys::CheckFence(Tx& tx, const KeyLease& lease, int64_t now, bool deferred) {
  // Renews the lease and, by the row it updates, proves the fence is still ours. On
  // PostgreSQL the UPDATE also locks the row until commit, so no takeover can slip in
  // once it ran. Deferred, it runs when fn's next statement waits for the server, or
  // with the COMMIT: a takeover before that makes the commit fail with Fenced.
  constexpr std::string_view kRenew =
      "UPDATE idempotency_keys SET lease_until = $1, updated_at = $2 "
      "WHERE scope = $3 AND key = $4 AND fence = $5 AND status = 'in_progress'";
  if (deferred) {
    return tx.ExecDeferred(DeferredCheck::Changes(1, Fenced(lease)), kRenew,
                           now + options_.lease.count(), now, lease.scope, lease.key,
                           lease.fence);
  }
  CONVERGE_ASSIGN_OR_RETURN(int64_t n, tx.Exec(kRenew, now + options_.lease.count(), now,
                                               lease.scope, lease.key, lease.fence));
  if (n != 1) return Fenced(lease);
  return OkStatus();
}

// Deferred (Tx::ExecDeferred): nothing reads its result, and its fence check fails the
// commit instead, so it travels with the COMMIT.
Status IdempotencyKeys::StoreResponse(Tx& tx, const KeyLease& lease, const StoredResponse& r,
                                      int64_t now) {
  CONVERGE_ASSIGN_OR_RETURN(std::string headers, EncodeHeaders(r.headers));
  return tx.ExecDeferred(
      DeferredCheck::Changes(1, Fenced(lease)),
      "UPDATE idempotency_keys SET status = 'completed', recovery_point = 'finished', "
      "response_status = $1, response_headers = $2, response_body = $3, "
      "lease_until = $4, updated_at = $4 "
      "WHERE scope = $5 AND key = $6 AND fence = $7 AND status = 'in_progress'",
      r.status, headers, BlobRef{r.body}, now, lease.scope, lease.key, lease.fence);
}

Status IdempotencyKeys::Advance(KeyLease& lease, std::string recovery_point,
                                std::string recovery_data,
                                const std::function<Status(Tx&)>& fn) {
  // 'started' means nothing happened outside the database yet: a key left there expires
  // and a retry starts afresh, so a phase that acted must not name its point so.
  if (recovery_point.empty() || recovery_point == "started" || recovery_point == "finished") {
    return InvalidArgumentError(
        "recovery point must be non-empty and neither 'started' nor 'finished'");
  }
  CONVERGE_RETURN_IF_ERROR(db_.Transact([&](Tx& tx) -> Status {
    const int64_t now = clock_->NowMillis();
    CONVERGE_RETURN_IF_ERROR(CheckFence(tx, lease, now, /*deferred=*/false));
    CONVERGE_RETURN_IF_ERROR(fn(tx));
    // Failpoint: the phase holds the key row (PostgreSQL: locked until commit).
    CONVERGE_RETURN_IF_ERROR(failpoint::Hit("idempotency.before_phase_commit"));
    CONVERGE_RETURN_IF_ERROR(tx.Exec(
        "UPDATE idempotency_keys SET recovery_point = $1, recovery_data = $2 "
        "WHERE scope = $3 AND key = $4 AND fence = $5",
        recovery_point, recovery_data, lease.scope, lease.key, lease.fence));
    return OkStatus();
  }));
  lease.recovery_point = std::move(recovery_point);
  lease.recovery_data = std::move(recovery_data);
  return failpoint::Hit("idempotency.after_phase");
}

Result<Outcome> IdempotencyKeys::Complete(KeyLease& lease, const Fn& fn) {
  auto out = TransactValue<Outcome>(db_, [&](Tx& tx) -> Result<Outcome> {
    const int64_t now = clock_->NowMillis();
    CONVERGE_RETURN_IF_ERROR(CheckFence(tx, lease, now, /*deferred=*/true));
    CONVERGE_ASSIGN_OR_RETURN(StoredResponse response, fn(tx));
    CONVERGE_RETURN_IF_ERROR(failpoint::Hit("idempotency.after_effect_before_response"));
    CONVERGE_RETURN_IF_ERROR(StoreResponse(tx, lease, response, now));
    return Outcome{std::move(response), false};
  });
  if (out) lease.recovery_point = "finished";
  return out;
}

Status IdempotencyKeys::Release(const KeyLease& lease) {
  return db_.Transact([&](Tx& tx) -> Status {
    const int64_t now = clock_->NowMillis();
    CONVERGE_ASSIGN_OR_RETURN(
        int64_t n, tx.Exec("UPDATE idempotency_keys SET lease_until = $1, updated_at = $1 "
                           "WHERE scope = $2 AND key = $3 AND fence = $4 "
                           "AND status = 'in_progress'",
                           now, lease.scope, lease.key, lease.fence));
    if (n != 1) return Fenced(lease);
    return OkStatus();
  });
}

}  // namespace converge
