// The SQLite backend behind Database/Tx. Internal: callers use Database::Open("sqlite:…").
#ifndef CONVERGE_STORE_SQLITE_SQLITE_DATABASE_H_
#define CONVERGE_STORE_SQLITE_SQLITE_DATABASE_H_

#include <memory>
#include <string>

#include "converge/database.h"

namespace converge::sqlite {

// Opens (creating if absent) the SQLite file at `path`, sets WAL mode, applies pending
// migrations and starts the group-commit writer thread.
Result<std::unique_ptr<Database>> Open(const std::string& path, const DatabaseOptions& options);

}  // namespace converge::sqlite

#endif  // CONVERGE_STORE_SQLITE_SQLITE_DATABASE_H_
