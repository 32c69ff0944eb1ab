// Input checks shared by core components. Internal to converge.
#ifndef CONVERGE_CORE_VALIDATE_H_
#define CONVERGE_CORE_VALIDATE_H_

#include <string>
#include <string_view>

#include "converge/status.h"

namespace converge::internal {

// kInvalidArgument unless `value` is 1..max_bytes bytes with no ASCII control character.
inline Status ValidateToken(std::string_view what, std::string_view value, size_t max_bytes) {
  if (value.empty()) return InvalidArgumentError(std::string(what) + " is empty");
  if (value.size() > max_bytes) {
    return InvalidArgumentError(std::string(what) + " is " + std::to_string(value.size()) +
                                " bytes; the limit is " + std::to_string(max_bytes));
  }
  for (unsigned char c : value) {
    if (c < 0x20 || c == 0x7f) {
      return InvalidArgumentError(std::string(what) + " contains a control character");
    }
  }
  return OkStatus();
}

}  // namespace converge::internal

#endif  // CONVERGE_CORE_VALIDATE_H_
