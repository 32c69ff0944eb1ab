// Fuzz target: the JSON body of POST /v1/payments, through the real route. The payments
// service (examples/payments) runs in this process once, on port 0, with a SQLite store in
// a temporary directory (on tmpfs when /dev/shm is there) and the stand-in payment and mail
// providers (harness/providers.h) running and reachable, so no answer has an excuse to be
// 5xx. Each input is POSTed with a fresh Idempotency-Key, handed to the service's routes
// in this thread (Service::Handle, as a worker of its HTTP server would run them): the
// HTTP layer in front is the target http_request, and a socket and three thread hand-offs
// per request would only slow this one down. The parser alone, at a parser's speed, is the
// target payment_request.
//
// Properties:
//  - never a 5xx;
//  - a body valid by the documented rules (docs/design/http-idempotency.md, "The request":
//    a JSON object, `amount` an integer in 1..100,000,000, `currency` one of EUR USD GBP CHF
//    JPY, `customer_id` and `order_id` 1-64 of [A-Za-z0-9_-]) is captured (201); any other
//    is 400 `invalid-request`, as problem+json;
//  - a 201 body is a JSON Payment that echoes the request's amount, currency, customer_id
//    and order_id, with status "captured";
//  - the same key and the same body again replays the stored answer byte for byte, with
//    Idempotent-Replayed: true; with whitespace around the body too (the fingerprint is
//    that of the canonical body); a 400 stored nothing and is answered 400 again.
#include <cstdlib>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "converge/http.h"
#include "converge/webhook.h"
#include "examples/payments/service.h"
#include "fuzz/fuzz_support.h"
#include "fuzz/payment_oracle.h"
#include "harness/providers.h"
#include "src/core/crypto.h"

namespace converge::fuzz {
namespace {

using json = nlohmann::json;

constexpr const char* kApiKey = "sk_fuzz_tenant";

class Harness {
 public:
  Harness() {
    spdlog::set_level(spdlog::level::off);
    psp_ = std::make_unique<harness::FakePsp>(
        harness::ProviderOptions{.db_path = dir_.File("psp.db")});
    mail_ = std::make_unique<harness::FakeMail>(
        harness::ProviderOptions{.db_path = dir_.File("mail.db")});
    FUZZ_CHECK(psp_->Start().ok(), std::string("cannot start the payment provider"));
    FUZZ_CHECK(mail_->Start().ok(), std::string("cannot start the mail provider"));
    payments::ServiceConfig c;
    c.port = 0;
    c.worker_threads = 4;  // one request at a time comes in
    c.db = "sqlite:" + dir_.File("service.db");
    c.synchronous_full = false;  // a power cut is not what this target is about
    c.api_keys = {{kApiKey, "fuzz"}};
    c.admin_token = internal::RandomHex(16);
    c.webhook_secrets = {webhook::NewSecret()};
    c.psp_url = "http://127.0.0.1:" + std::to_string(psp_->port());
    c.mail_url = "http://127.0.0.1:" + std::to_string(mail_->port());
    c.log_level = "off";
    service_ = std::make_unique<payments::Service>(c);
    const Status st = service_->Start();
    FUZZ_CHECK(st.ok(), "cannot start the payments service: " + st.ToString());
    run_ = internal::RandomHex(8);
  }

  // In reverse order of start, before the process's static objects go.
  void Stop() {
    service_.reset();
    mail_.reset();
    psp_.reset();
  }

  void Run(std::string_view body) {
    const std::string key = "fuzz-" + run_ + "-" + std::to_string(++requests_);
    const http::Response first = Post(key, body);
    const json request = json::parse(body, nullptr, /*allow_exceptions=*/false);
    const std::string context =
        " for " + Quote(body) + ": " + std::to_string(first.status) + " " + Quote(first.body);
    FUZZ_CHECK(first.status < 500, "a 5xx answer" + context);
    const bool valid = !request.is_discarded() && ValidPayment(request);
    if (!valid) {
      FUZZ_CHECK(first.status == 400, "an invalid body was not refused" + context);
      const json problem = json::parse(first.body, nullptr, false);
      FUZZ_CHECK(problem.is_object() &&
                     problem.value("type", "") == "urn:converge:problem:invalid-request",
                 "the refusal is not an invalid-request problem" + context);
      const http::Response again = Post(key, body);
      FUZZ_CHECK(again.status == 400 && again.Header("Idempotent-Replayed") == nullptr,
                 "a refused body was stored" + context);
      return;
    }
    FUZZ_CHECK(first.status == 201, "a valid payment was not captured" + context);
    const json payment = json::parse(first.body, nullptr, false);
    FUZZ_CHECK(payment.is_object() && payment.value("status", "") == "captured" &&
                   payment.value("amount", json()) == request["amount"] &&
                   payment.value("currency", json()) == request["currency"] &&
                   payment.value("customer_id", json()) == request["customer_id"] &&
                   payment.value("order_id", json()) == request["order_id"] &&
                   payment.value("id", json()).is_string(),
               "the payment does not echo the request" + context);
    const std::string padded = PadWithWhitespace(body);
    for (const std::string& retry : {std::string(body), padded}) {
      const http::Response replay = Post(key, retry);
      const std::string* replayed = replay.Header("Idempotent-Replayed");
      FUZZ_CHECK(replay.status == first.status && replay.body == first.body &&
                     replayed != nullptr && *replayed == "true",
                 "the retry " + Quote(retry) + " got " + std::to_string(replay.status) + " " +
                     Quote(replay.body) + context);
    }
  }

 private:
  http::Response Post(const std::string& key, std::string_view body) {
    http::Request request{.method = "POST",
                          .target = "/v1/payments",
                          .path = "/v1/payments",
                          .headers = {{"Host", "127.0.0.1"},
                                      {"Authorization", std::string("Bearer ") + kApiKey},
                                      {"Idempotency-Key", key},
                                      {"Content-Type", "application/json"},
                                      {"Content-Length", std::to_string(body.size())}},
                          .body = std::string(body),
                          .remote = "127.0.0.1"};
    http::Response response = service_->Handle(request);
    // The server writes any other status as a 500.
    FUZZ_CHECK(response.status >= 100 && response.status <= 599,
               "status " + std::to_string(response.status) + " for " + Quote(body));
    return response;
  }

  TempDir dir_{/*in_memory=*/true};  // the three SQLite stores
  std::unique_ptr<harness::FakePsp> psp_;
  std::unique_ptr<harness::FakeMail> mail_;
  std::unique_ptr<payments::Service> service_;
  std::string run_;
  int64_t requests_ = 0;
};

Harness* harness = nullptr;

}  // namespace
}  // namespace converge::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using converge::fuzz::harness;
  if (harness == nullptr) {
    harness = new converge::fuzz::Harness();
    // Stops the service, its threads and providers before the process's statics are
    // destroyed; registered after their construction, so it runs before their destructors.
    std::atexit([] {
      harness->Stop();
      delete harness;
    });
  }
  harness->Run(converge::fuzz::AsText(data, size));
  return 0;
}
