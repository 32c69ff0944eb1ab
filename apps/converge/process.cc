#include "apps/converge/process.h"

#include <cstdio>
#include <fstream>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "converge/http.h"

namespace converge::cli {

sigset_t BlockStopSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  return set;
}

int WaitForStopSignal(const sigset_t& set) {
  int sig = 0;
  sigwait(&set, &sig);
  spdlog::info("event=shutdown signal={}", sig == SIGINT ? "SIGINT" : "SIGTERM");
  return sig;
}

Result<std::vector<std::string>> ReadSecretFile(const std::string& path) {
  std::ifstream f(path);
  if (!f) return tl::unexpected(InvalidArgumentError("cannot read secret file " + path));
  std::vector<std::string> out;
  for (std::string line; std::getline(f, line);) {
    const size_t b = line.find_first_not_of(" \t\r");
    const size_t e = line.find_last_not_of(" \t\r");
    if (b != std::string::npos) out.push_back(line.substr(b, e - b + 1));
  }
  if (out.empty()) return tl::unexpected(InvalidArgumentError("secret file " + path + " is empty"));
  return out;
}

bool WritePortFile(const std::string& path, uint16_t port) {
  if (path.empty()) return true;
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp);
    f << port << "\n";
    if (!f) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

void AddModeFlags(CLI::App* c, ModeFlags* f, const std::string& config_help) {
  c->add_option("--config", f->config, config_help)->required()->check(CLI::ExistingFile);
  c->add_option("--listen", f->listen, "host:port to listen on (overrides the config's)");
  c->add_option("--port-file", f->port_file, "Write the bound port here once listening");
  c->add_option("--log-level", f->log_level,
                "trace|debug|info|warn|error (overrides the config's)");
}

bool ApplyModeFlags(const char* mode, const Status& loaded, const ModeFlags& f,
                    std::string* address, uint16_t* port, std::string* log_level) {
  Status st = loaded;
  if (st.ok() && !f.listen.empty()) st = http::ParseHostPort(f.listen, address, port);
  if (!st.ok()) {
    std::fprintf(stderr, "converge %s: %s\n", mode, st.message().c_str());
    return false;
  }
  if (!f.log_level.empty()) *log_level = f.log_level;
  SetUpLogging(*log_level);
  return true;
}

void SetUpLogging(const std::string& level) {
  spdlog::set_level(spdlog::level::from_str(level));
  spdlog::set_pattern("ts=%Y-%m-%dT%H:%M:%S.%eZ level=%l %v", spdlog::pattern_time_type::utc);
}

}  // namespace converge::cli
