// Fuzz target: the TOML configuration of the payments service
// (payments::LoadServiceConfig). The whole input is the file's contents; it is written to
// a file in a temporary directory, since the loader takes a path.
//
// Properties:
//  - the loader answers a config or kInvalidArgument, never anything else, and never
//    throws (toml++ reports syntax errors by exception; the loader must catch them);
//  - every value of an accepted config is within its documented range (the server and
//    the workers are started with these numbers unchecked);
//  - the accepted config, written back as TOML with every key, loads to the same config:
//    nothing the loader accepts is lost or changed on the way.
#include <stdlib.h>

#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>

#include "examples/payments/config.h"
#include "fuzz/fuzz_support.h"

namespace converge::fuzz {
namespace {

using payments::ServiceConfig;

int64_t Ms(Millis m) { return static_cast<int64_t>(m.count()); }

// A TOML basic string: what the loader accepted is UTF-8, so only '"', '\\' and control
// characters need escapes. Written here rather than by toml++'s printer, which emits a
// value starting with a newline as a multi-line literal whose first newline the parser
// then drops (toml++ 3.3): a round trip must not depend on that.
std::string Quoted(std::string_view s) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out = "\"";
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += ch;
    } else if (c < 0x20 || c == 0x7f) {
      out += "\\u00";
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
    } else {
      out += ch;
    }
  }
  return out + "\"";
}

// Every key of `c` as TOML; two configs are equal when these texts are.
std::string Emit(const ServiceConfig& c) {
  std::ostringstream o;
  auto line = [&](const char* key, const auto& value) { o << key << " = " << value << "\n"; };
  o << "[server]\n";
  line("listen", Quoted(c.address + ":" + std::to_string(c.port)));
  line("instance_name", Quoted(c.instance_name));
  line("io_threads", c.io_threads);
  line("worker_threads", c.worker_threads);
  line("body_limit_bytes", c.body_limit);
  line("header_limit_bytes", c.header_limit);
  line("max_header_fields", c.max_header_fields);
  line("max_connections", c.max_connections);
  line("header_timeout_ms", Ms(c.header_timeout));
  line("body_timeout_ms", Ms(c.body_timeout));
  line("shutdown_drain_ms", Ms(c.shutdown_drain));
  o << "[store]\n";
  line("uri", Quoted(c.db));
  line("synchronous", c.synchronous_full ? "\"full\"" : "\"normal\"");
  line("notify", c.notify ? "true" : "false");
  o << "[idempotency]\n";
  line("ttl_seconds", Ms(c.key_ttl) / 1000);
  line("lease_ms", Ms(c.lease));
  line("completer_grace_ms", Ms(c.completer_grace));
  o << "[auth]\n";
  line("admin_token", Quoted(c.admin_token));
  o << "api_keys = {";
  for (const auto& [key, tenant] : c.api_keys) {
    o << (&key == &c.api_keys.begin()->first ? " " : ", ") << Quoted(key) << " = "
      << Quoted(tenant);
  }
  o << " }\n";
  o << "[psp]\n";
  line("url", Quoted(c.psp_url));
  line("timeout_ms", Ms(c.psp_timeout));
  o << "webhook_secrets = [";
  for (const std::string& secret : c.webhook_secrets) o << Quoted(secret) << ", ";
  o << "]\n";
  line("webhook_tolerance_seconds", Ms(c.webhook_tolerance) / 1000);
  o << "[mail]\n";
  line("url", Quoted(c.mail_url));
  line("timeout_ms", Ms(c.mail_timeout));
  o << "[consumers]\n";
  line("visibility_ms", Ms(c.visibility));
  line("max_attempts", c.max_attempts);
  line("backoff_initial_ms", Ms(c.backoff_initial));
  line("backoff_max_ms", Ms(c.backoff_max));
  o << "[effects]\n";
  line("max_attempts", c.effect_max_attempts);
  line("lease_ms", Ms(c.effect_lease));
  o << "[admin]\n";
  line("failpoints", c.admin_failpoints ? "true" : "false");
  line("clock", c.admin_clock ? "true" : "false");
  o << "[retention]\n";
  line("sweep_interval_ms", Ms(c.sweep_interval));
  line("sweep_pass_ms", Ms(c.sweep_pass));
  line("inbox_sweep_pass_ms", Ms(c.inbox_sweep_pass));
  o << "[log]\n";
  line("level", Quoted(c.log_level));
  return o.str();
}

bool Within(int64_t v, int64_t lo, int64_t hi) { return v >= lo && v <= hi; }

