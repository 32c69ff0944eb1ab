#include "converge/idempotency.h"

#include <nlohmann/json.hpp>

#include "converge/failpoint.h"
#include "src/core/crypto.h"
#include "src/core/validate.h"

namespace converge {
namespace {

using json = nlohmann::json;

constexpr std::string_view kSelectKey =
    "SELECT request_hash, status, lease_until, fence, recovery_point, recovery_data, "
    "response_status, response_headers, response_body "
    "FROM idempotency_keys WHERE scope = $1 AND key = $2";

std::string EncodeHeaders(const std::vector<std::pair<std::string, std::string>>& headers) {
  json a = json::array();
  for (const auto& [k, v] : headers) a.push_back({k, v});
  return a.dump();
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

Status InFlight(const KeyRequest& req, int64_t retry_after_ms) {
  return Status(StatusCode::kUnavailable,
                "a request with idempotency key '" + req.key + "' is still in progress",
                reason::kInFlight)
      .WithRetryAfter(std::max<int64_t>(retry_after_ms, 1));
}

Status Fenced(const KeyLease& lease) {
  return Status(StatusCode::kFailedPrecondition,
                "lease on idempotency key '" + lease.key + "' (fence " +
                    std::to_string(lease.fence) + ") was taken over by another attempt",
                reason::kFenced);
}

// Deletes an expired row for the key (it behaves as absent) and tries to claim the key.
// Returns true when this transaction now owns a fresh in-progress row with fence 1.
Result<bool> Claim(Tx& tx, const KeyRequest& req, const std::string& hash, int64_t now,
                   int64_t lease_until, int64_t expires_at) {
  CONVERGE_RETURN_IF_ERROR(tx.Exec(
      "DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND expires_at <= $3",
      req.scope, req.key, now));
  CONVERGE_ASSIGN_OR_RETURN(
      int64_t inserted,
      tx.Exec("INSERT INTO idempotency_keys (scope, key, request_hash, status, "
              "recovery_point, lease_until, fence, created_at, updated_at, expires_at) "
              "VALUES ($1, $2, $3, 'in_progress', 'started', $4, 1, $5, $5, $6) "
              "ON CONFLICT (scope, key) DO NOTHING",
              req.scope, req.key, hash, lease_until, now, expires_at));
  return inserted == 1;
}

}  // namespace

IdempotencyKeys::IdempotencyKeys(Database& db, IdempotencyOptions options, Clock* clock)
    : db_(db), options_(options), clock_(clock ? clock : Clock::System()) {}

Status IdempotencyKeys::Validate(const KeyRequest& r) const {
  CONVERGE_RETURN_IF_ERROR(internal::ValidateToken("idempotency scope", r.scope, 255));
  CONVERGE_RETURN_IF_ERROR(internal::ValidateToken("idempotency key", r.key, 255));
  return OkStatus();
}

Result<Outcome> IdempotencyKeys::Execute(const KeyRequest& req, const Fn& fn) {
  CONVERGE_RETURN_IF_ERROR(Validate(req));
  const std::string hash = internal::Sha256Hex(req.fingerprint);
  return TransactValue<Outcome>(db_, [&](Tx& tx) -> Result<Outcome> {
    const int64_t now = clock_->NowMillis();
    CONVERGE_ASSIGN_OR_RETURN(
        bool claimed, Claim(tx, req, hash, now, now + options_.lease.count(),
                            now + options_.ttl.count()));
    if (!claimed) {
      CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query(kSelectKey, req.scope, req.key));
      if (rows.empty()) return tl::unexpected(AbortedError("idempotency key vanished"));
      const Row& r = rows[0];
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
    KeyLease lease{req.scope, req.key, 1, "started", ""};
    CONVERGE_RETURN_IF_ERROR(StoreResponse(tx, lease, response, now));
    return Outcome{std::move(response), false};
  });
}

Result<Begun> IdempotencyKeys::Begin(const KeyRequest& req) {
  CONVERGE_RETURN_IF_ERROR(Validate(req));
  const std::string hash = internal::Sha256Hex(req.fingerprint);
  return TransactValue<Begun>(db_, [&](Tx& tx) -> Result<Begun> {
    const int64_t now = clock_->NowMillis();
    const int64_t lease_until = now + options_.lease.count();
    CONVERGE_ASSIGN_OR_RETURN(
        bool claimed, Claim(tx, req, hash, now, lease_until, now + options_.ttl.count()));
    Begun b;
    b.lease.scope = req.scope;
    b.lease.key = req.key;
    if (claimed) {
      b.kind = Begun::Kind::kStarted;
      b.lease.fence = 1;
      b.lease.recovery_point = "started";
      return b;
    }
    CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query(kSelectKey, req.scope, req.key));
    if (rows.empty()) return tl::unexpected(AbortedError("idempotency key vanished"));
    const Row& r = rows[0];
    if (r.Text(0) != hash) return tl::unexpected(Mismatch(req));
    if (r.Text(1) == "completed") {
      b.kind = Begun::Kind::kReplayed;
      b.response = ResponseOf(r);
      return b;
    }
    if (r.Int(2) > now) return tl::unexpected(InFlight(req, r.Int(2) - now));
    // The previous attempt's lease ran out: take over, raising the fence so that attempt
    // can no longer write.
    const int64_t old_fence = r.Int(3);
    CONVERGE_ASSIGN_OR_RETURN(
        int64_t n, tx.Exec("UPDATE idempotency_keys SET fence = fence + 1, lease_until = $1, "
                           "updated_at = $2 WHERE scope = $3 AND key = $4 AND fence = $5",
                           lease_until, now, req.scope, req.key, old_fence));
    if (n != 1) return tl::unexpected(AbortedError("concurrent takeover"));
    b.kind = Begun::Kind::kResumed;
    b.lease.fence = old_fence + 1;
    b.lease.recovery_point = r.Text(4);
    b.lease.recovery_data = r.Text(5);
    return b;
  });
}

Status IdempotencyKeys::CheckFence(Tx& tx, const KeyLease& lease, int64_t now) {
  // Renews the lease and, by the row it updates, proves the fence is still ours. On
  // PostgreSQL the UPDATE also locks the row until commit, so no takeover can slip in.
  CONVERGE_ASSIGN_OR_RETURN(
      int64_t n, tx.Exec("UPDATE idempotency_keys SET lease_until = $1, updated_at = $2 "
                         "WHERE scope = $3 AND key = $4 AND fence = $5 "
                         "AND status = 'in_progress'",
                         now + options_.lease.count(), now, lease.scope, lease.key,
                         lease.fence));
  if (n != 1) return Fenced(lease);
  return OkStatus();
}

Status IdempotencyKeys::StoreResponse(Tx& tx, const KeyLease& lease, const StoredResponse& r,
                                      int64_t now) {
  CONVERGE_ASSIGN_OR_RETURN(
      int64_t n,
      tx.Exec("UPDATE idempotency_keys SET status = 'completed', recovery_point = 'finished', "
              "response_status = $1, response_headers = $2, response_body = $3, "
              "lease_until = $4, updated_at = $4 "
              "WHERE scope = $5 AND key = $6 AND fence = $7 AND status = 'in_progress'",
              r.status, EncodeHeaders(r.headers), Blob{r.body}, now, lease.scope, lease.key,
              lease.fence));
  if (n != 1) return Fenced(lease);
  return OkStatus();
}

Status IdempotencyKeys::Advance(KeyLease& lease, std::string recovery_point,
                                std::string recovery_data,
                                const std::function<Status(Tx&)>& fn) {
  if (recovery_point.empty() || recovery_point == "finished") {
    return InvalidArgumentError("recovery point must be non-empty and not 'finished'");
  }
  CONVERGE_RETURN_IF_ERROR(db_.Transact([&](Tx& tx) -> Status {
    const int64_t now = clock_->NowMillis();
    CONVERGE_RETURN_IF_ERROR(CheckFence(tx, lease, now));
    CONVERGE_RETURN_IF_ERROR(fn(tx));
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
    CONVERGE_RETURN_IF_ERROR(CheckFence(tx, lease, now));
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
