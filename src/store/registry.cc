// The one explicit registry from URI scheme to store backend. Core never calls it; apps
// and embedders link converge::converge, which brings every backend built.
#include "converge/database.h"
#include "src/store/postgres/postgres_database.h"
#include "src/store/sqlite/sqlite_database.h"

namespace converge {

Result<std::unique_ptr<Database>> Database::Open(std::string_view uri,
                                                 const DatabaseOptions& options) {
  constexpr std::string_view kSqlite = "sqlite:";
  if (uri.substr(0, kSqlite.size()) == kSqlite) {
    std::string path(uri.substr(kSqlite.size()));
    // Accept sqlite://PATH as well as sqlite:PATH.
    if (path.rfind("//", 0) == 0) path = path.substr(2);
    return sqlite::Open(path, options);
  }
  if (uri.rfind("postgresql://", 0) == 0 || uri.rfind("postgres://", 0) == 0) {
    return postgres::Open(std::string(uri), options);
  }
  return tl::unexpected(InvalidArgumentError(
      "unknown database URI '" + std::string(uri) +
      "': expected sqlite:PATH or postgresql://USER@HOST:PORT/DB"));
}

}  // namespace converge
