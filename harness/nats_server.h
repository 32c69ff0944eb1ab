// NatsServer: one nats-server child process with JetStream, for the chaos campaign
// (docs/design/chaos.md, "With NATS"): on 127.0.0.1 at free ports (client and
// monitoring), its store in a directory of the caller's, found on PATH. It can be
// SIGKILLed and restarted on the same ports and store, as scripts/nats-server.sh does for
// the tests (which need it from a shell; the campaign runs from an installed binary).
//
// Thread safety: none; a NatsServer belongs to one thread, and the server it starts is
// SIGKILLed when that thread ends (PR_SET_PDEATHSIG), so an interrupted campaign leaves
// no server behind.
#ifndef CONVERGE_HARNESS_NATS_SERVER_H_
#define CONVERGE_HARNESS_NATS_SERVER_H_

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <string>

#include "converge/status.h"

namespace converge::harness {

class NatsServer {
 public:
  // `dir`: where the store and the log go (it must exist).
  explicit NatsServer(std::string dir);
  ~NatsServer();  // Stop()s
  NatsServer(const NatsServer&) = delete;
  NatsServer& operator=(const NatsServer&) = delete;

  // Picks free ports (first start only) and starts the server; returns once /healthz
  // answers 200 (JetStream included). kFailedPrecondition: no nats-server on PATH;
  // kUnavailable: it exited or was not healthy within 30 s (the log's path in the message).
  Status Start();
  // SIGKILL and reap: the store stays, the ports are free again for Start().
  void Kill();
  // SIGTERM, then SIGKILL after `grace`.
  void Stop(std::chrono::milliseconds grace = std::chrono::seconds(5));

  bool alive() const { return pid_ > 0; }
  std::string url() const { return "nats://127.0.0.1:" + std::to_string(port_); }
  // http://127.0.0.1:<monitoring port><path>, e.g. "/jsz?consumers=true".
  std::string MonitorUrl(const std::string& path) const {
    return "http://127.0.0.1:" + std::to_string(http_port_) + path;
  }
  std::string log_path() const { return dir_ + "/nats-server.log"; }

 private:
  std::string dir_;
  pid_t pid_ = -1;
  uint16_t port_ = 0, http_port_ = 0;
};

// The first executable `name` in $PATH's directories; empty when there is none.
std::string FindOnPath(const std::string& name);

}  // namespace converge::harness

#endif  // CONVERGE_HARNESS_NATS_SERVER_H_
