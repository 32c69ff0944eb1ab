// When SQLite's writer polls its queue before it sleeps (src/store/sqlite/arrival_poll.h):
// only after a batch of several callers, only with more than one CPU, and after a
// fruitless poll not for 1, 2, 4, ... up to 64 such batches, until a poll finds a call.
#include "src/store/sqlite/arrival_poll.h"

#include <gtest/gtest.h>

namespace converge {
namespace {

using internal::ArrivalPoll;

// Batches of several callers until the next poll is asked for; -1 if none in 1,000.
int BatchesUntilAPoll(ArrivalPoll& poll) {
  for (int n = 1; n <= 1000; ++n) {
    if (poll.ShouldPoll(true)) return n;
  }
  return -1;
}

TEST(ArrivalPoll, PollsAfterEveryBatchOfSeveralCallersWhilePollsFindCalls) {
  ArrivalPoll poll(2);
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(poll.ShouldPoll(true)) << "batch " << i;
    poll.Polled(true);
  }
}

TEST(ArrivalPoll, NeverPollsAfterABatchOfOneCaller) {
  ArrivalPoll poll(8);
  for (int i = 0; i < 100; ++i) EXPECT_FALSE(poll.ShouldPoll(false));
  // Nor do such batches use up the skipping that a fruitless poll began.
  ASSERT_TRUE(poll.ShouldPoll(true));
  poll.Polled(false);
  for (int i = 0; i < 10; ++i) EXPECT_FALSE(poll.ShouldPoll(false));
  EXPECT_EQ(BatchesUntilAPoll(poll), 2);
}

TEST(ArrivalPoll, NeverPollsWithOneCpu) {
  ArrivalPoll poll(1);
  for (int i = 0; i < 100; ++i) EXPECT_FALSE(poll.ShouldPoll(true));
}

TEST(ArrivalPoll, SkipsTwiceAsManyBatchesAfterEachFruitlessPollUpToTheBound) {
  ArrivalPoll poll(2);
  ASSERT_TRUE(poll.ShouldPoll(true));
  poll.Polled(false);
  // Skipped k batches, then the (k+1)th polls.
  for (int skipped : {1, 2, 4, 8, 16, 32, 64, 64, 64}) {
    EXPECT_EQ(BatchesUntilAPoll(poll), skipped + 1);
    poll.Polled(false);
  }
}

TEST(ArrivalPoll, APollThatFindsACallEndsTheSkipping) {
  ArrivalPoll poll(2);
  ASSERT_TRUE(poll.ShouldPoll(true));
  poll.Polled(false);
  EXPECT_EQ(BatchesUntilAPoll(poll), 2);
  poll.Polled(false);
  EXPECT_EQ(BatchesUntilAPoll(poll), 3);
  poll.Polled(true);
  EXPECT_EQ(BatchesUntilAPoll(poll), 1);
  poll.Polled(true);
  // A miss after a hit starts the series over: one batch skipped.
  EXPECT_EQ(BatchesUntilAPoll(poll), 1);
  poll.Polled(false);
  EXPECT_EQ(BatchesUntilAPoll(poll), 2);
}

}  // namespace
}  // namespace converge
