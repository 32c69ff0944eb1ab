// Rules the payments service's routes share: what an id, a currency and an amount may be,
// and which answers of the payment provider decide nothing.
#ifndef CONVERGE_EXAMPLES_PAYMENTS_RULES_H_
#define CONVERGE_EXAMPLES_PAYMENTS_RULES_H_

#include <cctype>
#include <cstdint>
#include <set>
#include <string>

namespace payments {

inline const std::set<std::string> kCurrencies = {"EUR", "USD", "GBP", "CHF", "JPY"};
inline constexpr int64_t kMaxAmount = 100'000'000;  // minor units

// 1-64 characters of [A-Za-z0-9_-].
inline bool ValidId(const std::string& s) {
  if (s.empty() || s.size() > 64) return false;
  for (char c : s) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_')) return false;
  }
  return true;
}

// Only a definite answer is a decision. A 5xx, or a provider's "not decided yet" (408
// timeout, 409 key in use, 423 locked, 425 too early, 429 slow down) leaves the outcome
// unknown: the charge may still happen, so the caller retries with the same key.
inline bool ProviderUndecided(int status) {
  return status >= 500 || status == 408 || status == 409 || status == 423 || status == 425 ||
         status == 429;
}

}  // namespace payments

#endif  // CONVERGE_EXAMPLES_PAYMENTS_RULES_H_
