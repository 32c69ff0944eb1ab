// Fuzz target: the store URI registry (Database::Open), its scheme dispatch only. The whole
// input is the URI.
//
// What is covered, and why no more: opening a postgresql:// URI connects wherever it
// points, and a sqlite: URI creates a file wherever it points, so neither is opened as
// fuzzed. Backend settings are moving into the URI's query; when they do, their parsing
// deserves a target of its own that stops before any connection or file.
//
// Properties:
//  - a URI that is neither sqlite: nor postgresql:// / postgres:// is kInvalidArgument,
//    and its message names the URI forms that work;
//  - a sqlite: URI with an empty path (sqlite:, sqlite://) is kInvalidArgument;
//  - a sqlite: URI is opened with its path made harmless: the path's bytes, each outside
//    [A-Za-z0-9._-] replaced by '_', as one file name in a temporary directory (on tmpfs
//    when /dev/shm is there; after `sqlite:` or `sqlite://`, as sent). Such a path always
//    opens, migrated, as that file.
//  - postgres URIs are recognised (the classification below), never opened.
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

#include "converge/database.h"
#include "fuzz/fuzz_support.h"

namespace converge::fuzz {
namespace {

bool StartsWith(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

// One file name in `dir` for a fuzzed sqlite path; empty stays empty.
std::string Harmless(std::string_view path) {
  std::string name;
  for (char c : path.substr(0, 64)) {
    const bool kept = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                      c == '.' || c == '_' || c == '-';
    name.push_back(kept ? c : '_');
  }
  // "." and ".." name directories.
  if (name.find_first_not_of('.') == std::string::npos && !name.empty()) name += "_db";
  return name;
}

void CheckUri(const TempDir& dir, std::string_view uri) {
  constexpr std::string_view kSqlite = "sqlite:";
  if (StartsWith(uri, "postgresql://") || StartsWith(uri, "postgres://")) return;
  if (!StartsWith(uri, kSqlite)) {
    auto db = Database::Open(uri);
    FUZZ_CHECK(!db && db.error().code() == StatusCode::kInvalidArgument,
               "unknown scheme not refused: " + Quote(uri) +
                   (db ? std::string(" opened") : " gave " + db.error().ToString()));
    FUZZ_CHECK(db.error().message().find("sqlite:PATH") != std::string::npos &&
                   db.error().message().find("postgresql://") != std::string::npos,
               "the refusal does not name the forms that work: " + db.error().message());
    return;
  }
  std::string_view path = uri.substr(kSqlite.size());
  const bool slashes = StartsWith(path, "//");
  if (slashes) path.remove_prefix(2);
  const std::string name = Harmless(path);
  if (name.empty()) {
    auto db = Database::Open(uri);
    FUZZ_CHECK(!db && db.error().code() == StatusCode::kInvalidArgument,
               "an empty sqlite path was not refused: " + Quote(uri));
    return;
  }
  const std::string file = dir.File(name);
  const std::string safe_uri = std::string(kSqlite) + (slashes ? "//" : "") + file;
  {
    auto db = Database::Open(safe_uri);
    FUZZ_CHECK(db.has_value(), "cannot open " + Quote(safe_uri) + " for " + Quote(uri) + ": " +
                                   db.error().ToString());
  }
  std::error_code ec;
  FUZZ_CHECK(std::filesystem::exists(file, ec), "sqlite: opened something else than " + file);
  for (const char* suffix : {"", "-wal", "-shm", "-journal"}) {
    std::filesystem::remove(file + suffix, ec);
  }
}

}  // namespace
}  // namespace converge::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const converge::fuzz::TempDir dir(/*in_memory=*/true);  // removed at exit
  converge::fuzz::CheckUri(dir, converge::fuzz::AsText(data, size));
  return 0;
}
