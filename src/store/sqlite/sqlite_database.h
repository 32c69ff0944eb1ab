// The SQLite backend behind Database/Tx. Internal: callers use Database::Open("sqlite:…").
#ifndef CONVERGE_STORE_SQLITE_SQLITE_DATABASE_H_
#define CONVERGE_STORE_SQLITE_SQLITE_DATABASE_H_

#include <array>
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

#include "converge/clock.h"
#include "converge/database.h"

namespace converge::sqlite {

// The parameters a sqlite: URI's query may carry (database.h, Database::Open).
inline constexpr std::array<std::string_view, 8> kUriParameters = {
    "synchronous", "max_batch",  "busy_timeout_ms", "readers",
    "checkpoint_pages", "cache_mib", "mmap_mib", "early_wake_us"};

// What a sqlite: location asks for ("PATH?synchronous=normal&readers=8", the URI after
// `sqlite:` or `sqlite://`), read without opening anything.
struct Settings {
  std::string path;  // the location before its '?'; never empty
  bool synchronous_full = true;
  size_t max_batch = 512;
  Millis busy_timeout = Millis(5000);
  size_t readers = 4;
  // WAL pages that start a checkpoint on the checkpointer's thread; past 4 times that
  // the writer checkpoints between its commits (sqlite_database.cc, OnWalCommit).
  int checkpoint_pages = 1000;
  // Page cache of the writer's and of each reader's connection, in MiB; 0: SQLite's own
  // default (2 MiB).
  int cache_mib = 0;
  // Bytes of the file each connection reads through a memory map (PRAGMA mmap_size), in
  // MiB; 0: SQLite's default (none in Debian's build: every page read is a read() into
  // the page cache). SQLite caps it at its compile-time limit (2 GiB in Debian's build).
  int mmap_mib = 0;
  // How long a batch's first caller, woken as the commit starts, spins for its end, in
  // µs; 0: callers are woken only once it ended (handoff.h, EarlyWake).
  int early_wake_us = 2000;
};

// Errors (kInvalidArgument): an empty path; a parameter that is not name=value, unknown,
// given twice, or with a value out of range.
Result<Settings> ParseLocation(std::string_view location);
// `settings` as a location ParseLocation reads back to the same settings, every
// parameter spelled out.
std::string FormatLocation(const Settings& settings);

// Opens (creating if absent) the SQLite file `location` names ("PATH" or
// "PATH?PARAMETERS": what follows "sqlite:"), sets WAL mode, applies pending migrations
// and starts the group-commit writer thread. kInvalidArgument for an empty path or a
// parameter it does not take or cannot read.
Result<std::unique_ptr<Database>> Open(std::string_view location, const DatabaseOptions& options);

}  // namespace converge::sqlite

#endif  // CONVERGE_STORE_SQLITE_SQLITE_DATABASE_H_
