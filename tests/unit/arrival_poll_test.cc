// When SQLite's writer polls its queue before it sleeps (src/store/sqlite/arrival_poll.h):
// only after a batch of several callers, only with more than one CPU to run on (by the
// affinity mask and the cgroup CPU quota: CgroupCpuQuota, CpusOf), and after
// a fruitless poll not for 1, 2, 4, ... up to 64 such batches, until a poll finds a call.
#include "src/store/sqlite/arrival_poll.h"

#include <sched.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>

#include "tests/unit/test_util.h"

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

// A cgroup file under `root`, its directories made.
void WriteCgroupFile(const std::string& root, const std::string& dir, const std::string& name,
                     const std::string& text) {
  std::filesystem::create_directories(root + dir);
  std::ofstream(root + dir + "/" + name) << text;
}

TEST(CgroupCpuQuota, ReadsCgroupV2AndTakesTheSmallestOfTheCgroupAndItsAncestors) {
  testing::TempDir root;
  WriteCgroupFile(root.path(), "", "cpu.max", "max 100000\n");
  WriteCgroupFile(root.path(), "/a", "cpu.max", "250000 100000\n");
  WriteCgroupFile(root.path(), "/a/b", "cpu.max", "max 100000\n");
  EXPECT_EQ(internal::CgroupCpuQuota("0::/a/b\n", root.path()), 2.5);
  WriteCgroupFile(root.path(), "/a/b", "cpu.max", "150000 100000\n");
  EXPECT_EQ(internal::CgroupCpuQuota("0::/a/b\n", root.path()), 1.5);
  EXPECT_EQ(internal::CgroupCpuQuota("0::/\n", root.path()), std::nullopt);
}

TEST(CgroupCpuQuota, ReadsCgroupV1UnderItsControllersMount) {
  testing::TempDir root;
  WriteCgroupFile(root.path(), "/cpu,cpuacct/svc", "cpu.cfs_quota_us", "50000\n");
  WriteCgroupFile(root.path(), "/cpu,cpuacct/svc", "cpu.cfs_period_us", "100000\n");
  const std::string cgroups = "4:memory:/svc\n3:cpu,cpuacct:/svc\n0::/\n";
  EXPECT_EQ(internal::CgroupCpuQuota(cgroups, root.path()), 0.5);
  // -1 is no quota.
  WriteCgroupFile(root.path(), "/cpu,cpuacct/svc", "cpu.cfs_quota_us", "-1\n");
  EXPECT_EQ(internal::CgroupCpuQuota(cgroups, root.path()), std::nullopt);
}

// Inside a container /proc/self/cgroup may name the host's path, which its own mount
// does not hold: the mount's root is the container's cgroup.
TEST(CgroupCpuQuota, ReadsTheMountsRootWhenThePathIsNotThere) {
  testing::TempDir root;
  WriteCgroupFile(root.path(), "/cpu", "cpu.cfs_quota_us", "200000");
  WriteCgroupFile(root.path(), "/cpu", "cpu.cfs_period_us", "100000");
  EXPECT_EQ(internal::CgroupCpuQuota("2:cpu:/docker/0123abcd\n", root.path()), 2.0);
  WriteCgroupFile(root.path(), "", "cpu.max", "100000 100000");
  EXPECT_EQ(internal::CgroupCpuQuota("0::/system.slice/x.service\n", root.path()), 1.0);
}

// With systemd inside a container that has no cgroup namespace, the file names the
// host's path, of which the container's mount holds only the part below its own root.
TEST(CgroupCpuQuota, DropsTheHostsPartOfANestedPath) {
  testing::TempDir root;
  WriteCgroupFile(root.path(), "/cpu", "cpu.cfs_quota_us", "200000");
  WriteCgroupFile(root.path(), "/cpu", "cpu.cfs_period_us", "100000");
  WriteCgroupFile(root.path(), "/cpu/system.slice/x.service", "cpu.cfs_quota_us", "50000");
  WriteCgroupFile(root.path(), "/cpu/system.slice/x.service", "cpu.cfs_period_us", "100000");
  EXPECT_EQ(internal::CgroupCpuQuota("3:cpu:/docker/0123abcd/system.slice/x.service\n",
                                     root.path()),
            0.5);
}

// A cgroup whose last task is exiting is named "PATH (deleted)": its ancestors count.
TEST(CgroupCpuQuota, ReadsTheAncestorsOfADeletedCgroup) {
  testing::TempDir root;
  WriteCgroupFile(root.path(), "/a", "cpu.max", "150000 100000");
  EXPECT_EQ(internal::CgroupCpuQuota("0::/a/b (deleted)\n", root.path()), 1.5);
}

// from_chars reads "nan" and "inf"; the kernel takes quotas worth billions of CPUs.
TEST(CgroupCpuQuota, IgnoresNonFiniteQuotasAndCountsHugeOnesAsNoLimit) {
  testing::TempDir root;
  for (const char* text : {"nan 100000", "inf 100000", "100000 nan", "-inf 100000"}) {
    WriteCgroupFile(root.path(), "", "cpu.max", text);
    EXPECT_EQ(internal::CgroupCpuQuota("0::/\n", root.path()), std::nullopt) << text;
  }
  WriteCgroupFile(root.path(), "", "cpu.max", "17592186044415 1000");
  const std::optional<double> huge = internal::CgroupCpuQuota("0::/\n", root.path());
  ASSERT_TRUE(huge.has_value());
  EXPECT_GT(*huge, 1e10);
  EXPECT_EQ(internal::CpusOf(64, huge), 64);
  EXPECT_EQ(internal::CpusOf(64, 1e300), 64);
}

TEST(CgroupCpuQuota, IgnoresWhatItCannotRead) {
  testing::TempDir root;
  EXPECT_EQ(internal::CgroupCpuQuota("", root.path()), std::nullopt);
  EXPECT_EQ(internal::CgroupCpuQuota("0::/\n", root.path() + "/absent"), std::nullopt);
  EXPECT_EQ(internal::CgroupCpuQuota("garbage\n::\n", root.path()), std::nullopt);
  for (const char* text : {"", "max", "abc 100000", "100000", "100000 0", "0 100000",
                           "12x 100000"}) {
    WriteCgroupFile(root.path(), "", "cpu.max", text);
    EXPECT_EQ(internal::CgroupCpuQuota("0::/\n", root.path()), std::nullopt) << text;
  }
}

TEST(CpusOf, NarrowsTheMaskToTheQuotasWholeCpusAndCountsAtLeastOne) {
  EXPECT_EQ(internal::CpusOf(4, std::nullopt), 4);
  EXPECT_EQ(internal::CpusOf(8, 1.5), 1);  // never polls: ArrivalPoll needs 2
  EXPECT_EQ(internal::CpusOf(8, 2.0), 2);
  EXPECT_EQ(internal::CpusOf(2, 6.0), 2);
  EXPECT_EQ(internal::CpusOf(8, 0.25), 1);
  EXPECT_EQ(internal::CpusOf(0, std::nullopt), 1);
}

}  // namespace
}  // namespace converge
