#include "converge/webhook.h"

#include <gtest/gtest.h>

namespace converge {
namespace {

// The example from the Standard Webhooks specification.
constexpr const char* kSecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
constexpr const char* kId = "msg_p5jXN8AQM9LWM0D4loKWxJek";
constexpr int64_t kTs = 1614265330;
constexpr const char* kBody = R"({"test": 2432232314})";
constexpr const char* kSig = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

TEST(Webhook, SignMatchesTheSpecificationVector) {
  auto sig = webhook::Sign(kSecret, kId, kTs, kBody);
  ASSERT_TRUE(sig) << sig.error().ToString();
  EXPECT_EQ(*sig, kSig);
}

TEST(Webhook, VerifyAcceptsAValidSignatureWithinTolerance) {
  std::vector<std::string> secrets = {kSecret};
  EXPECT_TRUE(webhook::Verify(secrets, kId, std::to_string(kTs), kSig, kBody, kTs + 60).ok());
}

TEST(Webhook, VerifyAcceptsAnyOfSeveralSecretsAndSignatures) {
  std::string other = webhook::NewSecret();
  std::vector<std::string> secrets = {other, kSecret};  // rotation: old and new
  std::string header = "v1,bm90IGl0 v2,whatever " + std::string(kSig);
  EXPECT_TRUE(webhook::Verify(secrets, kId, std::to_string(kTs), header, kBody, kTs).ok());
}

TEST(Webhook, VerifyRejectsTamperingStaleFutureAndMissing) {
  std::vector<std::string> secrets = {kSecret};
  auto reason = [&](std::string_view id, std::string_view ts, std::string_view sig,
                    std::string_view body, int64_t now) {
    Status s = webhook::Verify(secrets, id, ts, sig, body, now);
    EXPECT_EQ(s.code(), StatusCode::kUnauthenticated);
    return s.reason();
  };
  const std::string ts = std::to_string(kTs);
  EXPECT_EQ(reason(kId, ts, kSig, R"({"test": 2432232315})", kTs), "bad_signature");
  EXPECT_EQ(reason("msg_other", ts, kSig, kBody, kTs), "bad_signature");
  EXPECT_EQ(reason(kId, ts, "v1,AAAA", kBody, kTs), "bad_signature");
  EXPECT_EQ(reason(kId, ts, "v1,not base64!", kBody, kTs), "bad_signature");
  EXPECT_EQ(reason(kId, ts, kSig, kBody, kTs + 301), "stale_timestamp");
  EXPECT_EQ(reason(kId, ts, kSig, kBody, kTs - 301), "future_timestamp");
  EXPECT_EQ(reason(kId, "12x", kSig, kBody, kTs), "bad_timestamp");
  EXPECT_EQ(reason("", ts, kSig, kBody, kTs), "missing_headers");
  EXPECT_EQ(reason(kId, ts, "", kBody, kTs), "missing_headers");
  std::vector<std::string> wrong = {webhook::NewSecret()};
  EXPECT_EQ(webhook::Verify(wrong, kId, ts, kSig, kBody, kTs).reason(), "bad_signature");
}

TEST(Webhook, MalformedSecretIsAnError) {
  EXPECT_FALSE(webhook::DecodeSecret("whsec_!!!"));
  EXPECT_FALSE(webhook::DecodeSecret("whsec_"));
  EXPECT_FALSE(webhook::Sign("whsec_abc", "id", 1, "b"));
}

TEST(Webhook, Base64RoundTrips) {
  for (std::string s : {"", "f", "fo", "foo", "foob", "fooba", "foobar"}) {
    auto back = webhook::Base64Decode(webhook::Base64Encode(s));
    ASSERT_TRUE(back);
    EXPECT_EQ(*back, s);
  }
  EXPECT_EQ(webhook::Base64Encode("foobar"), "Zm9vYmFy");
}

// Found by fuzz/webhook_fuzz.cc: OpenSSL decodes '=' as zero bits wherever it stands, and
// the decoder let it stand second to last before a digit ("AB=C" gave two made-up bytes).
TEST(Webhook, Base64AcceptsPaddingOnlyAtTheEnd) {
  for (const char* bad : {"AB=C", "A=BC", "=ABC", "====", "A===", "AB==AB==", "QQ=A"}) {
    EXPECT_FALSE(webhook::Base64Decode(bad)) << bad;
  }
  EXPECT_EQ(webhook::Base64Decode("QQ==").value_or("?"), "A");
  EXPECT_EQ(webhook::Base64Decode("QUE=").value_or("?"), "AA");
  EXPECT_EQ(webhook::Base64Decode("").value_or("?"), "");
}

// Vectors computed with Python's hmac module, independently of this code.
TEST(Webhook, StripeSignaturesVerifyWithinToleranceAndUnderRotation) {
  const std::string body = R"({"id":"evt_1"})";
  const std::string sig = "c89214b5b5da833daed6f0b8c5bb6bd58cea9022bd80ccc78230f3942d632925";
  const std::vector<std::string> secrets = {"whsec_old", "whsec_test"};
  int64_t t = 0;
  EXPECT_TRUE(webhook::VerifyStripe(secrets, "t=1700000000,v1=" + sig, body, 1700000010,
                                    std::chrono::minutes(5), &t)
                  .ok());
  EXPECT_EQ(t, 1700000000);
  EXPECT_TRUE(
      webhook::VerifyStripe(secrets, "t=1700000000,v1=00ff,v0=x,v1=" + sig, body, 1700000000).ok());
  auto reason = [&](const std::string& header, const std::string& b, int64_t now) {
    return webhook::VerifyStripe(secrets, header, b, now).reason();
  };
  EXPECT_EQ(reason("t=1700000000,v1=" + sig, body + " ", 1700000000), "bad_signature");
  EXPECT_EQ(reason("t=1700000001,v1=" + sig, body, 1700000000), "bad_signature");
  EXPECT_EQ(reason("t=1700000000,v1=" + sig, body, 1700000000 + 301), "stale_timestamp");
  EXPECT_EQ(reason("t=1700000000,v1=" + sig, body, 1700000000 - 301), "future_timestamp");
  EXPECT_EQ(reason("v1=" + sig, body, 1700000000), "bad_timestamp");
  EXPECT_EQ(reason("", body, 1700000000), "missing_headers");
  EXPECT_EQ(webhook::VerifyStripe(std::vector<std::string>{"whsec_old"}, "t=1700000000,v1=" + sig,
                                  body, 1700000000)
                .reason(),
            "bad_signature");
}

TEST(Webhook, GitHubSignaturesVerify) {
  const std::string body = R"({"zen":"hi"})";
  const std::string sig = "3559d0aae4ca9044d1282762c0b6adb3485fd40793ab2d47df22369b8e0dc882";
  const std::vector<std::string> secrets = {"gh-secret"};
  EXPECT_TRUE(webhook::VerifyGitHub(secrets, "sha256=" + sig, body).ok());
  EXPECT_EQ(webhook::VerifyGitHub(secrets, "sha256=" + sig, body + "\n").reason(), "bad_signature");
  EXPECT_EQ(webhook::VerifyGitHub(secrets, "sha1=" + sig, body).reason(), "bad_signature");
  EXPECT_EQ(webhook::VerifyGitHub(secrets, "", body).reason(), "missing_headers");
  EXPECT_EQ(webhook::HmacSha256Hex("gh-secret", body), sig);
}

}  // namespace
}  // namespace converge
