#include "apps/converge/process.h"

#include <cstdio>
#include <fstream>

#include <spdlog/spdlog.h>

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

void SetUpLogging(const std::string& level) {
  spdlog::set_level(spdlog::level::from_str(level));
  spdlog::set_pattern("ts=%Y-%m-%dT%H:%M:%S.%eZ level=%l %v", spdlog::pattern_time_type::utc);
}

}  // namespace converge::cli