// The ranges LoadServiceConfig documents and enforces.
std::string OutOfRange(const ServiceConfig& c) {
  struct Range {
    const char* name;
    int64_t value, lo, hi;
  };
  const Range ranges[] = {
      {"io_threads", c.io_threads, 1, 64},
      {"worker_threads", c.worker_threads, 1, 1024},
      {"body_limit", static_cast<int64_t>(c.body_limit), 1024, 64 << 20},
      {"header_limit", static_cast<int64_t>(c.header_limit), 1024, 1 << 20},
      {"max_header_fields", static_cast<int64_t>(c.max_header_fields), 8, 10000},
      {"max_connections", c.max_connections, 1, 1 << 20},
      {"header_timeout", Ms(c.header_timeout), 100, 3600000},
      {"body_timeout", Ms(c.body_timeout), 100, 3600000},
      {"shutdown_drain", Ms(c.shutdown_drain), 0, 600000},
      {"key_ttl", Ms(c.key_ttl), 1000, 365LL * 86400 * 1000},
      {"lease", Ms(c.lease), 100, 3600000},
      {"completer_grace", Ms(c.completer_grace), 0, 86400000},
      {"psp_timeout", Ms(c.psp_timeout), 10, 600000},
      {"webhook_tolerance", Ms(c.webhook_tolerance), 1000, 86400000},
      {"mail_timeout", Ms(c.mail_timeout), 10, 600000},
      {"visibility", Ms(c.visibility), 10, 86400000},
      {"max_attempts", c.max_attempts, 1, 1000},
      {"backoff_initial", Ms(c.backoff_initial), 0, 3600000},
      {"backoff_max", Ms(c.backoff_max), 0, 86400000},
      {"effect_max_attempts", c.effect_max_attempts, 1, 1000},
      {"effect_lease", Ms(c.effect_lease), 10, 86400000},
      {"sweep_interval", Ms(c.sweep_interval), 100, 86400000},
      {"sweep_pass", Ms(c.sweep_pass), 1000, 30LL * 86400000},
      {"inbox_sweep_pass", Ms(c.inbox_sweep_pass), 1000, 365LL * 86400000},
  };
  for (const Range& r : ranges) {
    if (!Within(r.value, r.lo, r.hi)) return std::string(r.name) + " = " + std::to_string(r.value);
  }
  if (c.address.empty()) return "an empty listen address";
  return {};
}

Result<ServiceConfig> LoadText(const TempDir& dir, std::string_view text) {
  const std::string path = dir.File("config.toml");
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    FUZZ_CHECK(out.good(), "cannot write " + path);
  }
  try {
    return payments::LoadServiceConfig(path);
  } catch (const std::exception& e) {
    Fail("LoadServiceConfig does not throw", __FILE__, __LINE__,
         std::string(e.what()) + " for " + Quote(text));
  }
}

void CheckConfig(const TempDir& dir, std::string_view text) {
  auto config = LoadText(dir, text);
  if (!config) {
    FUZZ_CHECK(config.error().code() == StatusCode::kInvalidArgument,
               config.error().ToString() + " for " + Quote(text));
    return;
  }
  const std::string bad = OutOfRange(*config);
  FUZZ_CHECK(bad.empty(), "accepted out of range: " + bad + " from " + Quote(text));
  const std::string emitted = Emit(*config);
  auto reloaded = LoadText(dir, emitted);
  FUZZ_CHECK(reloaded.has_value(), "the config written back is rejected: " +
                                       reloaded.error().ToString() + "\n" + emitted);
  const std::string again = Emit(*reloaded);
  FUZZ_CHECK(again == emitted, "the config changes when written back: " + Quote(text) + " gave\n" +
                                   emitted + "and then\n" + again);
}

}  // namespace
}  // namespace converge::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace converge::fuzz;
  static const bool env_cleared = [] {
    // The loader lets these override the file; the file alone is under test.
    for (const char* name :
         {"CONVERGE_LISTEN", "CONVERGE_DB", "CONVERGE_ADMIN_TOKEN", "CONVERGE_PSP_URL",
          "CONVERGE_MAIL_URL", "CONVERGE_LOG_LEVEL", "CONVERGE_WEBHOOK_SECRET"}) {
      ::unsetenv(name);
    }
    return true;
  }();
  static const TempDir dir(/*in_memory=*/true);  // removed at exit
  (void)env_cleared;
  CheckConfig(dir, AsText(data, size));
  return 0;
}
