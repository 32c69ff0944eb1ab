// How SQLite's writer hands a finished call back (src/store/sqlite/handoff.h): a waiter
// returns once Done was called, whether it was woken early or not, spun or slept again;
// it may destroy the Handoff as soon as Wait returns; and when the writer wakes a batch's
// first caller early (EarlyWake).
#include "src/store/sqlite/handoff.h"

#include <atomic>
#include <chrono>
#include <memory>
#include <random>
#include <thread>

#include <gtest/gtest.h>

namespace converge {
namespace {

using internal::EarlyWake;
using internal::Handoff;
using std::chrono::milliseconds;

constexpr std::chrono::hours kSpinForever{1};

TEST(Handoff, WaiterNotWokenEarlyReturnsOnceDone) {
  Handoff h;
  ASSERT_TRUE(h.ready());
  std::atomic<bool> done_called{false};
  std::atomic<bool> returned{false};
  std::thread waiter([&] {
    h.Wait(kSpinForever);
    EXPECT_TRUE(done_called.load());
    returned = true;
  });
  std::this_thread::sleep_for(milliseconds(20));
  EXPECT_FALSE(returned.load());
  done_called = true;
  h.Done();
  waiter.join();
  EXPECT_TRUE(returned.load());
}

TEST(Handoff, DoneBeforeTheEarlyWakeIsTakenLeavesOnePostToTake) {
  // On one thread: the early wake's post is still pending when Done comes, so Done posts
  // nothing more, and Wait takes the one post and returns at once.
  Handoff h;
  h.WakeEarly();
  EXPECT_EQ(h.PostsPending(), 1);
  h.Done();
  EXPECT_EQ(h.PostsPending(), 1);
  h.Wait(kSpinForever);
  EXPECT_EQ(h.PostsPending(), 0);
}

TEST(Handoff, WakeEarlyAfterAnotherWakeEarlyPostsNothingMore) {
  // A second post would be left for nobody: Done then finds the waiter woken early and
  // posts nothing, and the waiter returns after one sem_wait.
  Handoff h;
  h.WakeEarly();
  h.WakeEarly();
  EXPECT_EQ(h.PostsPending(), 1);
  h.Done();
  h.Wait(kSpinForever);
  EXPECT_EQ(h.PostsPending(), 0);
}

TEST(Handoff, WakeEarlyFromTwoThreadsPostsOnce) {
  for (int round = 0; round < 200; ++round) {
    Handoff h;
    std::thread a([&] { h.WakeEarly(); });
    std::thread b([&] { h.WakeEarly(); });
    a.join();
    b.join();
    ASSERT_EQ(h.PostsPending(), 1);
    h.Done();
    h.Wait(kSpinForever);
    ASSERT_EQ(h.PostsPending(), 0);
  }
}

// Waits until the waiter has taken the early wake's post (and so spins, or is about to).
void WaitForTheEarlyWakeToBeTaken(const Handoff& h) {
  while (h.PostsPending() != 0) std::this_thread::sleep_for(std::chrono::microseconds(100));
}

TEST(Handoff, WaiterWokenEarlySpinsUntilDone) {
  // The waiter spins for up to an hour: only Done's store, seen by the spin, ends it
  // (Done posts nothing to a spinning waiter).
  Handoff h;
  std::atomic<bool> done_called{false};
  h.WakeEarly();
  std::thread waiter([&] {
    h.Wait(kSpinForever);
    EXPECT_TRUE(done_called.load());
  });
  WaitForTheEarlyWakeToBeTaken(h);
  std::this_thread::sleep_for(milliseconds(20));
  done_called = true;
  h.Done();
  EXPECT_EQ(h.PostsPending(), 0);  // nothing posted to a spinning waiter
  waiter.join();
}

TEST(Handoff, WaiterThatSpunItsLimitSleepsAgainUntilDone) {
  Handoff h;
  std::atomic<bool> done_called{false};
  std::atomic<bool> returned{false};
  h.WakeEarly();
  std::thread waiter([&] {
    h.Wait(milliseconds(1));
    EXPECT_TRUE(done_called.load());
    returned = true;
  });
  WaitForTheEarlyWakeToBeTaken(h);
  std::this_thread::sleep_for(milliseconds(50));  // well past the spin
  EXPECT_FALSE(returned.load());
  done_called = true;
  h.Done();
  waiter.join();
  EXPECT_TRUE(returned.load());
}

// The waiter deletes the Handoff as soon as Wait returns, as Transact's stack frame
// does, while the writer's calls may still be returning: under ASan or TSan a post or
// a store after the waiter may have returned is a use after free. Each round wakes the
// waiter early or not, and spins for a limit from nothing to longer than the writer's
// pause; what the writer wrote before Done is what the waiter reads.
TEST(Handoff, WaiterMayDestroyItAsSoonAsWaitReturns) {
  constexpr int kRounds = 20000;
  std::atomic<Handoff*> slot{nullptr};
  std::atomic<int> finished{0};
  int payload = 0;  // written by the writer before Done, read by the waiter after Wait
  std::thread waiter([&] {
    std::mt19937 rng(7);
    for (int round = 1; round <= kRounds; ++round) {
      Handoff* h;
      while ((h = slot.load(std::memory_order_acquire)) == nullptr) std::this_thread::yield();
      slot.store(nullptr, std::memory_order_relaxed);
      const std::chrono::microseconds spins[] = {std::chrono::microseconds(0),
                                                 std::chrono::microseconds(1),
                                                 std::chrono::microseconds(100000)};
      h->Wait(spins[rng() % 3]);
      EXPECT_EQ(payload, round);
      EXPECT_EQ(h->PostsPending(), 0) << "round " << round;
      delete h;
      finished.store(round, std::memory_order_release);
    }
  });
  std::mt19937 rng(11);
  for (int round = 1; round <= kRounds; ++round) {
    auto* h = new Handoff;
    ASSERT_TRUE(h->ready());
    slot.store(h, std::memory_order_release);
    const unsigned how = rng() % 4;
    if (how != 0) h->WakeEarly();
    if (how == 2) std::this_thread::yield();
    if (how == 3) std::this_thread::sleep_for(std::chrono::microseconds(rng() % 200));
    payload = round;
    h->Done();  // h may be gone once this returns
    while (finished.load(std::memory_order_acquire) != round) std::this_thread::yield();
  }
  waiter.join();
}

TEST(EarlyWake, WakesTheFirstOfSeveralCallersWithACpuToSpare) {
  EarlyWake w(2, milliseconds(2));
  EXPECT_TRUE(w.ShouldWake(2));
  EXPECT_TRUE(w.ShouldWake(64));
}

TEST(EarlyWake, NeverWakesTheOnlyCallerOfABatch) {
  // Measured: a lone caller woken early made serial creates about 20% slower in one pair
  // (the writer's own wake-up after the commit then found its CPU taken by the spinning
  // caller).
  EarlyWake w(8, milliseconds(2));
  EXPECT_FALSE(w.ShouldWake(1));
  EXPECT_FALSE(w.ShouldWake(0));
}

TEST(EarlyWake, NeverWakesWithOneCpu) {
  EarlyWake w(1, milliseconds(2));
  EXPECT_FALSE(w.ShouldWake(64));
}

TEST(EarlyWake, NeverWakesWithoutASpin) {
  EarlyWake w(8, std::chrono::microseconds(0));
  EXPECT_FALSE(w.ShouldWake(64));
}

TEST(EarlyWake, StopsWhileWaitsTakeMoreThanHalfTheSpinAndStartsAgainAfter) {
  EarlyWake w(2, milliseconds(2));
  for (int i = 0; i < 20; ++i) w.Waited(0.0004);
  EXPECT_TRUE(w.ShouldWake(8));
  for (int i = 0; i < 20; ++i) w.Waited(0.005);  // a slow disk: 5 ms commits
  EXPECT_FALSE(w.ShouldWake(8));
  w.Waited(0.0004);  // one quick commit does not bring the average under 1 ms
  EXPECT_FALSE(w.ShouldWake(8));
  for (int i = 0; i < 40; ++i) w.Waited(0.0004);
  EXPECT_TRUE(w.ShouldWake(8));
}

TEST(EarlyWake, OneLongCommitAmongQuickOnesKeepsItOn) {
  // A checkpoint inside one commit (100 ms) counts as twice the spin, 4 ms: the average
  // of 0.4 ms commits rises to 0.85 ms, under half the spin.
  EarlyWake w(2, milliseconds(2));
  for (int i = 0; i < 40; ++i) w.Waited(0.0004);
  w.Waited(0.1);
  EXPECT_TRUE(w.ShouldWake(8));
  w.Waited(0.1);  // two in a row turn it off, until quick commits bring it down again
  EXPECT_FALSE(w.ShouldWake(8));
  for (int i = 0; i < 10; ++i) w.Waited(0.0004);
  EXPECT_TRUE(w.ShouldWake(8));
}

}  // namespace
}  // namespace converge
