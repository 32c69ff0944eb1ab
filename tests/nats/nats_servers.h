// Real nats-server processes for the `nats` tests: started with scripts/nats-server.sh
// (JetStream on 127.0.0.1, free ports, a temporary store, healthy before Start returns)
// and stopped by PID when the object goes.
#ifndef CONVERGE_TESTS_NATS_NATS_SERVERS_H_
#define CONVERGE_TESTS_NATS_NATS_SERVERS_H_

#include <sys/types.h>

#include <string>
#include <vector>

#include "converge/status.h"

namespace converge::testing {

class NatsServers {
 public:
  NatsServers() = default;
  ~NatsServers();  // kills every node and removes the store
  NatsServers(const NatsServers&) = delete;
  NatsServers& operator=(const NatsServers&) = delete;

  // Starts `nodes` servers (a cluster with routes when > 1); false on failure (the
  // script printed why).
  bool Start(int nodes = 1);
  // nats://127.0.0.1:P1[,nats://127.0.0.1:P2...]: every node's client URL.
  const std::string& urls() const { return urls_; }
  // kill -9 node n (1-based), keeping its store; Restart(n) brings it back, healthy.
  // `alone`: no other node runs, so node n's JetStream has no meta leader (it answers
  // "temporarily unavailable"); it is waited for until its JetStream is enabled.
  bool Kill(int n);
  bool Restart(int n, bool alone = false);

 private:
  bool Run(const std::string& args);
  std::string dir_;
  std::string urls_;
};

// Connects `n` brokers to `uri` ("nats://" + urls() + "?stream=..."), from `n` threads
// released together, as processes that start together do: each connection's outcome, in
// thread order. Every broker is closed before it returns.
std::vector<Status> ConnectAtOnce(const std::string& uri, int n);

// A `converge ARGS...` child process (the binary built beside the tests); killed with
// SIGKILL if still running when destroyed.
class Child {
 public:
  explicit Child(std::vector<std::string> args);
  ~Child();
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  bool running() const { return pid_ > 0; }
  // Sends `sig` and reaps the child; returns its wait status.
  int Signal(int sig);

 private:
  pid_t pid_ = -1;
};

}  // namespace converge::testing

#endif  // CONVERGE_TESTS_NATS_NATS_SERVERS_H_
