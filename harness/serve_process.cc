#include "harness/serve_process.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string_view>
#include <thread>
#include <vector>

extern char** environ;

namespace converge::harness {
namespace {
using Steady = std::chrono::steady_clock;
}  // namespace

std::string DescribeExit(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    const char* name = strsignal(sig);
    return "killed by signal " + std::to_string(sig) + (name ? std::string(" (") + name + ")" : "");
  }
  return "ended with wait status " + std::to_string(status);
}

ServeProcess::ServeProcess(Options options) : options_(std::move(options)) {}
ServeProcess::~ServeProcess() { Stop(); }

Status ServeProcess::Start(const std::string& failpoints) {
  std::string bin = options_.binary;
  if (bin.empty()) {
    const char* env = std::getenv("CONVERGE_BIN");
    if (env == nullptr) return InvalidArgumentError("ServeProcess: no binary and no $CONVERGE_BIN");
    bin = env;
  }
  killed_at_start_ = false;
  const std::string port_file = options_.dir + "/" + options_.name + ".port";
  unlink(port_file.c_str());
  const std::string log = log_path();
  // The child's environment, built before fork (setenv is not safe with threads running).
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string_view v(*e);
    if (v.rfind("ASAN_OPTIONS=", 0) != 0 && v.rfind("CONVERGE_FAILPOINTS=", 0) != 0) {
      env_strings.emplace_back(v);
    }
  }
  if (!failpoints.empty()) env_strings.push_back("CONVERGE_FAILPOINTS=" + failpoints);
#if defined(__SANITIZE_ADDRESS__)
  const char* asan = std::getenv("ASAN_OPTIONS");
  env_strings.push_back(std::string("ASAN_OPTIONS=") + (asan ? std::string(asan) + ":" : "") +
                        "quarantine_size_mb=4");
#else
  if (const char* asan = std::getenv("ASAN_OPTIONS")) {
    env_strings.push_back(std::string("ASAN_OPTIONS=") + asan);
  }
