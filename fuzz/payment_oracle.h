// The documented rules of a POST /v1/payments body (docs/design/http-idempotency.md, "The
// request"), written independently of the service's parser (examples/payments/
// payment_request.cc): the oracle of the fuzz targets payment_request and payment_body.
//
// Thread safety: free functions without shared state.
#ifndef CONVERGE_FUZZ_PAYMENT_ORACLE_H_
#define CONVERGE_FUZZ_PAYMENT_ORACLE_H_

#include <cctype>
#include <cstdint>
#include <set>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace converge::fuzz {

// 1-64 characters of [A-Za-z0-9_-], as a JSON string.
inline bool ValidPaymentId(const nlohmann::json& v) {
  if (!v.is_string()) return false;
  const std::string& s = v.get_ref<const std::string&>();
  if (s.empty() || s.size() > 64) return false;
  for (unsigned char c : s) {
    if (!(std::isalnum(c) || c == '-' || c == '_')) return false;
  }
  return true;
}

// A JSON object; `amount` an integer in 1..100,000,000; `currency` one of EUR USD GBP CHF
// JPY; `customer_id` and `order_id` valid ids. Other members do not matter.
inline bool ValidPayment(const nlohmann::json& j) {
  static const std::set<std::string> kCurrencies = {"EUR", "USD", "GBP", "CHF", "JPY"};
  if (!j.is_object()) return false;
  auto amount = j.find("amount");
  if (amount == j.end()) return false;
  if (amount->is_number_unsigned()) {
    const uint64_t a = amount->get<uint64_t>();
    if (a < 1 || a > 100'000'000) return false;
  } else if (amount->is_number_integer()) {
    const int64_t a = amount->get<int64_t>();
    if (a < 1 || a > 100'000'000) return false;
  } else {
    return false;
  }
  auto currency = j.find("currency");
  if (currency == j.end() || !currency->is_string() ||
      kCurrencies.count(currency->get<std::string>()) == 0) {
    return false;
  }
  auto customer = j.find("customer_id");
  auto order = j.find("order_id");
  return customer != j.end() && order != j.end() && ValidPaymentId(*customer) &&
         ValidPaymentId(*order);
}

// `body` with whitespace around it that leaves its meaning alone: after a UTF-8 byte order
// mark, which a JSON parser skips only first.
inline std::string PadWithWhitespace(std::string_view body) {
  const size_t bom = body.substr(0, 3) == "\xEF\xBB\xBF" ? 3 : 0;
  return std::string(body.substr(0, bom)) + "\n " + std::string(body.substr(bom)) + "\t\r\n";
}

}  // namespace converge::fuzz

#endif  // CONVERGE_FUZZ_PAYMENT_ORACLE_H_
