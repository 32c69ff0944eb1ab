// Helpers shared by the unit tests: throwaway directories, opening stores, running a
// scenario in a child process that a failpoint kills, and waiting on conditions.
#ifndef CONVERGE_TESTS_UNIT_TEST_UTIL_H_
#define CONVERGE_TESTS_UNIT_TEST_UTIL_H_

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "converge/consumer.h"
#include "converge/database.h"

namespace converge::testing {

// A fresh directory under $TMPDIR, removed with everything in it on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Opens sqlite:<path>, failing the test on error.
std::unique_ptr<Database> OpenSqlite(const std::string& path, DatabaseOptions options = {});

// Runs `fn` in a forked child process and returns its raw wait status. The child exits
// with 0 when fn returns true, 1 when false; a crash failpoint kills it with SIGKILL.
// REQUIRES: the calling process has no other threads running (close databases first).
int RunInChild(const std::function<bool()>& fn);
bool KilledBySigkill(int wait_status);
bool ExitedCleanly(int wait_status);

// Polls `cond` until it holds or `timeout` passes; returns its last value.
bool WaitUntil(const std::function<bool()>& cond,
               std::chrono::milliseconds timeout = std::chrono::seconds(20));

// Runs c.RunOnce() until it settles nothing more; the deliveries settled in all (0 on an
// error, which fails the test). A transport hands out one message of an aggregate at a
// time, so a duplicate of a message comes in the next batch, not beside it.
size_t RunUntilIdle(Consumer& c);

// SELECT count(*) ... convenience: the single integer a query returns (-1 on error).
int64_t QueryInt(Database& db, const std::string& sql);

// Creates a business table `test_effects(id TEXT PRIMARY KEY, n INTEGER)` for handlers.
void CreateEffectsTable(Database& db);

}  // namespace converge::testing

#endif  // CONVERGE_TESTS_UNIT_TEST_UTIL_H_
