// Fuzz target: store URIs, from the registry's scheme dispatch (Database::Open) down to
// each backend's parameters (sqlite::ParseLocation, postgres::ParseUri). The whole input is
// the URI.
//
// Nothing is opened or connected for a URI that parses: a sqlite: URI would create a file
// wherever it points and a postgresql:// one connect there. The backends' Open is their
// parser followed by the open, so the parser is what is fuzzed; that an opened store uses
// the parsed settings is the unit tests' business (tests/unit/store_uri_test.cc).
//
// Properties:
//  - a URI that is neither sqlite: nor postgresql:// / postgres:// is kInvalidArgument from
//    Database::Open, and its message names the URI forms that work;
//  - sqlite: (after `sqlite:` or `sqlite://`): the location parses exactly when its path
//    (before the first '?') is not empty and its query, cut at '&' with empty pieces
//    skipped, holds only name=value pieces naming each of the seven sqlite parameters at
//    most once, with a value in its range (an independent reading below); a parsed
//    location's path is that prefix, and FormatLocation reads back to the same settings;
//  - postgresql://: a URI that parses keeps libpq's part whole (the URI's base and, in
//    order, every parameter that is not converge's), and FormatUri reads back to the same
//    settings; a refusal is kInvalidArgument;
//  - every refusal of either backend is the very error Database::Open gives (which then
//    opens nothing), so the registry goes through the parser fuzzed here.
#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "converge/database.h"
#include "fuzz/fuzz_support.h"
#include "src/store/sqlite/sqlite_database.h"
#if CONVERGE_WITH_POSTGRES
#include "src/store/postgres/postgres_database.h"
#endif

