#include "converge/metrics.h"

#include <limits>

#include <gtest/gtest.h>

namespace converge {
namespace {

TEST(Metrics, RendersCountersGaugesAndHistograms) {
  Metrics m;
  m.Describe("requests_total", "counter", "Requests.");
  m.Add("requests_total", {{"route", "/v1/payments"}, {"status", "201"}});
  m.Add("requests_total", {{"route", "/v1/payments"}, {"status", "201"}}, 2);
  m.Set("backlog", {}, 7);
  m.Describe("batch", "histogram", "Batch sizes.");
  m.Observe("batch", {}, 3, {1, 4, 16});
  m.Observe("batch", {}, 20, {1, 4, 16});
  std::string out = m.Render();
  EXPECT_NE(out.find("# TYPE requests_total counter"), std::string::npos);
  EXPECT_NE(out.find("requests_total{route=\"/v1/payments\",status=\"201\"} 3"), std::string::npos);
  EXPECT_NE(out.find("backlog 7"), std::string::npos);
  EXPECT_NE(out.find("batch_bucket{le=\"1\"} 0"), std::string::npos);
  EXPECT_NE(out.find("batch_bucket{le=\"4\"} 1"), std::string::npos);
  EXPECT_NE(out.find("batch_bucket{le=\"+Inf\"} 2"), std::string::npos);
  EXPECT_NE(out.find("batch_sum 23"), std::string::npos);
  EXPECT_EQ(m.Value("requests_total", {{"route", "/v1/payments"}, {"status", "201"}}), 3);
}

TEST(Metrics, EscapesLabelValues) {
  Metrics m;
  m.Add("x", {{"l", "a\"b\\c\nd"}});
  EXPECT_NE(m.Render().find(R"(x{l="a\"b\\c\nd"} 1)"), std::string::npos);
}

// # HELP escapes backslash and line feed (a raw line feed would end the comment early and
// make the rest a malformed sample); values that are not finite use the format's words.
TEST(Metrics, EscapesHelpAndWritesNonFiniteValues) {
  Metrics m;
  m.Describe("g", "gauge", "first line\nsecond \\ part");
  m.Set("g", {{"k", "inf"}}, std::numeric_limits<double>::infinity());
  m.Set("g", {{"k", "nan"}}, std::numeric_limits<double>::quiet_NaN());
  const std::string out = m.Render();
  EXPECT_NE(out.find("# HELP g first line\\nsecond \\\\ part\n"), std::string::npos) << out;
  EXPECT_NE(out.find("g{k=\"inf\"} +Inf\n"), std::string::npos) << out;
  EXPECT_NE(out.find("g{k=\"nan\"} NaN\n"), std::string::npos) << out;
}

// A histogram kept elsewhere (the store's batch sizes) is rendered as it is given.
TEST(Metrics, SetHistogramRendersCumulativeBucketsAndTheCount) {
  Metrics m;
  m.Describe("batch", "histogram", "Batch sizes.");
  m.SetHistogram("batch", {}, {1, 3, 7}, {5, 8, 8}, 40, 9);
  const std::string out = m.Render();
  EXPECT_NE(out.find("batch_bucket{le=\"1\"} 5\n"), std::string::npos) << out;
  EXPECT_NE(out.find("batch_bucket{le=\"7\"} 8\n"), std::string::npos) << out;
  EXPECT_NE(out.find("batch_bucket{le=\"+Inf\"} 9\n"), std::string::npos) << out;
  EXPECT_NE(out.find("batch_sum 40\nbatch_count 9\n"), std::string::npos) << out;
}

}  // namespace
}  // namespace converge
