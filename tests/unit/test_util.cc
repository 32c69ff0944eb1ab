#include "tests/unit/test_util.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <thread>

#include "converge/failpoint.h"

namespace converge::testing {

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/converge-test-XXXXXX";
  char* p = mkdtemp(tmpl.data());
  if (p == nullptr) {
    ADD_FAILURE() << "mkdtemp failed";
    return;
  }
  path_ = p;
}

TempDir::~TempDir() {
  std::error_code ec;
  if (!path_.empty()) std::filesystem::remove_all(path_, ec);
}

std::unique_ptr<Database> OpenSqlite(const std::string& path, DatabaseOptions options) {
  auto db = Database::Open("sqlite:" + path, options);
  if (!db) {
    ADD_FAILURE() << "open " << path << ": " << db.error().ToString();
    return nullptr;
  }
  return std::move(*db);
}

int RunInChild(const std::function<bool()>& fn) {
  fflush(nullptr);
  pid_t pid = fork();
  if (pid == 0) {
    bool ok = false;
    ok = fn();
    _exit(ok ? 0 : 1);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  (void)failpoint::Configure("");
  return status;
}

bool KilledBySigkill(int s) { return WIFSIGNALED(s) && WTERMSIG(s) == SIGKILL; }
bool ExitedCleanly(int s) { return WIFEXITED(s) && WEXITSTATUS(s) == 0; }

bool WaitUntil(const std::function<bool()>& cond, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!cond()) {
    if (std::chrono::steady_clock::now() > deadline) return cond();
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return true;
}

int64_t QueryInt(Database& db, const std::string& sql) {
  int64_t out = -1;
  Status st = db.Read([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query(sql));
    if (!rows.empty()) out = rows[0].Int(0);
    return OkStatus();
  });
  if (!st.ok()) ADD_FAILURE() << sql << ": " << st.ToString();
  return out;
}

void CreateEffectsTable(Database& db) {
  Status st = db.Transact([](Tx& tx) {
    return StatusOf(tx.Exec("CREATE TABLE IF NOT EXISTS test_effects (id TEXT PRIMARY KEY, "
                            "n INTEGER NOT NULL DEFAULT 1)"));
  });
  ASSERT_TRUE(st.ok()) << st.ToString();
}

size_t RunUntilIdle(Consumer& c) {
  size_t total = 0;
  for (;;) {
    Result<size_t> n = c.RunOnce();
    EXPECT_TRUE(n.has_value()) << n.error().ToString();
    if (!n || *n == 0) return total;
    total += *n;
  }
}

}  // namespace converge::testing
