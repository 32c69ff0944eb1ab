#include "converge/failpoint.h"

#include <atomic>
#include <thread>

#include <gtest/gtest.h>

#include "tests/unit/test_util.h"

namespace converge {
namespace {

class FailpointTest : public ::testing::Test {
 protected:
  void TearDown() override { ASSERT_TRUE(failpoint::Configure("").ok()); }
};

TEST_F(FailpointTest, OffByDefault) {
  EXPECT_TRUE(failpoint::Hit("relay.after_publish_before_mark").ok());
  EXPECT_EQ(failpoint::Hits("relay.after_publish_before_mark"), 0);
}

TEST_F(FailpointTest, ErrorActionReturnsTheConfiguredCode) {
  ASSERT_TRUE(failpoint::Configure("a=error(unavailable, broker down)").ok());
  Status s = failpoint::Hit("a");
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_EQ(s.message(), "broker down");
  EXPECT_EQ(s.reason(), "failpoint");
  EXPECT_TRUE(failpoint::Hit("b").ok());
}

TEST_F(FailpointTest, StartAtAndCountLimitFiring) {
  ASSERT_TRUE(failpoint::Configure("a=error(aborted)@2*2").ok());
  EXPECT_TRUE(failpoint::Hit("a").ok());
  EXPECT_FALSE(failpoint::Hit("a").ok());
  EXPECT_FALSE(failpoint::Hit("a").ok());
  EXPECT_TRUE(failpoint::Hit("a").ok());
  EXPECT_EQ(failpoint::Hits("a"), 4);
}

TEST_F(FailpointTest, DelayReturnsOk) {
  ASSERT_TRUE(failpoint::Configure("a=delay(1); b = off").ok());
  EXPECT_TRUE(failpoint::Hit("a").ok());
  EXPECT_TRUE(failpoint::Hit("b").ok());
}

TEST_F(FailpointTest, CrashKillsTheProcess) {
  int status = testing::RunInChild([] {
    (void)failpoint::Configure("x=crash");
    (void)failpoint::Hit("x");
    return true;
  });
  EXPECT_TRUE(testing::KilledBySigkill(status));
}

TEST_F(FailpointTest, PauseHoldsTheThreadUntilReleased) {
  ASSERT_TRUE(failpoint::Configure("p=pause@2*1").ok());
  EXPECT_TRUE(failpoint::Hit("p").ok());  // first hit: not yet
  std::atomic<bool> passed{false};
  std::thread t([&] {
    EXPECT_TRUE(failpoint::Hit("p").ok());
    passed = true;
  });
  ASSERT_TRUE(failpoint::WaitPaused("p", std::chrono::seconds(20)));
  EXPECT_EQ(failpoint::Paused("p"), 1);
  EXPECT_FALSE(passed.load());
  EXPECT_EQ(failpoint::Release("p"), 1);
  t.join();
  EXPECT_TRUE(passed.load());
  EXPECT_EQ(failpoint::Paused("p"), 0);
  EXPECT_TRUE(failpoint::Hit("p").ok());  // *1: fired once
}

TEST_F(FailpointTest, WaitPausedTimesOutAndConfigureReleasesEveryone) {
  ASSERT_TRUE(failpoint::Configure("p=pause").ok());
  EXPECT_FALSE(failpoint::WaitPaused("p", std::chrono::milliseconds(10)));
  std::thread a([] { EXPECT_TRUE(failpoint::Hit("p").ok()); });
  std::thread b([] { EXPECT_TRUE(failpoint::Hit("p").ok()); });
  ASSERT_TRUE(failpoint::WaitPaused("p", std::chrono::seconds(20), 2));
  ASSERT_TRUE(failpoint::Configure("").ok());
  a.join();
  b.join();
  EXPECT_EQ(failpoint::Paused("p"), 0);
}

TEST_F(FailpointTest, BadSpecsAreRejectedAndKeepThePreviousConfiguration) {
  ASSERT_TRUE(failpoint::Configure("keep=error(internal)").ok());
  for (const char* bad :
       {"noequals", "=crash", "a=explode", "a=error(nope)", "a=error(ok)", "a=delay(x)",
        "a=pause(1)", "a=crash@0", "a=crash*x", "a=error(internal"}) {
    Status s = failpoint::Configure(bad);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_EQ(failpoint::Hit("keep").code(), StatusCode::kInternal);
}

}  // namespace
}  // namespace converge
