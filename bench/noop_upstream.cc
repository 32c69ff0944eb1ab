// The upstream and the delivery target of bench/modes_bench.sh: every request is answered
// at once on the same HTTP server the proxy and the gateway run on, so "direct" is the
// ceiling the proxy cannot beat by construction (it makes this very call inside its own).
//   POST /v1/charges, POST /v1/refunds/{id}   201 {"id":"ch_<n>"}
//   POST /hooks/{target}                      200 (a gateway delivery), counted
//   GET /count                                {"requests": n, "hooks": n}
//
//   converge_noop_upstream --port-file FILE [--workers N]
#include <atomic>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <string>

#include <CLI/CLI.hpp>

#include "converge/http.h"

int main(int argc, char** argv) {
  CLI::App app{"a no-op HTTP upstream for bench/modes_bench.sh"};
  std::string port_file;
  int workers = 16;
  app.add_option("--port-file", port_file, "Where to write the port")->required();
  app.add_option("--workers", workers, "Handler threads (16)")->check(CLI::Range(1, 1024));
  CLI11_PARSE(app, argc, argv);

  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  std::atomic<int64_t> requests{0}, hooks{0};
  converge::http::ServerOptions options;
  options.worker_threads = workers;
  converge::http::Server server(options);
  auto charge = [&](converge::http::Request&) {
    const int64_t n = ++requests;
    return converge::http::Json(201, "{\"id\":\"ch_" + std::to_string(n) + "\"}");
  };
  server.Route("POST", "/v1/charges", charge);
  server.Route("POST", "/v1/refunds/{id}", charge);
  server.Route("POST", "/hooks/{target}", [&](converge::http::Request&) {
    ++requests;
    ++hooks;
    return converge::http::Json(200, "{\"ok\":true}");
  });
  server.Route("GET", "/count", [&](converge::http::Request&) {
    return converge::http::Json(200, "{\"requests\":" + std::to_string(requests.load()) +
                                         ",\"hooks\":" + std::to_string(hooks.load()) + "}");
  });
  if (converge::Status st = server.Start(); !st.ok()) {
    std::fprintf(stderr, "converge_noop_upstream: %s\n", st.ToString().c_str());
    return 1;
  }
  {
    std::ofstream out(port_file + ".tmp");
    out << server.port() << "\n";
  }
  if (std::rename((port_file + ".tmp").c_str(), port_file.c_str()) != 0) {
    std::fprintf(stderr, "converge_noop_upstream: cannot write %s\n", port_file.c_str());
    return 1;
  }
  int sig = 0;
  sigwait(&stop, &sig);
  server.Stop();
  return 0;
}
