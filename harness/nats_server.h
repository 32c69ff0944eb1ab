// NatsServer: nats-server child processes with JetStream, for the chaos campaign
// (docs/design/chaos.md, "With NATS"): one node, or a cluster of several (routes on
// loopback), each on 127.0.0.1 at free ports (client, monitoring, routes), its store in a
// directory of the caller's, found on PATH. A node can be SIGKILLed and restarted on the
// same ports and store, as scripts/nats-server.sh does for the tests (which need it from a
// shell; the campaign runs from an installed binary).
//
// Thread safety: none; a NatsServer belongs to one thread, and the servers it starts are
// SIGKILLed when that thread ends (PR_SET_PDEATHSIG), so an interrupted campaign leaves
// none behind.
#ifndef CONVERGE_HARNESS_NATS_SERVER_H_
#define CONVERGE_HARNESS_NATS_SERVER_H_

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "converge/status.h"

namespace converge::harness {

class NatsServer {
 public:
  // `dir`: where the stores and the logs go (it must exist). `nodes`: 1 (one server) or
  // more (a cluster; streams on it want as many replicas).
  explicit NatsServer(std::string dir, int nodes = 1);
  ~NatsServer();  // Stop()s
  NatsServer(const NatsServer&) = delete;
  NatsServer& operator=(const NatsServer&) = delete;

  // Picks free ports (first start only) and starts every node that is not running; returns
  // once each answers /healthz: at the first start with JetStream ready (a cluster: with a
  // meta leader), later with its JetStream enabled and catching up with the others.
  // kFailedPrecondition: no nats-server on PATH; kUnavailable: a node exited or was not
  // healthy within 30 s (its log's path in the message).
  Status Start();
  // SIGKILL and reap node `node` (0-based): its store stays, its ports are free again
  // for Start().
  void Kill(int node);
  // SIGTERM to every node, then SIGKILL after `grace`.
  void Stop(std::chrono::milliseconds grace = std::chrono::seconds(5));

  int nodes() const { return static_cast<int>(nodes_.size()); }
  // Whether node `node` runs; one that ended by itself is reaped (and Start() starts it
  // again), and how it ended is kept for EndedOnItsOwn.
  bool alive(int node);
  // Whether node `node`, once healthy, ended although nothing here killed or stopped it
  // (reaped by this call or an earlier one): how it ended ("killed by signal 11
  // (Segmentation fault)"), told once; nullopt otherwise. An exit during Start() is
  // Start()'s error instead.
  std::optional<std::string> EndedOnItsOwn(int node);
  // The client URLs of every node: nats://127.0.0.1:P1[,127.0.0.1:P2...]
  std::string url() const;
  // The name a node goes by (its server_name; a cluster's leaders are named by it).
  std::string name(int node) const;
  // http://127.0.0.1:<node's monitoring port><path>, e.g. "/jsz?consumers=true".
  std::string MonitorUrl(int node, const std::string& path) const {
    return "http://127.0.0.1:" + std::to_string(nodes_[static_cast<size_t>(node)].http_port) +
           path;
  }
  std::string log_path(int node) const;

 private:
  struct Node {
    pid_t pid = -1;
    uint16_t port = 0, http_port = 0, cluster_port = 0;
    std::optional<std::string> ended;  // how it ended on its own, until told
  };
  // Reaps node `node` if its process ended, keeping how in `ended` when `record`.
  bool Running(int node, bool record);
  // SIGKILLs node `node` if it has a process, and reaps it, without a record.
  void Reap(int node);
  Status StartNode(int node, const std::string& bin);
  Status WaitHealthy(int node, const std::string& query);

  std::string dir_;
  std::vector<Node> nodes_;
  bool started_ = false;  // every node has been healthy once
};

// The first executable `name` in $PATH's directories; empty when there is none.
std::string FindOnPath(const std::string& name);

}  // namespace converge::harness

#endif  // CONVERGE_HARNESS_NATS_SERVER_H_
