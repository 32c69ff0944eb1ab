#include "converge/status.h"

#include <gtest/gtest.h>

namespace converge {
namespace {

TEST(Status, DefaultIsOk) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.ToString(), "ok");
}

TEST(Status, TransientCodesAreExactlyTheRetryableOnes) {
  EXPECT_TRUE(IsTransient(StatusCode::kUnavailable));
  EXPECT_TRUE(IsTransient(StatusCode::kDeadlineExceeded));
  EXPECT_TRUE(IsTransient(StatusCode::kResourceExhausted));
  EXPECT_TRUE(IsTransient(StatusCode::kAborted));
  EXPECT_FALSE(IsTransient(StatusCode::kInvalidArgument));
  EXPECT_FALSE(IsTransient(StatusCode::kFailedPrecondition));
  EXPECT_FALSE(IsTransient(StatusCode::kInternal));
  EXPECT_FALSE(IsTransient(StatusCode::kUnknown));
}

TEST(Status, CodeNamesRoundTrip) {
  for (int i = 0; i <= 16; ++i) {
    auto code = static_cast<StatusCode>(i);
    StatusCode back;
    ASSERT_TRUE(ParseStatusCode(StatusCodeName(code), &back));
    EXPECT_EQ(back, code);
  }
  StatusCode c;
  EXPECT_FALSE(ParseStatusCode("nope", &c));
}

TEST(Status, ToStringCarriesReasonAndMessage) {
  Status s(StatusCode::kUnavailable, "busy", "in_flight");
  EXPECT_EQ(s.ToString(), "unavailable (in_flight): busy");
  EXPECT_EQ(std::move(s).WithRetryAfter(1500).retry_after_ms(), 1500);
}

Result<int> Half(int x) {
  if (x % 2) return tl::unexpected(InvalidArgumentError("odd"));
  return x / 2;
}

Result<int> Quarter(int x) {
  CONVERGE_ASSIGN_OR_RETURN(int h, Half(x));
  CONVERGE_ASSIGN_OR_RETURN(int q, Half(h));
  return q;
}

Status CheckEven(int x) {
  CONVERGE_RETURN_IF_ERROR(Half(x));
  return OkStatus();
}

TEST(Status, MacrosPropagateErrors) {
  EXPECT_EQ(*Quarter(8), 2);
  EXPECT_EQ(Quarter(6).error().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(CheckEven(2).ok());
  EXPECT_EQ(CheckEven(3).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace converge
