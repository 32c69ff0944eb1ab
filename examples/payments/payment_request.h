// The body of POST /v1/payments: what a valid one is and its canonical form. Factored out
// of the service so that the route and the fuzz target (fuzz/payment_request_fuzz.cc) call
// the same parser.
//
// The rules (docs/design/http-idempotency.md, "The request"): a JSON object; `amount` an
// integer in 1..100,000,000 minor units; `currency` one of EUR USD GBP CHF JPY;
// `customer_id` and `order_id` 1-64 of [A-Za-z0-9_-]. Other members are ignored.
//
// Thread safety: free functions without shared state.
#ifndef CONVERGE_EXAMPLES_PAYMENTS_PAYMENT_REQUEST_H_
#define CONVERGE_EXAMPLES_PAYMENTS_PAYMENT_REQUEST_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "converge/status.h"

namespace payments {

// A validated POST /v1/payments body.
struct PaymentRequest {
  int64_t amount = 0;
  std::string currency, customer_id, order_id;

  bool operator==(const PaymentRequest&) const = default;
};

// The body, validated by the rules above. kInvalidArgument with a message for the client
// (it names the first rule the body breaks) for anything else, including bodies that are
// not JSON.
converge::Result<PaymentRequest> ParsePayment(std::string_view body);

// The request as a JSON object of exactly its four members, keys sorted, no whitespace: a
// body ParsePayment accepts as the same request, and the form RequestFingerprint
// canonicalises every equivalent body to.
std::string CanonicalPaymentJson(const PaymentRequest& p);

}  // namespace payments

#endif  // CONVERGE_EXAMPLES_PAYMENTS_PAYMENT_REQUEST_H_
