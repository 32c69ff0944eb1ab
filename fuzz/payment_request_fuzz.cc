// Fuzz target: the body parser of POST /v1/payments itself, payments::ParsePayment
// (examples/payments/payment_request.cc), at the speed of a parser. The whole input is the
// body. (fuzz/payment_body_fuzz.cc drives the same parser through the service's route.)
//
// Properties:
//  - accepted exactly when valid by the documented rules (fuzz/payment_oracle.h, written
//    independently of the parser); a refusal is kInvalidArgument with a message;
//  - an accepted request echoes the document: amount, currency, customer_id and order_id
//    are the members' values;
//  - its canonical form (CanonicalPaymentJson) parses back to the same request, is its own
//    canonical form, is the DOM's compact dump of the four members, and when the body has
//    no other members shares its fingerprint (RequestFingerprint canonicalises both alike);
//  - whitespace around a JSON body changes neither the parser's answer nor the body's
//    fingerprint.
#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "converge/idempotency.h"
#include "examples/payments/payment_request.h"
#include "fuzz/fuzz_support.h"
#include "fuzz/payment_oracle.h"

namespace converge::fuzz {
namespace {

using json = nlohmann::json;

std::string Fingerprint(std::string_view body) {
  return RequestFingerprint("POST", "/v1/payments", body);
}

void Check(std::string_view body) {
  const json doc = json::parse(body, nullptr, /*allow_exceptions=*/false);
  const bool valid = !doc.is_discarded() && ValidPayment(doc);
  const auto parsed = payments::ParsePayment(body);
  const std::string context = " for " + Quote(body);
  FUZZ_CHECK(parsed.has_value() == valid,
             std::string(valid ? "a valid body was refused: " + parsed.error().ToString()
                               : "an invalid body was accepted") +
                 context);
  if (!doc.is_discarded()) {
    // Whitespace around JSON is no part of its meaning.
    const std::string padded = PadWithWhitespace(body);
    FUZZ_CHECK(Fingerprint(padded) == Fingerprint(body),
               "whitespace changed the fingerprint" + context);
    const auto again = payments::ParsePayment(padded);
    FUZZ_CHECK(again.has_value() == parsed.has_value() && (!again || *again == *parsed),
               "whitespace changed the parser's answer" + context);
  }
  if (!parsed) {
    FUZZ_CHECK(parsed.error().code() == StatusCode::kInvalidArgument &&
                   !parsed.error().message().empty(),
               "a refusal is not kInvalidArgument with a message: " + parsed.error().ToString() +
                   context);
    return;
  }
  const payments::PaymentRequest& p = *parsed;
  FUZZ_CHECK(json(p.amount) == doc["amount"] && json(p.currency) == doc["currency"] &&
                 json(p.customer_id) == doc["customer_id"] &&
                 json(p.order_id) == doc["order_id"],
             "the request does not echo the body" + context);
  const std::string canonical = payments::CanonicalPaymentJson(p);
  const auto reparsed = payments::ParsePayment(canonical);
  FUZZ_CHECK(reparsed.has_value() && *reparsed == p,
             "the canonical form " + Quote(canonical) + " is not the same request" + context);
  FUZZ_CHECK(payments::CanonicalPaymentJson(*reparsed) == canonical,
             "the canonical form " + Quote(canonical) + " is not a fixed point" + context);
  const json members = {{"amount", doc["amount"]},
                        {"currency", doc["currency"]},
                        {"customer_id", doc["customer_id"]},
                        {"order_id", doc["order_id"]}};
  FUZZ_CHECK(members.dump() == canonical,
             "the canonical form " + Quote(canonical) + " is not the members' dump " +
                 Quote(members.dump()) + context);
  if (doc.size() == 4) {
    FUZZ_CHECK(Fingerprint(canonical) == Fingerprint(body),
               "the canonical form " + Quote(canonical) + " has another fingerprint" + context);
  }
}

}  // namespace
}  // namespace converge::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  converge::fuzz::Check(converge::fuzz::AsText(data, size));
  return 0;
}
