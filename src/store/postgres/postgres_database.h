// The PostgreSQL backend behind Database/Tx. Internal: callers use
// Database::Open("postgresql://...").
#ifndef CONVERGE_STORE_POSTGRES_POSTGRES_DATABASE_H_
#define CONVERGE_STORE_POSTGRES_POSTGRES_DATABASE_H_

#include <memory>
#include <string>

#include "converge/database.h"

namespace converge::postgres {

// Connects (libpq URI), applies pending migrations under an advisory lock, and returns a
// pooled Database. kUnavailable when the server cannot be reached.
Result<std::unique_ptr<Database>> Open(const std::string& uri, const DatabaseOptions& options);

}  // namespace converge::postgres

#endif  // CONVERGE_STORE_POSTGRES_POSTGRES_DATABASE_H_
