#include "src/store/sqlite/arrival_poll.h"

#include <sched.h>

#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string_view>
#include <thread>

namespace converge::internal {
namespace {

std::optional<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// The first whitespace-separated number of `text` from `pos` on, moving `pos` past it.
std::optional<double> NextNumber(std::string_view text, size_t* pos) {
  size_t start = text.find_first_not_of(" \t\n", *pos);
  if (start == std::string_view::npos) return std::nullopt;
  size_t end = text.find_first_of(" \t\n", start);
  if (end == std::string_view::npos) end = text.size();
  *pos = end;
  double value = 0;
  auto [ptr, ec] = std::from_chars(text.data() + start, text.data() + end, value);
  if (ec != std::errc() || ptr != text.data() + end) return std::nullopt;
  return value;
}

// A quota and its period, in CPUs; nullopt for none ("max", -1) or anything malformed
// (from_chars reads "nan" and "inf" too).
std::optional<double> QuotaOf(std::optional<double> quota, std::optional<double> period) {
  if (!quota || !period || !std::isfinite(*quota) || !std::isfinite(*period) || *quota <= 0 ||
      *period <= 0) {
    return std::nullopt;
  }
  return *quota / *period;
}

// cgroup v2: cpu.max holds "QUOTA PERIOD", QUOTA being "max" for none.
std::optional<double> QuotaV2(const std::string& dir) {
  std::optional<std::string> text = ReadFile(dir + "/cpu.max");
  if (!text) return std::nullopt;
  size_t pos = 0;
  std::optional<double> quota = NextNumber(*text, &pos);
  return QuotaOf(quota, NextNumber(*text, &pos));
}

// cgroup v1: cpu.cfs_quota_us (-1 for none) over cpu.cfs_period_us.
std::optional<double> QuotaV1(const std::string& dir) {
  std::optional<std::string> quota = ReadFile(dir + "/cpu.cfs_quota_us");
  std::optional<std::string> period = ReadFile(dir + "/cpu.cfs_period_us");
  if (!quota || !period) return std::nullopt;
  size_t a = 0;
  size_t b = 0;
  return QuotaOf(NextNumber(*quota, &a), NextNumber(*period, &b));
}

// The smallest quota of the cgroup at `path` under the hierarchy mounted at `mount` and
// of its ancestors. A cgroup whose last task is exiting is named "PATH (deleted)": its
// ancestors are read. A path the mount does not hold is one named from outside a
// container, whose mount's root is a cgroup below the first components of the path:
// those are dropped until what is left is there ("/docker/ID/system.slice/x.service" is
// "/system.slice/x.service" inside), or nothing is left, and the mount's root is read.
std::optional<double> SmallestUpwards(
    const std::string& mount, std::string path,
    const std::function<std::optional<double>(const std::string&)>& quota_of) {
  std::error_code ec;
  if (!std::filesystem::is_directory(mount, ec)) return std::nullopt;
  if (path.empty() || path.front() != '/') path = "/";
  constexpr std::string_view kDeleted = " (deleted)";
  if (path.size() > kDeleted.size() && path.ends_with(kDeleted)) {
    path.resize(path.size() - kDeleted.size());
  } else {
    while (path != "/" && !std::filesystem::is_directory(mount + path, ec)) {
      const size_t next = path.find('/', 1);
      path = next == std::string::npos ? "/" : path.substr(next);
    }
  }
  std::optional<double> smallest;
  for (;;) {
    std::optional<double> q = quota_of(path == "/" ? mount : mount + path);
    if (q && (!smallest || *q < *smallest)) smallest = q;
    if (path == "/") return smallest;
    const size_t slash = path.rfind('/');
    path = slash == 0 ? "/" : path.substr(0, slash);
  }
}

void Narrow(std::optional<double>* smallest, std::optional<double> q) {
  if (q && (!*smallest || *q < **smallest)) *smallest = q;
}

}  // namespace

std::optional<double> CgroupCpuQuota(const std::string& proc_self_cgroup,
                                     const std::string& cgroup_root) {
  std::optional<double> smallest;
  std::istringstream lines(proc_self_cgroup);
  std::string line;
  // Lines are "ID:CONTROLLERS:PATH": "0::PATH" for v2, "3:cpu,cpuacct:PATH" for v1.
  while (std::getline(lines, line)) {
    const size_t first = line.find(':');
    const size_t second = first == std::string::npos ? first : line.find(':', first + 1);
    if (second == std::string::npos) continue;
    const std::string controllers = line.substr(first + 1, second - first - 1);
    const std::string path = line.substr(second + 1);
    if (line.compare(0, first, "0") == 0 && controllers.empty()) {
      // A unified hierarchy at the root, or beside the v1 ones (a hybrid layout).
      Narrow(&smallest, SmallestUpwards(cgroup_root, path, QuotaV2));
      Narrow(&smallest, SmallestUpwards(cgroup_root + "/unified", path, QuotaV2));
      continue;
    }
    std::istringstream names(controllers);
    std::string name;
    bool cpu = false;
    while (std::getline(names, name, ',')) cpu = cpu || name == "cpu";
    if (!cpu) continue;
    // Mounted under its controllers' names, or under "cpu" with a link beside it.
    for (const std::string& dir : {controllers, std::string("cpu"), std::string("cpu,cpuacct"),
                                   std::string("cpuacct,cpu")}) {
      std::optional<double> q = SmallestUpwards(cgroup_root + "/" + dir, path, QuotaV1);
      if (q) {
        Narrow(&smallest, q);
        break;
      }
    }
  }
  return smallest;
}

int CpusOf(int affinity, std::optional<double> quota) {
  int cpus = std::max(affinity, 1);
  // Compared before the cast: a quota may be worth more CPUs than an int holds.
  if (quota && *quota < cpus) cpus = std::max(1, static_cast<int>(std::floor(*quota)));
  return cpus;
}

int CpusToRunOn() {
  cpu_set_t set;
  CPU_ZERO(&set);
  const int affinity = sched_getaffinity(0, sizeof(set), &set) == 0
                           ? CPU_COUNT(&set)
                           : static_cast<int>(std::thread::hardware_concurrency());
  // The calling thread's cgroup (a v2 threaded cgroup may hold it apart from the
  // process's first thread), or the process's before Linux 3.17.
  std::optional<std::string> cgroups = ReadFile("/proc/thread-self/cgroup");
  if (!cgroups) cgroups = ReadFile("/proc/self/cgroup");
  return CpusOf(affinity, CgroupCpuQuota(cgroups.value_or(""), "/sys/fs/cgroup"));
}

}  // namespace converge::internal
