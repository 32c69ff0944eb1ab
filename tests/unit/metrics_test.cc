#include "converge/metrics.h"

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

}  // namespace
}  // namespace converge
