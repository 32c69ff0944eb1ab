#include "converge/status.h"

#include <array>

namespace converge {
namespace {

constexpr std::array<std::string_view, 17> kNames = {
    "ok",        "cancelled",          "unknown",           "invalid_argument",
    "deadline_exceeded", "not_found",  "already_exists",    "permission_denied",
    "resource_exhausted", "failed_precondition", "aborted", "out_of_range",
    "unimplemented", "internal",       "unavailable",       "data_loss",
    "unauthenticated",
};

}  // namespace

std::string_view StatusCodeName(StatusCode code) {
  auto i = static_cast<size_t>(code);
  return i < kNames.size() ? kNames[i] : "unknown";
}

bool ParseStatusCode(std::string_view name, StatusCode* code) {
  for (size_t i = 0; i < kNames.size(); ++i) {
    if (kNames[i] == name) {
      *code = static_cast<StatusCode>(i);
      return true;
    }
  }
  return false;
}

bool IsTransient(StatusCode code) {
  switch (code) {
    case StatusCode::kUnavailable:
    case StatusCode::kDeadlineExceeded:
    case StatusCode::kResourceExhausted:
    case StatusCode::kAborted:
      return true;
    default:
      return false;
  }
}

const std::string& Status::Empty() {
  static const std::string* const kEmpty = new std::string();  // never destroyed
  return *kEmpty;
}

std::string Status::ToString() const {
  if (ok()) return "ok";
  std::string s(StatusCodeName(code()));
  if (!reason().empty()) s += " (" + reason() + ")";
  if (!message().empty()) s += ": " + message();
  return s;
}

#define CONVERGE_DEFINE_ERROR_(Name, Code) \
  Status Name(std::string message) { return Status(StatusCode::Code, std::move(message)); }
CONVERGE_DEFINE_ERROR_(CancelledError, kCancelled)
CONVERGE_DEFINE_ERROR_(UnknownError, kUnknown)
CONVERGE_DEFINE_ERROR_(InvalidArgumentError, kInvalidArgument)
CONVERGE_DEFINE_ERROR_(DeadlineExceededError, kDeadlineExceeded)
CONVERGE_DEFINE_ERROR_(NotFoundError, kNotFound)
CONVERGE_DEFINE_ERROR_(AlreadyExistsError, kAlreadyExists)
CONVERGE_DEFINE_ERROR_(PermissionDeniedError, kPermissionDenied)
CONVERGE_DEFINE_ERROR_(ResourceExhaustedError, kResourceExhausted)
CONVERGE_DEFINE_ERROR_(FailedPreconditionError, kFailedPrecondition)
CONVERGE_DEFINE_ERROR_(AbortedError, kAborted)
CONVERGE_DEFINE_ERROR_(OutOfRangeError, kOutOfRange)
CONVERGE_DEFINE_ERROR_(UnimplementedError, kUnimplemented)
CONVERGE_DEFINE_ERROR_(InternalError, kInternal)
CONVERGE_DEFINE_ERROR_(UnavailableError, kUnavailable)
CONVERGE_DEFINE_ERROR_(DataLossError, kDataLoss)
CONVERGE_DEFINE_ERROR_(UnauthenticatedError, kUnauthenticated)
#undef CONVERGE_DEFINE_ERROR_

}  // namespace converge
