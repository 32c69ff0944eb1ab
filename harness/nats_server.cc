#include "harness/nats_server.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <sstream>
#include <thread>
#include <utility>
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

NatsServer::NatsServer(std::string dir, int nodes)
    : dir_(std::move(dir)), nodes_(static_cast<size_t>(std::max(nodes, 1))) {}
NatsServer::~NatsServer() { Stop(); }

std::string NatsServer::url() const {
  std::string u = "nats://";
  for (const Node& n : nodes_) {
    u += (u.size() > 7 ? ",127.0.0.1:" : "127.0.0.1:") + std::to_string(n.port);
  }
  return u;
}

// One node keeps the names it had before clusters: "chaos", nats-store, nats-server.log.
std::string NatsServer::name(int node) const {
  return nodes() == 1 ? "chaos" : "chaos-n" + std::to_string(node + 1);
}

std::string NatsServer::log_path(int node) const {
  return nodes() == 1 ? dir_ + "/nats-server.log"
                      : dir_ + "/nats-server-n" + std::to_string(node + 1) + ".log";
}

Status NatsServer::Start() {
  const std::string bin = FindOnPath("nats-server");
  if (bin.empty()) {
    return FailedPreconditionError(
        "no nats-server on PATH (Debian package nats-server; scripts/install-deps.sh)");
  }
  if (nodes_[0].port == 0) {
    // FreePort() may draw a port twice (nothing holds it between draws): draw again.
    std::vector<uint16_t> taken;
    for (Node& n : nodes_) {
      for (uint16_t* p : {&n.port, &n.http_port, &n.cluster_port}) {
        if (p == &n.cluster_port && nodes() == 1) break;
        for (int draw = 0; draw < 20 && (*p == 0 || std::find(taken.begin(), taken.end(),
                                                               *p) != taken.end());
             ++draw) {
          *p = FreePort();
        }
        if (*p == 0 || std::find(taken.begin(), taken.end(), *p) != taken.end()) {
          for (Node& reset : nodes_) reset = Node{};
          return UnavailableError("no free ports for nats-server");
        }
        taken.push_back(*p);
      }
    }
  }
  // On a failure, every node this call started goes down again, reaped without a record
  // (an end here is this call's error, not one on its own; what an earlier end of the
  // node recorded stays), so that the next Start() starts and checks each again.
  std::vector<int> starting;
  auto fail = [&](Status st) {
    for (int j : starting) Reap(j);
    return st;
  };
  for (int i = 0; i < nodes(); ++i) {
    if (alive(i)) continue;
    const Status st = StartNode(i, bin);
    if (!st.ok()) return fail(st);
    starting.push_back(i);
  }
  // A node started again while the others run is back once its JetStream is enabled; it
  // catches up with the cluster's streams afterwards (scripts/nats-server.sh does the
  // same). One node alone, or a cluster's first start, waits for JetStream to be ready.
  const std::string query = started_ && nodes() > 1 ? "?js-server-only=true" : "";
  for (int i : starting) {
    const Status st = WaitHealthy(i, query);
    if (!st.ok()) return fail(st);
  }
  started_ = true;
  return OkStatus();
}

Status NatsServer::StartNode(int node, const std::string& bin) {
  const Node& n = nodes_[static_cast<size_t>(node)];
  const std::string suffix = nodes() == 1 ? "" : "-n" + std::to_string(node + 1);
  std::vector<std::string> args = {"nats-server", "-js", "-a", "127.0.0.1",
                                   "-p", std::to_string(n.port), "-m",
                                   std::to_string(n.http_port), "-sd",
                                   dir_ + "/nats-store" + suffix, "--server_name", name(node)};
  if (nodes() > 1) {
    std::string routes;
    for (const Node& other : nodes_) {
      if (&other == &n) continue;
      routes += (routes.empty() ? "" : ",") + std::string("nats://127.0.0.1:") +
                std::to_string(other.cluster_port);
    }
    args.insert(args.end(), {"--cluster_name", "chaos", "--cluster",
                             "nats://127.0.0.1:" + std::to_string(n.cluster_port),
                             "--routes", routes});
  }
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string log = log_path(node);
  const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (fd < 0) return UnavailableError("cannot open " + log);
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid == 0) {
    // Only async-signal-safe calls between fork and exec: the parent has threads. The
    // server dies with the thread that started it (a campaign interrupted leaves none).
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(126);
    dup2(fd, 1);
    dup2(fd, 2);
    execve(bin.c_str(), argv.data(), environ);
    _exit(127);
  }
  close(fd);
  if (pid < 0) return UnavailableError("fork failed");
  nodes_[static_cast<size_t>(node)].pid = pid;
  return OkStatus();
}

bool NatsServer::Running(int node, bool record) {
  Node& n = nodes_[static_cast<size_t>(node)];
  int status = 0;
  if (n.pid > 0 && waitpid(n.pid, &status, WNOHANG) == n.pid) {
    n.pid = -1;
    if (record) n.ended = DescribeExit(status);
  }
  return n.pid > 0;
}

bool NatsServer::alive(int node) { return Running(node, /*record=*/true); }

std::optional<std::string> NatsServer::EndedOnItsOwn(int node) {
  (void)alive(node);
  return std::exchange(nodes_[static_cast<size_t>(node)].ended, std::nullopt);
}

Status NatsServer::WaitHealthy(int node, const std::string& query) {
  http::Client client;
  const auto deadline = Steady::now() + std::chrono::seconds(30);
  while (Steady::now() < deadline) {
    // Exited first: another server that took its monitoring port would answer for it.
    if (!Running(node, /*record=*/false)) {
      return UnavailableError("nats-server " + name(node) + " exited at start; see " +
                              log_path(node));
    }
    auto r = client.Send(
        {.url = MonitorUrl(node, "/healthz" + query), .timeout = std::chrono::seconds(1)});
    if (r && r->status == 200) return OkStatus();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return UnavailableError("nats-server " + name(node) + " not healthy within 30 s; see " +
                          log_path(node));
}

void NatsServer::Kill(int node) {
  if (!alive(node)) return;  // ended on its own first: kept for EndedOnItsOwn
  Reap(node);
}

void NatsServer::Reap(int node) {
  Node& n = nodes_[static_cast<size_t>(node)];
  if (n.pid <= 0) return;
  kill(n.pid, SIGKILL);  // harmless on one that has ended and is not reaped yet
  waitpid(n.pid, nullptr, 0);
  n.pid = -1;
}

void NatsServer::Stop(std::chrono::milliseconds grace) {
  for (Node& n : nodes_) {
    if (n.pid > 0) kill(n.pid, SIGTERM);
  }
  for (Node& n : nodes_) {
    if (n.pid <= 0) continue;
    StopChild(n.pid, grace);
    n.pid = -1;
  }
}

}  // namespace converge::harness
