// The PostgreSQL backend behind Database/Tx. Internal: callers use
// Database::Open("postgresql://...").
#ifndef CONVERGE_STORE_POSTGRES_POSTGRES_DATABASE_H_
#define CONVERGE_STORE_POSTGRES_POSTGRES_DATABASE_H_

#include <array>
#include <memory>
#include <string_view>

#include "converge/database.h"

namespace converge::postgres {

// converge's own parameters in a postgresql:// URI's query (database.h, Database::Open);
// every other parameter is libpq's.
inline constexpr std::array<std::string_view, 3> kUriParameters = {"pool_size", "notify",
                                                                   "retention"};

// Takes converge's parameters out of `uri`, connects with the rest (a libpq URI),
// applies pending migrations under an advisory lock, and returns a pooled Database.
// kInvalidArgument when a parameter is bad or neither converge's nor libpq's;
// kUnavailable when the server cannot be reached.
Result<std::unique_ptr<Database>> Open(std::string_view uri, const DatabaseOptions& options);

}  // namespace converge::postgres

#endif  // CONVERGE_STORE_POSTGRES_POSTGRES_DATABASE_H_
