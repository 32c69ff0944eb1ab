// When SQLite's writer polls its queue before it sleeps (src/store/sqlite/arrival_poll.h):
// only after a batch of several callers, only with more than one CPU to run on, and after
// a fruitless poll not for 1, 2, 4, ... up to 64 such batches, until a poll finds a call.
#include "src/store/sqlite/arrival_poll.h"

#include <sched.h>

#include <thread>

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

// What the writer is built with (SqliteDatabase's arrival_poll_): the CPUs of the thread
// that opens the store, which the writer inherits. Pinned to one CPU, it never polls.
TEST(ArrivalPoll, AThreadPinnedToOneCpuCountsOneAndNeverPolls) {
  int counted = -1;
  bool polled = false;
  std::thread pinned([&] {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(sched_getcpu(), &one);
    ASSERT_EQ(sched_setaffinity(0, sizeof(one), &one), 0);
    counted = internal::CpusToRunOn();
    ArrivalPoll poll(internal::CpusToRunOn());
    for (int i = 0; i < 100; ++i) polled = polled || poll.ShouldPoll(true);
  });
  pinned.join();
  EXPECT_EQ(counted, 1);
  EXPECT_FALSE(polled);
  // This thread's mask is its own: unpinned, it counts what the machine lets it use.
  EXPECT_GE(internal::CpusToRunOn(), 1);
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
