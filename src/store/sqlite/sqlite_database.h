// The SQLite backend behind Database/Tx. Internal: callers use Database::Open("sqlite:…").
#ifndef CONVERGE_STORE_SQLITE_SQLITE_DATABASE_H_
#define CONVERGE_STORE_SQLITE_SQLITE_DATABASE_H_

#include <array>
#include <memory>
#include <string_view>

#include "converge/database.h"

namespace converge::sqlite {

// The parameters a sqlite: URI's query may carry (database.h, Database::Open).
inline constexpr std::array<std::string_view, 4> kUriParameters = {
    "synchronous", "max_batch", "busy_timeout_ms", "readers"};

// Opens (creating if absent) the SQLite file `location` names ("PATH" or
// "PATH?PARAMETERS": what follows "sqlite:"), sets WAL mode, applies pending migrations
// and starts the group-commit writer thread. kInvalidArgument for an empty path or a
// parameter it does not take or cannot read.
Result<std::unique_ptr<Database>> Open(std::string_view location, const DatabaseOptions& options);

}  // namespace converge::sqlite

#endif  // CONVERGE_STORE_SQLITE_SQLITE_DATABASE_H_
