#include "harness/nats_server.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <sstream>
#include <thread>
#include <vector>

#include "converge/http.h"
#include "harness/serve_process.h"

extern char** environ;

namespace converge::harness {
namespace {
using Steady = std::chrono::steady_clock;
}  // namespace

std::string FindOnPath(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::istringstream dirs(path != nullptr ? path : "");
  for (std::string d; std::getline(dirs, d, ':');) {
    const std::string candidate = (d.empty() ? "." : d) + "/" + name;
    struct stat st{};
    if (stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
        access(candidate.c_str(), X_OK) == 0) {
      return candidate;
    }
  }
  return "";
}

NatsServer::NatsServer(std::string dir) : dir_(std::move(dir)) {}
NatsServer::~NatsServer() { Stop(); }

Status NatsServer::Start() {
  const std::string bin = FindOnPath("nats-server");
  if (bin.empty()) {
    return FailedPreconditionError(
        "no nats-server on PATH (Debian package nats-server; scripts/install-deps.sh)");
  }
  if (port_ == 0) {
    port_ = FreePort();
    http_port_ = FreePort();
    if (port_ == 0 || http_port_ == 0 || port_ == http_port_) {
      return UnavailableError("no free ports for nats-server");
    }
  }
  const std::string port = std::to_string(port_), http_port = std::to_string(http_port_);
  const std::string store = dir_ + "/nats-store";
  const char* argv[] = {"nats-server", "-js", "-a", "127.0.0.1", "-p", port.c_str(),
                        "-m", http_port.c_str(), "-sd", store.c_str(), "--server_name",
                        "chaos", nullptr};
  const int fd = open(log_path().c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (fd < 0) return UnavailableError("cannot open " + log_path());
  const pid_t parent = getpid();
  pid_ = fork();
  if (pid_ == 0) {
    // Only async-signal-safe calls between fork and exec: the parent has threads. The
    // server dies with the thread that started it (a campaign interrupted leaves none).
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(126);
    dup2(fd, 1);
    dup2(fd, 2);
    execve(bin.c_str(), const_cast<char* const*>(argv), environ);
    _exit(127);
  }
  close(fd);
  if (pid_ < 0) return UnavailableError("fork failed");
  http::Client client;
  const auto deadline = Steady::now() + std::chrono::seconds(30);
  while (Steady::now() < deadline) {
    auto r = client.Send({.url = MonitorUrl("/healthz"), .timeout = std::chrono::seconds(1)});
    if (r && r->status == 200) return OkStatus();
    if (waitpid(pid_, nullptr, WNOHANG) == pid_) {
      pid_ = -1;
      return UnavailableError("nats-server exited at start; see " + log_path());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  Kill();
  return UnavailableError("nats-server not healthy within 30 s; see " + log_path());
}

void NatsServer::Kill() {
  if (pid_ <= 0) return;
  kill(pid_, SIGKILL);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

void NatsServer::Stop(std::chrono::milliseconds grace) {
  if (pid_ <= 0) return;
  StopChild(pid_, grace);
  pid_ = -1;
}

}  // namespace converge::harness
