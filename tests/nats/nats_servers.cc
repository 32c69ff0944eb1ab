#include "tests/nats/nats_servers.h"

#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <thread>

#include "converge/nats.h"

extern char** environ;

namespace converge::testing {

bool NatsServers::Run(const std::string& args) {
  const std::string cmd = "bash '" CONVERGE_SOURCE_DIR "/scripts/nats-server.sh' " + args + " >&2";
  return std::system(cmd.c_str()) == 0;
}

bool NatsServers::Start(int nodes) {
  const char* tmp = getenv("TMPDIR");
  std::string tmpl = std::string(tmp != nullptr && *tmp ? tmp : "/tmp") + "/converge-nats-XXXXXX";
  if (mkdtemp(tmpl.data()) == nullptr) return false;
  dir_ = tmpl;
  if (!Run("start '" + dir_ + "' " + std::to_string(nodes))) return false;
  std::ifstream env(dir_ + "/env");
  const std::string key = "CONVERGE_TEST_NATS_URL=";
  for (std::string line; std::getline(env, line);) {
    if (line.rfind(key, 0) == 0) urls_ = line.substr(key.size());
  }
  return !urls_.empty();
}

bool NatsServers::Kill(int n) { return Run("kill '" + dir_ + "' " + std::to_string(n)); }
bool NatsServers::Restart(int n, bool alone) {
  return Run("restart '" + dir_ + "' " + std::to_string(n) + (alone ? " alone" : ""));
}

NatsServers::~NatsServers() {
  if (!dir_.empty()) Run("stop '" + dir_ + "'");
}

Child::Child(std::vector<std::string> args) {
  args.insert(args.begin(), CONVERGE_BIN_PATH);
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  if (posix_spawn(&pid_, CONVERGE_BIN_PATH, nullptr, nullptr, argv.data(), environ) != 0) {
    pid_ = -1;
  }
}

Child::~Child() {
  if (pid_ > 0) Signal(SIGKILL);
}

int Child::Signal(int sig) {
  kill(pid_, sig);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
  return status;
}

std::vector<Status> ConnectAtOnce(const std::string& uri, int n) {
  std::vector<Status> results(static_cast<size_t>(n));
  std::vector<std::thread> threads;
  std::atomic<int> ready{0};
  for (int i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      ready.fetch_add(1);
      while (ready.load() < n) std::this_thread::yield();
      Result<NatsOptions> options = ParseNatsUri(uri);
      if (!options) {
        results[static_cast<size_t>(i)] = options.error();
        return;
      }
      auto broker = NatsBroker::Connect(std::move(*options));
      results[static_cast<size_t>(i)] = broker.has_value() ? OkStatus() : broker.error();
    });
  }
  for (std::thread& t : threads) t.join();
  return results;
}

}  // namespace converge::testing
