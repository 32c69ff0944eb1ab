// What every long-running converge command does the same way: stop signals, port files,
// secret files.
#ifndef CONVERGE_APPS_CONVERGE_PROCESS_H_
#define CONVERGE_APPS_CONVERGE_PROCESS_H_

#include <signal.h>

#include <cstdint>
#include <string>
#include <vector>

#include "converge/status.h"

namespace CLI {
class App;
}

namespace converge::cli {

// The flags every server mode (proxy, gateway) takes besides its configuration's keys.
struct ModeFlags {
  std::string config, listen, port_file, log_level;
};
// Adds --config (required, `config_help`), --listen, --port-file and --log-level.
void AddModeFlags(CLI::App* command, ModeFlags* flags, const std::string& config_help);
// After loading the configuration (`loaded`: its error, or OK): says what is wrong on
// stderr as "converge <mode>: ..." and returns false, or applies --listen and --log-level
// over the configuration's values, sets up logging and returns true.
bool ApplyModeFlags(const char* mode, const Status& loaded, const ModeFlags& flags,
                    std::string* address, uint16_t* port, std::string* log_level);

// Blocks SIGINT/SIGTERM in every thread started after this, so sigwait can take them.
sigset_t BlockStopSignals();
// Waits for one of `set` and logs it; returns the signal.
int WaitForStopSignal(const sigset_t& set);
// The non-empty lines of a secret file, each without surrounding whitespace. Secrets come
// from files or the environment because a command line is readable by every local user
// (ps, /proc/<pid>/cmdline); a file can be mode 0600, the environment is the owner's only.
Result<std::vector<std::string>> ReadSecretFile(const std::string& path);
// Writes `port` to `path` atomically (write, then rename); true when `path` is empty.
bool WritePortFile(const std::string& path, uint16_t port);
// One line per event, key=value after the time and level, at `level`.
void SetUpLogging(const std::string& level);

}  // namespace converge::cli

#endif  // CONVERGE_APPS_CONVERGE_PROCESS_H_
