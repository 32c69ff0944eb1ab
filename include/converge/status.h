// Status and Result: how every converge call reports failure.
//
// No exception crosses the public API. A call that can fail returns `Status` (no value) or
// `Result<T>` (a value or a Status). The code decides what the caller does next; the
// message is for people. The codes are a subset of Abseil's, with Abseil's retry rules:
//
//   code                 meaning                                   who retries what
//   kOk                  success                                   -
//   kCancelled           the caller or a shutdown cancelled it     nobody
//   kUnknown             an error with no better code              nobody (permanent)
//   kInvalidArgument     the input is wrong, whatever the state    nobody (permanent)
//   kDeadlineExceeded    a deadline passed; the outcome is unknown retry the call (transient)
//   kNotFound            the thing asked for does not exist        nobody
//   kAlreadyExists       a unique key is taken                     nobody
//   kPermissionDenied    not allowed                               nobody
//   kResourceExhausted   a quota, queue or pool is full            retry later (transient)
//   kFailedPrecondition  the state forbids it (fenced, mismatch)   nobody until state changes
//   kAborted             a concurrency conflict                    retry the whole transaction
//   kOutOfRange          past the end                              nobody
//   kUnimplemented       not supported here                        nobody
//   kInternal            an invariant broke                        nobody
//   kUnavailable         a store or broker is unreachable or busy  retry the call (transient)
//   kDataLoss            unrecoverable corruption                  nobody
//   kUnauthenticated     no valid credentials or signature         nobody
//
// `IsTransient()` is the one place that encodes "retry with backoff" for every layer
// (HTTP, consumers, sagas). A Status may carry a short machine-readable `reason` (for
// example "in_flight" or "fingerprint_mismatch") so a layer above can tell apart two
// failures that share a code.
//
// Thread safety: Status and Result are values; distinct objects may be used concurrently.
#ifndef CONVERGE_STATUS_H_
#define CONVERGE_STATUS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include <tl/expected.hpp>

namespace converge {

enum class StatusCode : int {
  kOk = 0,
  kCancelled = 1,
  kUnknown = 2,
  kInvalidArgument = 3,
  kDeadlineExceeded = 4,
  kNotFound = 5,
  kAlreadyExists = 6,
  kPermissionDenied = 7,
  kResourceExhausted = 8,
  kFailedPrecondition = 9,
  kAborted = 10,
  kOutOfRange = 11,
  kUnimplemented = 12,
  kInternal = 13,
  kUnavailable = 14,
  kDataLoss = 15,
  kUnauthenticated = 16,
};

// "kUnavailable" -> "unavailable"; used in logs, dead letters and problem+json.
std::string_view StatusCodeName(StatusCode code);
// The inverse of StatusCodeName; returns false for an unknown name.
bool ParseStatusCode(std::string_view name, StatusCode* code);

// True for the codes whose failure may go away by itself: kUnavailable,
// kDeadlineExceeded, kResourceExhausted, kAborted.
bool IsTransient(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message, std::string_view reason = {})
      : rep_(std::make_shared<const Rep>(Rep{code, std::move(message), std::string(reason), 0})) {}
  // Lets CONVERGE_RETURN_IF_ERROR return the same expression from functions returning
  // Status and from functions returning Result<T>.
  Status(tl::unexpected<Status> u) : Status(std::move(u.value())) {}  // NOLINT
  // A moved-from Status keeps its value: moving shares the error's representation.
  Status(const Status&) = default;
  Status(Status&& other) noexcept : rep_(other.rep_) {}
  Status& operator=(const Status&) = default;
  Status& operator=(Status&& other) noexcept {
    rep_ = other.rep_;
    return *this;
  }

  bool ok() const { return code() == StatusCode::kOk; }
  StatusCode code() const { return rep_ ? rep_->code : StatusCode::kOk; }
  const std::string& message() const { return rep_ ? rep_->message : Empty(); }
  const std::string& reason() const { return rep_ ? rep_->reason : Empty(); }
  bool transient() const { return IsTransient(code()); }
  // A hint, in milliseconds, of when a retry may succeed (0: none). HTTP maps it to
  // Retry-After.
  int64_t retry_after_ms() const { return rep_ ? rep_->retry_after_ms : 0; }
  Status&& WithRetryAfter(int64_t millis) && {
    Rep rep = rep_ ? *rep_ : Rep{};
    rep.retry_after_ms = millis;
    rep_ = std::make_shared<const Rep>(std::move(rep));
    return std::move(*this);
  }

  // "unavailable: database is locked"
  std::string ToString() const;

