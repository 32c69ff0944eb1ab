// When SQLite's writer polls its queue before it sleeps. Internal to converge.
#ifndef CONVERGE_STORE_SQLITE_ARRIVAL_POLL_H_
#define CONVERGE_STORE_SQLITE_ARRIVAL_POLL_H_

#include <algorithm>
#include <optional>
#include <string>

namespace converge::internal {

// Once a batch of several callers has committed and its chain of wake-ups is started,
// none of them is queued until the first woken calls again, and a writer asleep on its
// condition variable then takes a wake-up of its own to run that call (on a virtual
// machine the hypervisor's, of an idle CPU: tens of µs). So the writer polls the queue
// for a while first, and sleeps only if nothing came: a bet that several callers call
// again soon, as they do under load (docs/design/transaction-boundary.md).
//
// A woken caller that shares the writer's CPU waits out the poll. So the writer does not
// poll after a batch of one caller, nor with one CPU, nor, after a poll that found
// nothing, for the next 1, 2, 4, ... up to kMaxSkipped batches of several callers:
// callers that pause between calls (a blocking route's few clients) would otherwise pay
// a fruitless poll a batch; a poll that finds a call ends the skipping.
//
// The writer thread's own state: not thread-safe. Also what the benchmark's r3 (the
// handoff with no library code, bench/idempotency_bench.cc) polls by.
class ArrivalPoll {
 public:
  static constexpr int kMaxSkipped = 64;

  explicit ArrivalPoll(int cpus) : cpus_(cpus) {}

  // Whether to poll before the next sleep, the batch just committed having woken several
  // callers or not.
  bool ShouldPoll(bool several_callers) {
    if (!several_callers || cpus_ < 2) return false;
    if (to_skip_ > 0) {
      --to_skip_;
      return false;
    }
    return true;
  }

  // What the poll ShouldPoll asked for found: a call queued, or nothing by its end.
  void Polled(bool found) {
    if (found) {
      skip_after_miss_ = 0;
    } else {
      skip_after_miss_ = std::clamp(skip_after_miss_ * 2, 1, kMaxSkipped);
      to_skip_ = skip_after_miss_;
    }
  }

 private:
  const int cpus_;
  int to_skip_ = 0;          // batches of several callers still to go without a poll
  int skip_after_miss_ = 0;  // to_skip_ after the last fruitless poll
};

// The CPUs' worth of time a cgroup's quota lets this process use: the smallest quota
// over its cgroup and their ancestors, in cgroup v2 (cpu.max, "QUOTA PERIOD" or "max
// PERIOD") or v1 (cpu.cfs_quota_us over cpu.cfs_period_us, -1 for none); nullopt without
// one, or when none can be read. `proc_self_cgroup` is /proc/self/cgroup's text,
// `cgroup_root` where the hierarchies are mounted (/sys/fs/cgroup; a hierarchy mounted
// elsewhere is not found). Inside a container the file may name the host's path, absent
// from its mounts: then the path's first components are dropped until the rest is there.
std::optional<double> CgroupCpuQuota(const std::string& proc_self_cgroup,
                                     const std::string& cgroup_root);

// The CPUs a thread may run on: `affinity` (its mask's count) narrowed to the whole CPUs
// of `quota` (CgroupCpuQuota), and at least 1.
int CpusOf(int affinity, std::optional<double> quota);

// The CPUs the calling thread may run on: its affinity mask (which taskset or a cpuset
// narrows, and which a thread it starts inherits; the machine's count when the mask
// cannot be read) narrowed by its cgroup's CPU quota (a container given 1.5 CPUs' time
// on a machine of 8 counts 1).
int CpusToRunOn();

// What the writer does between two looks at its queue's length: tells the CPU it spins.
inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("isb" ::: "memory");
#endif
}

}  // namespace converge::internal

#endif  // CONVERGE_STORE_SQLITE_ARRIVAL_POLL_H_
