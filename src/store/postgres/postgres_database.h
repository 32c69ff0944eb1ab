// The PostgreSQL backend behind Database/Tx. Internal: callers use
// Database::Open("postgresql://...").
#ifndef CONVERGE_STORE_POSTGRES_POSTGRES_DATABASE_H_
#define CONVERGE_STORE_POSTGRES_POSTGRES_DATABASE_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "converge/database.h"

namespace converge::postgres {

// converge's own parameters in a postgresql:// URI's query (database.h, Database::Open);
// every other parameter is libpq's.
inline constexpr std::array<std::string_view, 5> kUriParameters = {
    "pool_size", "notify", "lock_timeout_ms", "retention", "statement_cache"};

// What a postgresql:// URI asks of converge, read without connecting.
struct Settings {
  std::string libpq_uri;  // the URI with converge's own parameters taken out
  size_t pool_size = 16;
  bool notify = false;
  int64_t lock_timeout_ms = 5000;
  // retention=...: nullopt when the URI leaves it to the store (database.h).
  std::optional<bool> partitioned;
  // statement_cache=...: how many server-side prepared statements each connection keeps
  // (statement_cache.h); 0 sends every statement unnamed (a pooler in front that cannot
  // keep a session's prepared statements).
  size_t statement_cache = 256;
};

// Errors (kInvalidArgument): one of converge's parameters given twice or out of range; a
// URI libpq cannot parse (PQconninfoParse, which also refuses parameters it does not know).
Result<Settings> ParseUri(std::string_view uri);
// `settings` as a URI ParseUri reads back to the same settings; converge's parameters
// are written when they differ from the defaults.
std::string FormatUri(const Settings& settings);

// Takes converge's parameters out of `uri`, connects with the rest (a libpq URI),
// applies pending migrations under an advisory lock, and returns a pooled Database.
// kInvalidArgument when a parameter is bad or neither converge's nor libpq's;
// kUnavailable when the server cannot be reached.
Result<std::unique_ptr<Database>> Open(std::string_view uri, const DatabaseOptions& options);

}  // namespace converge::postgres

#endif  // CONVERGE_STORE_POSTGRES_POSTGRES_DATABASE_H_
