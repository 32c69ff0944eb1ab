#include "src/core/store_uri.h"

#include <algorithm>
#include <charconv>

namespace converge::internal {

Result<StoreUri> StoreUri::Parse(std::string_view uri) {
  StoreUri out;
  const size_t q = uri.find('?');
  out.base_ = std::string(uri.substr(0, q));
  if (q == std::string_view::npos) return out;
  std::string_view query = uri.substr(q + 1);
  while (!query.empty()) {
    const size_t amp = query.find('&');
    const std::string_view segment = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
    if (segment.empty()) continue;
    const size_t eq = segment.find('=');
    if (eq == std::string_view::npos || eq == 0) {
      return tl::unexpected(InvalidArgumentError(
          "store URI: parameter '" + std::string(segment) + "' is not name=value"));
    }
    out.params_.emplace_back(std::string(segment.substr(0, eq)),
                             std::string(segment.substr(eq + 1)));
  }
  return out;
}

bool StoreUri::Has(std::string_view name) const {
  return std::any_of(params_.begin(), params_.end(),
                     [&](const auto& p) { return p.first == name; });
}

Result<std::optional<std::string>> StoreUri::Take(std::string_view name) {
  std::optional<std::string> value;
  for (auto it = params_.begin(); it != params_.end();) {
    if (it->first != name) {
      ++it;
      continue;
    }
    if (value) {
      return tl::unexpected(InvalidArgumentError("store URI: parameter '" + std::string(name) +
                                                 "' is given more than once"));
    }
    value = std::move(it->second);
    it = params_.erase(it);
  }
  return value;
}

Result<std::optional<int64_t>> StoreUri::TakeInt(std::string_view name, int64_t min,
                                                 int64_t max) {
  CONVERGE_ASSIGN_OR_RETURN(std::optional<std::string> text, Take(name));
  if (!text) return std::optional<int64_t>();
  int64_t v = 0;
  const auto [end, ec] = std::from_chars(text->data(), text->data() + text->size(), v);
  if (ec != std::errc() || end != text->data() + text->size() || v < min || v > max) {
    return tl::unexpected(InvalidArgumentError(
        "store URI: " + std::string(name) + "=" + *text + " is not an integer from " +
        std::to_string(min) + " to " + std::to_string(max)));
  }
  return std::optional<int64_t>(v);
}

Result<std::optional<bool>> StoreUri::TakeBool(std::string_view name) {
  CONVERGE_ASSIGN_OR_RETURN(std::optional<std::string> text, Take(name));
  if (!text) return std::optional<bool>();
  if (*text == "true") return std::optional<bool>(true);
  if (*text == "false") return std::optional<bool>(false);
  return tl::unexpected(InvalidArgumentError("store URI: " + std::string(name) + "=" + *text +
                                             " must be true or false"));
}

std::string StoreUri::Rest() const {
  std::string out;
  for (const auto& [name, value] : params_) {
    if (!out.empty()) out += '&';
    out += name + "=" + value;
  }
  return out;
}

Status StoreUri::RefuseRest(std::string_view store,
                            std::span<const std::string_view> known) const {
  if (params_.empty()) return OkStatus();
  std::string unknown, takes;
  for (const auto& p : params_) unknown += (unknown.empty() ? "'" : ", '") + p.first + "'";
  for (std::string_view k : known) takes += (takes.empty() ? "" : ", ") + std::string(k);
  return InvalidArgumentError(std::string(store) + " URI: unknown parameter" +
                              (params_.size() > 1 ? "s " : " ") + unknown + "; it takes " +
                              takes);
}

}  // namespace converge::internal
