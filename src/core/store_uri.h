// The query of a store URI ("sqlite:app.db?readers=8&synchronous=normal"): where each
// backend's own settings travel (Database::Open). Internal to converge: the registry and
// the backends use it.
//
// Parameters are `name=value` pairs joined by '&' after the URI's first '?'. Values are
// taken as written (converge's own are numbers and words; percent-decoding is libpq's
// business for its parameters, which are handed to it untouched).
#ifndef CONVERGE_CORE_STORE_URI_H_
#define CONVERGE_CORE_STORE_URI_H_

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "converge/status.h"

namespace converge::internal {

class StoreUri {
 public:
  // Splits `uri` at its first '?'. Empty segments ("a=1&&b=2", a trailing '&') are
  // skipped. Errors: kInvalidArgument for a segment without '=' or with an empty name.
  static Result<StoreUri> Parse(std::string_view uri);

  // The URI before its '?'.
  const std::string& base() const { return base_; }
  bool Has(std::string_view name) const;

  // Takes parameter `name` out, if given; the Take* functions check its value. Errors
  // (kInvalidArgument, naming `name`): given more than once; a value out of range or not
  // one of the words allowed.
  Result<std::optional<std::string>> Take(std::string_view name);
  Result<std::optional<int64_t>> TakeInt(std::string_view name, int64_t min, int64_t max);
  Result<std::optional<bool>> TakeBool(std::string_view name);  // true | false

  // The parameters not taken, in their order, joined again ("a=1&b=2"; "" for none).
  std::string Rest() const;
  // kInvalidArgument naming every parameter not taken and listing `known`, the
  // parameters `store` takes; OK when every parameter was taken.
  Status RefuseRest(std::string_view store, std::span<const std::string_view> known) const;

 private:
  std::string base_;
  std::vector<std::pair<std::string, std::string>> params_;
};

}  // namespace converge::internal

#endif  // CONVERGE_CORE_STORE_URI_H_
