// The one explicit registry from URI scheme to store backend. Core never calls it; apps
// and embedders link converge::converge, which brings every backend built.
#include <algorithm>
#include <span>

#include "converge/database.h"
#include "src/core/store_uri.h"
#include "src/store/sqlite/sqlite_database.h"
#if CONVERGE_WITH_POSTGRES
#include "src/store/postgres/postgres_database.h"
#endif

namespace converge {
namespace {

constexpr std::string_view kSqlite = "sqlite:";

bool IsPostgresUri(std::string_view uri) {
  return uri.rfind("postgresql://", 0) == 0 || uri.rfind("postgres://", 0) == 0;
}

// The parameters the store `uri` names takes; empty for a scheme this build cannot open.
std::span<const std::string_view> ParametersOf(std::string_view uri) {
  if (uri.rfind(kSqlite, 0) == 0) return sqlite::kUriParameters;
#if CONVERGE_WITH_POSTGRES
  if (IsPostgresUri(uri)) return postgres::kUriParameters;
#endif
  return {};
}

}  // namespace

Result<std::unique_ptr<Database>> Database::Open(std::string_view uri,
                                                 const DatabaseOptions& options) {
  if (options.max_attempts < 1) {
    return tl::unexpected(InvalidArgumentError("DatabaseOptions: max_attempts is " +
                                               std::to_string(options.max_attempts) +
                                               "; it must be at least 1"));
  }
  if (uri.rfind(kSqlite, 0) == 0) {
    std::string_view location = uri.substr(kSqlite.size());
    // Accept sqlite://PATH as well as sqlite:PATH.
    if (location.rfind("//", 0) == 0) location.remove_prefix(2);
    return sqlite::Open(location, options);
  }
  if (IsPostgresUri(uri)) {
#if CONVERGE_WITH_POSTGRES
    return postgres::Open(uri, options);
#else
    return tl::unexpected(InvalidArgumentError(
        "this converge was built without PostgreSQL support (CONVERGE_WITH_POSTGRES=OFF); "
        "it opens sqlite:PATH only"));
#endif
  }
  // Name the scheme only: a URI may carry a password.
  const size_t colon = uri.find(':');
  const std::string what =
      colon == std::string_view::npos
          ? "database URI '" + std::string(uri) + "' has no scheme"
          : "unknown database URI scheme '" + std::string(uri.substr(0, colon)) + ":'";
  return tl::unexpected(
      InvalidArgumentError(what + ": expected sqlite:PATH or postgresql://USER@HOST:PORT/DB"));
}

std::string Database::WithDefaultParameter(std::string_view uri, std::string_view name,
                                           std::string_view value) {
  const auto known = ParametersOf(uri);
  if (std::find(known.begin(), known.end(), name) == known.end()) return std::string(uri);
  auto parsed = internal::StoreUri::Parse(uri);
  if (!parsed || parsed->Has(name)) return std::string(uri);
  std::string out(uri);
  if (out.find('?') == std::string::npos) {
    out += '?';
  } else if (out.back() != '?' && out.back() != '&') {
    out += '&';
  }
  return out + std::string(name) + "=" + std::string(value);
}

}  // namespace converge