#endif
  std::vector<char*> envp;
  for (std::string& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::vector<std::string> args = {"converge", options_.command};
  if (options_.ready_line.empty()) {
    args.insert(args.end(), {"--config", options_.config_path, "--listen", options_.listen,
                             "--port-file", port_file});
  } else {
    args.insert(args.end(), options_.args.begin(), options_.args.end());
  }
  args.insert(args.end(), {"--log-level", options_.log_level});
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  // Where this life's lines begin: a ready line of an earlier life does not count.
  std::streamoff log_start = 0;
  {
    std::ifstream l(log, std::ios::ate);
    if (l) log_start = l.tellg();
  }
  const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (fd < 0) return UnavailableError("cannot open " + log);
  pid_ = fork();
  if (pid_ == 0) {
    // Only async-signal-safe calls between fork and exec: the parent has threads.
    if (options_.nofile) {
      rlimit rl{options_.nofile->first, options_.nofile->second};
      if (setrlimit(RLIMIT_NOFILE, &rl) != 0) _exit(126);
    }
    dup2(fd, 1);
    dup2(fd, 2);
    execve(bin.c_str(), argv.data(), envp.data());
    _exit(127);
  }
  close(fd);
  if (pid_ < 0) return UnavailableError("fork failed");
  const auto deadline = Steady::now() + std::chrono::seconds(30);
  while (Steady::now() < deadline) {
    if (!options_.ready_line.empty()) {
      std::ifstream l(log);
      l.seekg(log_start);
      const std::string lines((std::istreambuf_iterator<char>(l)),
                              std::istreambuf_iterator<char>());
      if (lines.find(options_.ready_line) != std::string::npos) return OkStatus();
    } else {
      std::ifstream f(port_file);
      int port = 0;
      if (f >> port) {
        port_ = static_cast<uint16_t>(port);
        return OkStatus();
      }
    }
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      killed_at_start_ = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
      return UnavailableError("converge " + options_.command + " exited at start; see " + log);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  Kill(SIGKILL);
  return UnavailableError("converge " + options_.command + " did not come up within 30 s; see " +
                          log);
}

void ServeProcess::Kill(int signal) {
  if (pid_ <= 0) return;
  kill(pid_, signal);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

void ServeProcess::Signal(int signal) const {
  if (pid_ > 0) kill(pid_, signal);
}

bool ServeProcess::KilledWithin(std::chrono::milliseconds wait) {
  const auto deadline = Steady::now() + wait;
  while (pid_ > 0 && Steady::now() < deadline) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

std::optional<std::string> ServeProcess::EndedOnItsOwn() {
  if (pid_ <= 0) return std::nullopt;
  int status = 0;
  if (waitpid(pid_, &status, WNOHANG) != pid_) return std::nullopt;
  pid_ = -1;
  return DescribeExit(status);
}

std::string ServeProcess::Url(const std::string& path) const {
  return "http://127.0.0.1:" + std::to_string(port_) + path;
}

void StopChild(pid_t pid, std::chrono::milliseconds grace) {
  kill(pid, SIGTERM);
  kill(pid, SIGCONT);  // a stopped child (SIGSTOP) would not act on the SIGTERM
  const auto deadline = Steady::now() + grace;
  while (waitpid(pid, nullptr, WNOHANG) == 0) {
    if (Steady::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

void ServeProcess::Stop(std::chrono::milliseconds grace) {
  if (pid_ <= 0) return;
  StopChild(pid_, grace);
  pid_ = -1;
}

int64_t ServeProcess::RssBytes() const {
  std::ifstream f("/proc/" + std::to_string(pid_) + "/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::atoll(line.c_str() + 6) * 1024;
  }
  return -1;
}

double ServeProcess::CpuSeconds() const {
  std::ifstream f("/proc/" + std::to_string(pid_) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const size_t paren = stat.rfind(')');
  if (paren == std::string::npos) return -1;
  std::istringstream rest(stat.substr(paren + 2));
  std::vector<std::string> fields;
  for (std::string s; rest >> s;) fields.push_back(s);
  if (fields.size() < 13) return -1;
  // After the command: state(0) ... utime(11) stime(12), in clock ticks.
  return static_cast<double>(std::atoll(fields[11].c_str()) + std::atoll(fields[12].c_str())) /
         static_cast<double>(sysconf(_SC_CLK_TCK));
}

int64_t ServeProcess::OpenFds() const {
  DIR* d = opendir(("/proc/" + std::to_string(pid_) + "/fd").c_str());
  if (d == nullptr) return -1;
  int64_t n = 0;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] != '.') ++n;
  }
  closedir(d);
  return n;
}

namespace {

// The port 127.0.0.1:port gives when listened on now (as the server binds: SO_REUSEADDR;
// port 0: one the kernel picks), or 0 when it cannot be.
uint16_t Listenable(uint16_t port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  const int one = 1;
  (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  uint16_t got = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 && listen(fd, 1) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    got = ntohs(a.sin_port);
  }
  close(fd);
  return got;
}

}  // namespace

// Below the kernel's ephemeral range (ip_local_port_range) and below 30000 (a Kubernetes
// node's NodePorts), where no bind to port 0 and no outgoing connection of another test
// takes the port while a child is down between kills; where the system leaves no room
// there, a port the kernel picks. scripts/free-port.py does the same for the scripts.
uint16_t FreePort() {
  int low = 32768;
  std::ifstream("/proc/sys/net/ipv4/ip_local_port_range") >> low;
  const int top = std::min(low - 1, 29999), bottom = std::max(1024, low - 12000);
  if (top - bottom >= 1000) {
    std::mt19937 rng(std::random_device{}());
    std::uniform_int_distribution<int> pick(bottom, top);
    for (int i = 0; i < 200; ++i) {
      if (const uint16_t port = Listenable(static_cast<uint16_t>(pick(rng)))) return port;
    }
  }
  return Listenable(0);
}

std::pair<int64_t, int64_t> ServeProcess::FdLimits() const {
  std::ifstream f("/proc/" + std::to_string(pid_) + "/limits");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("Max open files", 0) == 0) {
      std::istringstream in(line.substr(std::string("Max open files").size()));
      int64_t soft = -1, hard = -1;
      in >> soft >> hard;
      return {soft, hard};
    }
  }
  return {-1, -1};
}

}  // namespace converge::harness