namespace converge::fuzz {
namespace {

bool StartsWith(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

// The query of `uri` (after its first '?') cut at '&', empty pieces skipped.
std::vector<std::string_view> QueryPieces(std::string_view uri) {
  std::vector<std::string_view> pieces;
  const size_t q = uri.find('?');
  if (q == std::string_view::npos) return pieces;
  std::string_view query = uri.substr(q + 1);
  size_t start = 0;
  while (start <= query.size()) {
    size_t amp = query.find('&', start);
    if (amp == std::string_view::npos) amp = query.size();
    if (amp > start) pieces.push_back(query.substr(start, amp - start));
    start = amp + 1;
  }
  return pieces;
}

// As std::from_chars reads an int64_t: an optional '-', then only digits (leading zeros
// allowed), the whole text.
bool IsDecimalIn(std::string_view text, int64_t min, int64_t max) {
  const bool negative = !text.empty() && text[0] == '-';
  if (negative) text.remove_prefix(1);
  if (text.empty()) return false;
  int64_t v = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return false;
    v = std::min<int64_t>(v * 10 + (c - '0'), int64_t{1} << 40);  // past every max here
  }
  if (negative) v = -v;
  return v >= min && v <= max;
}

// Whether ParseLocation should accept `location`, read independently of it.
bool SqliteShouldParse(std::string_view location) {
  if (location.substr(0, location.find('?')).empty()) return false;
  std::map<std::string_view, int> seen;
  for (std::string_view piece : QueryPieces(location)) {
    const size_t eq = piece.find('=');
    if (eq == std::string_view::npos || eq == 0) return false;
    const std::string_view name = piece.substr(0, eq);
    const std::string_view value = piece.substr(eq + 1);
    if (++seen[name] > 1) return false;
    if (name == "synchronous") {
      if (value != "full" && value != "normal") return false;
    } else if (name == "max_batch") {
      if (!IsDecimalIn(value, 1, 1 << 20)) return false;
    } else if (name == "busy_timeout_ms") {
      if (!IsDecimalIn(value, 0, 2147483647)) return false;
    } else if (name == "readers") {
      if (!IsDecimalIn(value, 1, 1024)) return false;
    } else if (name == "checkpoint_pages") {
      if (!IsDecimalIn(value, 1, 1 << 24)) return false;
    } else if (name == "cache_mib" || name == "mmap_mib") {
      if (!IsDecimalIn(value, 0, 1 << 16)) return false;
    } else {
      return false;
    }
  }
  return true;
}

bool Same(const sqlite::Settings& a, const sqlite::Settings& b) {
  return a.path == b.path && a.synchronous_full == b.synchronous_full &&
         a.max_batch == b.max_batch && a.busy_timeout == b.busy_timeout &&
         a.readers == b.readers && a.checkpoint_pages == b.checkpoint_pages &&
         a.cache_mib == b.cache_mib && a.mmap_mib == b.mmap_mib;
}

// `refusal` came from a backend's parser: Database::Open must give the same.
void CheckOpenRefuses(std::string_view uri, const Status& refusal) {
  FUZZ_CHECK(refusal.code() == StatusCode::kInvalidArgument,
             "a refusal is not kInvalidArgument: " + Quote(uri) + ": " + refusal.ToString());
  auto db = Database::Open(uri);
  FUZZ_CHECK(!db && db.error().ToString() == refusal.ToString(),
             "Database::Open does not refuse " + Quote(uri) + " as its parser does: " +
                 (db ? std::string("it opened") : db.error().ToString()) + " against " +
                 refusal.ToString());
}

void CheckSqlite(std::string_view uri) {
  std::string_view location = uri.substr(std::string_view("sqlite:").size());
  if (StartsWith(location, "//")) location.remove_prefix(2);
  auto parsed = sqlite::ParseLocation(location);
  const bool should = SqliteShouldParse(location);
  FUZZ_CHECK(parsed.has_value() == should,
             Quote(uri) + (should ? " was refused: " + parsed.error().ToString()
                                  : std::string(" was accepted")));
  if (!parsed) {
    CheckOpenRefuses(uri, parsed.error());
    return;
  }
  FUZZ_CHECK(parsed->path == location.substr(0, location.find('?')),
             "the path of " + Quote(uri) + " is " + Quote(parsed->path));
  const std::string again = sqlite::FormatLocation(*parsed);
  auto reread = sqlite::ParseLocation(again);
  FUZZ_CHECK(reread && Same(*reread, *parsed),
             Quote(again) + " does not read back as " + Quote(uri) + " did");
}

#if CONVERGE_WITH_POSTGRES
bool Same(const postgres::Settings& a, const postgres::Settings& b) {
  return a.libpq_uri == b.libpq_uri && a.pool_size == b.pool_size && a.notify == b.notify &&
         a.lock_timeout_ms == b.lock_timeout_ms && a.partitioned == b.partitioned &&
         a.statement_cache == b.statement_cache;
}

bool IsConvergeParameter(std::string_view piece) {
  const std::string_view name = piece.substr(0, piece.find('='));
  for (std::string_view known : postgres::kUriParameters) {
    if (name == known) return true;
  }
  return false;
}

void CheckPostgres(std::string_view uri) {
  auto parsed = postgres::ParseUri(uri);
  if (!parsed) {
    CheckOpenRefuses(uri, parsed.error());
    return;
  }
  std::string libpq(uri.substr(0, uri.find('?')));
  std::string rest;
  for (std::string_view piece : QueryPieces(uri)) {
    if (IsConvergeParameter(piece)) continue;
    rest += (rest.empty() ? "" : "&") + std::string(piece);
  }
  if (!rest.empty()) libpq += "?" + rest;
  FUZZ_CHECK(parsed->libpq_uri == libpq,
             "libpq's part of " + Quote(uri) + " is " + Quote(parsed->libpq_uri) +
                 ", not " + Quote(libpq));
  const std::string again = postgres::FormatUri(*parsed);
  auto reread = postgres::ParseUri(again);
  FUZZ_CHECK(reread && Same(*reread, *parsed),
             Quote(again) + " does not read back as " + Quote(uri) + " did");
}
#endif

void CheckUri(std::string_view uri) {
  if (StartsWith(uri, "postgresql://") || StartsWith(uri, "postgres://")) {
#if CONVERGE_WITH_POSTGRES
    CheckPostgres(uri);
#endif
    return;
  }
  if (StartsWith(uri, "sqlite:")) {
    CheckSqlite(uri);
    return;
  }
  auto db = Database::Open(uri);
  FUZZ_CHECK(!db && db.error().code() == StatusCode::kInvalidArgument,
             "unknown scheme not refused: " + Quote(uri) +
                 (db ? std::string(" opened") : " gave " + db.error().ToString()));
  FUZZ_CHECK(db.error().message().find("sqlite:PATH") != std::string::npos &&
                 db.error().message().find("postgresql://") != std::string::npos,
             "the refusal does not name the forms that work: " + db.error().message());
}

}  // namespace
}  // namespace converge::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  converge::fuzz::CheckUri(converge::fuzz::AsText(data, size));
  return 0;
}