  friend bool operator==(const Status& a, const Status& b) {
    return a.code() == b.code() && a.message() == b.message() && a.reason() == b.reason();
  }

 private:
  struct Rep {
    StatusCode code = StatusCode::kOk;
    std::string message;
    std::string reason;
    int64_t retry_after_ms = 0;
  };
  static const std::string& Empty();

  // Null when OK (made and passed on without an allocation, as most are); an error's
  // representation is immutable and shared by its copies.
  std::shared_ptr<const Rep> rep_;
};

inline Status OkStatus() { return Status(); }

// The machine-readable reasons (Status::reason()) that callers branch on. Compare with
// these constants, never with string literals; each is documented where it is returned.
namespace reason {
// idempotency.h: the same key was used for a different request (HTTP 422).
inline constexpr std::string_view kFingerprintMismatch = "fingerprint_mismatch";
// idempotency.h: another attempt holds a live lease on the key (HTTP 409 + Retry-After).
inline constexpr std::string_view kInFlight = "in_flight";
// idempotency.h: this attempt's lease was taken over; it may no longer write.
inline constexpr std::string_view kFenced = "fenced";
// idempotency.h: Execute met a key that an interrupted multi-phase request holds.
inline constexpr std::string_view kMultiPhase = "multi_phase";
// database.h: the connection broke during COMMIT; the transaction may or may not have
// committed (kUnavailable).
inline constexpr std::string_view kCommitOutcomeUnknown = "commit_outcome_unknown";
// database.h: a statement waited longer than the store's lock timeout for a lock that
// another transaction holds (PostgreSQL `lock_timeout_ms`; kUnavailable, retry later).
inline constexpr std::string_view kLockTimeout = "lock_timeout";
// dead_letters.h: replay or discard of a dead letter that is no longer parked.
inline constexpr std::string_view kNotParked = "not_parked";
// database.h: the store's schema is newer than this binary.
inline constexpr std::string_view kSchemaTooNew = "schema_too_new";
// failpoint.h: an error injected by a failpoint.
inline constexpr std::string_view kFailpoint = "failpoint";
// transport.h: Publisher::PublishBatch did not attempt this event (kAborted).
inline constexpr std::string_view kNotAttempted = "not_attempted";
}  // namespace reason
Status CancelledError(std::string message);
Status UnknownError(std::string message);
Status InvalidArgumentError(std::string message);
Status DeadlineExceededError(std::string message);
Status NotFoundError(std::string message);
Status AlreadyExistsError(std::string message);
Status PermissionDeniedError(std::string message);
Status ResourceExhaustedError(std::string message);
Status FailedPreconditionError(std::string message);
Status AbortedError(std::string message);
Status OutOfRangeError(std::string message);
Status UnimplementedError(std::string message);
Status InternalError(std::string message);
Status UnavailableError(std::string message);
Status DataLossError(std::string message);
Status UnauthenticatedError(std::string message);

template <class T>
using Result = tl::expected<T, Status>;

// The error of `r`, or OK.
template <class T>
Status StatusOf(const Result<T>& r) {
  return r ? Status() : r.error();
}

namespace internal {
inline const Status& AsStatus(const Status& s) { return s; }
template <class T>
Status AsStatus(const Result<T>& r) {
  return r ? Status() : r.error();
}
}  // namespace internal

}  // namespace converge

#define CONVERGE_CONCAT_INNER_(a, b) a##b
#define CONVERGE_CONCAT_(a, b) CONVERGE_CONCAT_INNER_(a, b)

// Returns from the enclosing function (returning Status or Result<T>) when `expr`, a
// Status or a Result<T>, is not OK.
#define CONVERGE_RETURN_IF_ERROR(expr)                                                \
  do {                                                                                \
    ::converge::Status _converge_st = ::converge::internal::AsStatus(expr);           \
    if (!_converge_st.ok()) return ::tl::unexpected<::converge::Status>(              \
        std::move(_converge_st));                                                     \
  } while (0)

// `CONVERGE_ASSIGN_OR_RETURN(auto x, F());` declares x from F()'s value, or returns F()'s
// error from the enclosing function.
#define CONVERGE_ASSIGN_OR_RETURN(lhs, expr) \
  CONVERGE_ASSIGN_OR_RETURN_IMPL_(CONVERGE_CONCAT_(_converge_r, __LINE__), lhs, expr)
#define CONVERGE_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr)                            \
  auto tmp = (expr);                                                               \
  if (!tmp) return ::tl::unexpected<::converge::Status>(std::move(tmp).error());  \
  lhs = std::move(*tmp)

#endif  // CONVERGE_STATUS_H_
