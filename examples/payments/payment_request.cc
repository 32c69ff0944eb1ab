#include "examples/payments/payment_request.h"

#include <utility>

#include <nlohmann/json.hpp>

#include "examples/payments/rules.h"

namespace payments {

using converge::InvalidArgumentError;
using json = nlohmann::json;

converge::Result<PaymentRequest> ParsePayment(std::string_view body) {
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return tl::unexpected(InvalidArgumentError("body is not valid JSON"));
  if (!j.is_object()) return tl::unexpected(InvalidArgumentError("body must be a JSON object"));
  PaymentRequest p;
  auto amount = j.find("amount");
  if (amount == j.end() || !amount->is_number_integer()) {
    return tl::unexpected(InvalidArgumentError("amount must be an integer (minor units)"));
  }
  if (amount->is_number_unsigned()
          ? amount->get<uint64_t>() > static_cast<uint64_t>(kMaxAmount)
          : (amount->get<int64_t>() < 1 || amount->get<int64_t>() > kMaxAmount)) {
    return tl::unexpected(
        InvalidArgumentError("amount must be between 1 and " + std::to_string(kMaxAmount)));
  }
  p.amount = amount->get<int64_t>();
  if (p.amount < 1) {
    return tl::unexpected(
        InvalidArgumentError("amount must be between 1 and " + std::to_string(kMaxAmount)));
  }
  for (auto [name, out] : {std::pair{"currency", &p.currency}, {"customer_id", &p.customer_id},
                           {"order_id", &p.order_id}}) {
    auto it = j.find(name);
    if (it == j.end() || !it->is_string()) {
      return tl::unexpected(InvalidArgumentError(std::string(name) + " must be a string"));
    }
    *out = it->get<std::string>();
  }
  if (!kCurrencies.count(p.currency)) {
    return tl::unexpected(InvalidArgumentError("unknown currency '" + p.currency + "'"));
  }
  if (!ValidId(p.customer_id) || !ValidId(p.order_id)) {
    return tl::unexpected(InvalidArgumentError(
        "customer_id and order_id must be 1-64 characters of [A-Za-z0-9_-]"));
  }
  return p;
}

std::string CanonicalPaymentJson(const PaymentRequest& p) {
  // nlohmann's object is a std::map: dump() writes the keys sorted.
  const json j = {{"amount", p.amount},
                  {"currency", p.currency},
                  {"customer_id", p.customer_id},
                  {"order_id", p.order_id}};
  return j.dump();
}

}  // namespace payments
