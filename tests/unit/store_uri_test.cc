// Store settings in the URI's query (Database::Open): parsing, every bad input refused
// with a message naming it, SQLite's parameters taking effect, defaults from an
// application's configuration, and what the registry does with a PostgreSQL URI in
// either build.
#include "src/core/store_uri.h"

#include <atomic>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "converge/database.h"
#include "src/store/sqlite/sqlite_database.h"
#include "tests/unit/test_util.h"
#if CONVERGE_WITH_POSTGRES
#include "src/store/postgres/postgres_database.h"
#endif

namespace converge {
namespace {

using internal::StoreUri;
using testing::TempDir;

TEST(StoreUri, SplitsTheBaseFromItsParametersAndJoinsWhatIsLeft) {
  auto u = StoreUri::Parse("postgresql://u@h/db?sslmode=disable&pool_size=4&&connect_timeout=3&");
  ASSERT_TRUE(u) << u.error().ToString();
  EXPECT_EQ(u->base(), "postgresql://u@h/db");
  EXPECT_TRUE(u->Has("pool_size"));
  auto pool = u->TakeInt("pool_size", 1, 100);
  ASSERT_TRUE(pool) << pool.error().ToString();
  EXPECT_EQ(*pool, 4);
  EXPECT_FALSE(u->Has("pool_size"));
  auto absent = u->TakeBool("notify");
  ASSERT_TRUE(absent);
  EXPECT_FALSE(absent->has_value());
  EXPECT_EQ(u->Rest(), "sslmode=disable&connect_timeout=3");

  auto plain = StoreUri::Parse("app.db");
  ASSERT_TRUE(plain);
  EXPECT_EQ(plain->base(), "app.db");
  EXPECT_EQ(plain->Rest(), "");
  EXPECT_TRUE(plain->RefuseRest("sqlite", {}).ok());
}

TEST(StoreUri, RefusesMalformedParameters) {
  for (const char* bad : {"app.db?readers", "app.db?=4", "app.db?a=1&b"}) {
    auto u = StoreUri::Parse(bad);
    ASSERT_FALSE(u) << bad;
    EXPECT_EQ(u.error().code(), StatusCode::kInvalidArgument) << bad;
  }
}

TEST(StoreUri, RefusesRepeatedAndBadValuesNamingTheParameter) {
  auto u = StoreUri::Parse("x?readers=2&readers=3&n=12x&big=99&flag=yes");
  ASSERT_TRUE(u);
  auto twice = u->TakeInt("readers", 1, 10);
  ASSERT_FALSE(twice);
  EXPECT_NE(twice.error().message().find("'readers' is given more than once"), std::string::npos)
      << twice.error().ToString();
  auto junk = u->TakeInt("n", 0, 100);
  ASSERT_FALSE(junk);
  EXPECT_NE(junk.error().message().find("n=12x"), std::string::npos) << junk.error().ToString();
  auto range = u->TakeInt("big", 0, 10);
  ASSERT_FALSE(range);
  EXPECT_NE(range.error().message().find("big=99 is not an integer from 0 to 10"),
            std::string::npos)
      << range.error().ToString();
  auto flag = u->TakeBool("flag");
  ASSERT_FALSE(flag);
  EXPECT_NE(flag.error().message().find("flag=yes must be true or false"), std::string::npos);
}

TEST(StoreUri, RefuseRestNamesEveryUnknownParameterAndWhatTheStoreTakes) {
  auto u = StoreUri::Parse("app.db?synchronus=full&pool_size=3");
  ASSERT_TRUE(u);
  constexpr std::string_view kKnown[] = {"synchronous", "readers"};
  Status st = u->RefuseRest("sqlite", kKnown);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(),
            "sqlite URI: unknown parameters 'synchronus', 'pool_size'; it takes synchronous, "
            "readers");
}

// Runs `sql` in a write transaction and returns the integer it yields (-1 on error).
int64_t WriterInt(Database& db, const std::string& sql) {
  int64_t out = -1;
  Status st = db.Transact([&](Tx& tx) -> Status {
    CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query(sql));
    out = rows.at(0).Int(0);
    return OkStatus();
  });
  EXPECT_TRUE(st.ok()) << st.ToString();
  return out;
}

TEST(SqliteUriParameters, DefaultsAreFullSyncAndAFiveSecondBusyTimeout) {
  TempDir dir;
  auto db = Database::Open("sqlite:" + dir.File("db.sqlite"));
  ASSERT_TRUE(db) << db.error().ToString();
  EXPECT_EQ(WriterInt(**db, "PRAGMA synchronous"), 2);  // FULL
  EXPECT_EQ(WriterInt(**db, "PRAGMA busy_timeout"), 5000);
}

// The page cache and the memory map are set on the writer's and each reader's connection,
// each without the other.
TEST(SqliteUriParameters, CacheAndMemoryMapReachEveryConnection) {
  TempDir dir;
  auto reader_int = [](Database& db, const std::string& sql) {
    int64_t out = -1;
    EXPECT_TRUE(db.Read([&](Tx& tx) -> Status {
                    CONVERGE_ASSIGN_OR_RETURN(Rows rows, tx.Query(sql));
                    out = rows.at(0).Int(0);
                    return OkStatus();
                  }).ok());
    return out;
  };
  auto cached = Database::Open("sqlite:" + dir.File("cached.sqlite") + "?cache_mib=8");
  ASSERT_TRUE(cached) << cached.error().ToString();
  EXPECT_EQ(WriterInt(**cached, "PRAGMA cache_size"), -8 * 1024);
  EXPECT_EQ(reader_int(**cached, "PRAGMA cache_size"), -8 * 1024);
  EXPECT_EQ(reader_int(**cached, "PRAGMA mmap_size"), 0);  // Debian's build maps nothing
  auto mapped = Database::Open("sqlite:" + dir.File("mapped.sqlite") + "?mmap_mib=16");
  ASSERT_TRUE(mapped) << mapped.error().ToString();
  EXPECT_EQ(WriterInt(**mapped, "PRAGMA mmap_size"), int64_t{16} << 20);
  EXPECT_EQ(reader_int(**mapped, "PRAGMA mmap_size"), int64_t{16} << 20);
  EXPECT_EQ(reader_int(**mapped, "PRAGMA cache_size"), -2000);  // SQLite's default
}

// However long a caller woken early spins (early_wake_us): not at all, less than any
// commit (so it sleeps again), the default, longer than any commit. Each caller returns
// once its own call committed, with its result, in batches of several callers (where
// the writer wakes the first early on a machine of two CPUs or more).
TEST(SqliteUriParameters, EarlyWakeKeepsEveryCallersResult) {
  TempDir dir;
  for (int spin_us : {0, 1, 2000, 1000000}) {
    SCOPED_TRACE("early_wake_us=" + std::to_string(spin_us));
    auto db = Database::Open("sqlite:" + dir.File("wake" + std::to_string(spin_us) + ".db") +
                             "?early_wake_us=" + std::to_string(spin_us));
    ASSERT_TRUE(db) << db.error().ToString();
    ASSERT_TRUE((*db)->Transact([](Tx& tx) {
                       return StatusOf(tx.Exec("CREATE TABLE calls (n INTEGER PRIMARY KEY)"));
                     }).ok());
    constexpr int kCallers = 16;
    constexpr int kCalls = 40;
    std::vector<std::thread> callers;
    for (int c = 0; c < kCallers; ++c) {
      callers.emplace_back([&, c] {
        for (int i = 0; i < kCalls; ++i) {
          const int64_t n = c * kCalls + i;
          Status st = (*db)->Transact([&](Tx& tx) -> Status {
            CONVERGE_RETURN_IF_ERROR(tx.Exec("INSERT INTO calls (n) VALUES ($1)", n));
            return n % 7 == 3 ? InvalidArgumentError("call " + std::to_string(n)) : OkStatus();
          });
          if (n % 7 == 3) {
            EXPECT_EQ(st.message(), "call " + std::to_string(n));
          } else {
            EXPECT_TRUE(st.ok()) << st.ToString();
          }
          // Committed (or rolled back) by the time Transact returned.
          int64_t found = -1;
          EXPECT_TRUE((*db)->Read([&](Tx& tx) -> Status {
                               CONVERGE_ASSIGN_OR_RETURN(
                                   Rows rows,
                                   tx.Query("SELECT count(*) FROM calls WHERE n = $1", n));
                               found = rows.at(0).Int(0);
                               return OkStatus();
                             }).ok());
          EXPECT_EQ(found, n % 7 == 3 ? 0 : 1) << "call " << n;
        }
      });
    }
    for (auto& t : callers) t.join();
    EXPECT_GE((*db)->stats().largest_batch, 2);
  }
}

TEST(SqliteUriParameters, EachTakesEffect) {
  TempDir dir;
  auto db = Database::Open("sqlite://" + dir.File("db.sqlite") +
                           "?synchronous=normal&busy_timeout_ms=250&max_batch=1&readers=1");
  ASSERT_TRUE(db) << db.error().ToString();
  EXPECT_EQ(WriterInt(**db, "PRAGMA synchronous"), 1);  // NORMAL
  EXPECT_EQ(WriterInt(**db, "PRAGMA busy_timeout"), 250);
  // max_batch=1: however many callers queue up, each commit carries one.
  std::vector<std::thread> callers;
  for (int i = 0; i < 8; ++i) {
    callers.emplace_back([&] {
      EXPECT_TRUE((*db)->Transact([](Tx& tx) { return StatusOf(tx.Query("SELECT 1")); }).ok());
    });
  }
  for (auto& t : callers) t.join();
  EXPECT_EQ((*db)->stats().largest_batch, 1);
  // readers=1: a second Read waits for the one reader connection until the first ends.
  std::atomic<bool> second_ran{false};
  std::thread second;
  EXPECT_TRUE((*db)->Read([&](Tx&) {
                     second = std::thread([&] {
                       EXPECT_TRUE((*db)->Read([&](Tx&) {
                                          second_ran = true;
                                          return OkStatus();
                                        }).ok());
                     });
                     EXPECT_FALSE(testing::WaitUntil([&] { return second_ran.load(); },
                                                     std::chrono::milliseconds(200)))
                         << "a second reader connection was opened";
                     return OkStatus();
                   }).ok());
  second.join();
  EXPECT_TRUE(second_ran.load());
  // The file is the path before the '?'.
  auto again = Database::Open("sqlite:" + dir.File("db.sqlite"));
  ASSERT_TRUE(again) << again.error().ToString();
}

TEST(SqliteUriParameters, EveryBadParameterIsRefusedByName) {
  TempDir dir;
  const std::string base = "sqlite:" + dir.File("db.sqlite");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"?synchronous=fast", "synchronous=fast must be full or normal"},
      {"?max_batch=0", "max_batch=0 is not an integer"},
      {"?readers=many", "readers=many is not an integer"},
      {"?busy_timeout_ms=-1", "busy_timeout_ms=-1 is not an integer"},
      {"?checkpoint_pages=0", "checkpoint_pages=0 is not an integer"},
      {"?cache_mib=65537", "cache_mib=65537 is not an integer"},
      {"?mmap_mib=-1", "mmap_mib=-1 is not an integer"},
      {"?early_wake_us=1000001", "early_wake_us=1000001 is not an integer"},
      {"?readers=2&readers=2", "'readers' is given more than once"},
      {"?pool_size=4", "sqlite URI: unknown parameter 'pool_size'; it takes synchronous, "
                       "max_batch, busy_timeout_ms, readers, checkpoint_pages, cache_mib, "
                       "mmap_mib, early_wake_us"},
      {"?notify=true", "unknown parameter 'notify'"},
      {"?synchronous", "'synchronous' is not name=value"},
  };
  for (const auto& [query, message] : cases) {
    auto db = Database::Open(base + query);
    ASSERT_FALSE(db) << query;
    EXPECT_EQ(db.error().code(), StatusCode::kInvalidArgument) << query;
    EXPECT_NE(db.error().message().find(message), std::string::npos)
        << query << ": " << db.error().ToString();
  }
  auto no_path = Database::Open("sqlite:?readers=2");
  ASSERT_FALSE(no_path);
  EXPECT_EQ(no_path.error().code(), StatusCode::kInvalidArgument);
}

TEST(DatabaseOpen, RefusesMaxAttemptsBelowOne) {
  TempDir dir;
  auto db = Database::Open("sqlite:" + dir.File("db.sqlite"), DatabaseOptions{.max_attempts = 0});
  ASSERT_FALSE(db);
  EXPECT_EQ(db.error().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(db.error().message().find("max_attempts"), std::string::npos);
}

TEST(DatabaseOpen, UnknownSchemeIsNamedWithoutTheRestOfTheUri) {
  auto db = Database::Open("mysql://root:secret@db/app");
  ASSERT_FALSE(db);
  EXPECT_EQ(db.error().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(db.error().message().find("'mysql:'"), std::string::npos) << db.error().ToString();
  EXPECT_EQ(db.error().message().find("secret"), std::string::npos) << db.error().ToString();
  auto bare = Database::Open("app.db");
  ASSERT_FALSE(bare);
  EXPECT_NE(bare.error().message().find("has no scheme"), std::string::npos);
}

TEST(DatabaseWithDefaultParameter, AddsOnlyWhatTheStoreTakesAndTheUriLacks) {
  EXPECT_EQ(Database::WithDefaultParameter("sqlite:app.db", "synchronous", "normal"),
            "sqlite:app.db?synchronous=normal");
  EXPECT_EQ(Database::WithDefaultParameter("sqlite:app.db?readers=2", "synchronous", "full"),
            "sqlite:app.db?readers=2&synchronous=full");
  EXPECT_EQ(Database::WithDefaultParameter("sqlite:app.db?", "readers", "3"),
            "sqlite:app.db?readers=3");
  // The URI's own setting wins.
  EXPECT_EQ(Database::WithDefaultParameter("sqlite:app.db?synchronous=normal", "synchronous",
                                           "full"),
            "sqlite:app.db?synchronous=normal");
  // A setting the store does not have is left out, not refused later.
  EXPECT_EQ(Database::WithDefaultParameter("sqlite:app.db", "pool_size", "32"), "sqlite:app.db");
  EXPECT_EQ(Database::WithDefaultParameter("mysql://x", "pool_size", "32"), "mysql://x");
}

// The parser Open runs first, alone (the store_uri fuzz target's subject).
TEST(SqliteUriParameters, ParseLocationReadsWithoutOpeningAndFormatReadsBack) {
  auto s = sqlite::ParseLocation(
      "no/such/dir/app.db?readers=7&synchronous=normal&max_batch=9&cache_mib=64&mmap_mib=256"
      "&early_wake_us=0");
  ASSERT_TRUE(s) << s.error().ToString();
  EXPECT_EQ(s->path, "no/such/dir/app.db");
  EXPECT_EQ(s->readers, 7u);
  EXPECT_FALSE(s->synchronous_full);
  EXPECT_EQ(s->max_batch, 9u);
  EXPECT_EQ(s->busy_timeout, Millis(5000));
  EXPECT_EQ(s->cache_mib, 64);
  EXPECT_EQ(s->mmap_mib, 256);
  EXPECT_EQ(s->early_wake_us, 0);
  const std::string again = sqlite::FormatLocation(*s);
  EXPECT_EQ(again, "no/such/dir/app.db?synchronous=normal&max_batch=9&busy_timeout_ms=5000"
                   "&readers=7&checkpoint_pages=1000&cache_mib=64&mmap_mib=256"
                   "&early_wake_us=0");
  auto reread = sqlite::ParseLocation(again);
  ASSERT_TRUE(reread) << reread.error().ToString();
  EXPECT_EQ(reread->path, s->path);
  EXPECT_EQ(reread->readers, 7u);
  EXPECT_EQ(reread->cache_mib, 64);
  EXPECT_EQ(reread->mmap_mib, 256);
  EXPECT_EQ(reread->early_wake_us, 0);
  EXPECT_EQ(sqlite::ParseLocation("x")->early_wake_us, 2000);
  EXPECT_FALSE(reread->synchronous_full);
  EXPECT_FALSE(sqlite::ParseLocation("?readers=2"));
  EXPECT_FALSE(sqlite::ParseLocation("x?readers=0"));
}

#if CONVERGE_WITH_POSTGRES

TEST(PostgresUriParameters, ParseUriKeepsLibpqsPartAndFormatReadsBack) {
  auto s = postgres::ParseUri(
      "postgresql://u@h:1/db?sslmode=disable&pool_size=3&lock_timeout_ms=0&connect_timeout=2"
      "&retention=partitioned&statement_cache=0");
  ASSERT_TRUE(s) << s.error().ToString();
  EXPECT_EQ(s->libpq_uri, "postgresql://u@h:1/db?sslmode=disable&connect_timeout=2");
  EXPECT_EQ(s->pool_size, 3u);
  EXPECT_EQ(s->lock_timeout_ms, 0);
  EXPECT_FALSE(s->notify);
  EXPECT_EQ(s->partitioned, std::optional<bool>(true));
  EXPECT_EQ(s->statement_cache, 0u);
  const std::string again = postgres::FormatUri(*s);
  EXPECT_EQ(again, "postgresql://u@h:1/db?sslmode=disable&connect_timeout=2&pool_size=3"
                   "&lock_timeout_ms=0&retention=partitioned&statement_cache=0");
  auto reread = postgres::ParseUri(again);
  ASSERT_TRUE(reread) << reread.error().ToString();
  EXPECT_EQ(reread->libpq_uri, s->libpq_uri);
  EXPECT_EQ(reread->pool_size, 3u);
  EXPECT_EQ(reread->lock_timeout_ms, 0);
  EXPECT_EQ(reread->partitioned, std::optional<bool>(true));
  EXPECT_EQ(reread->statement_cache, 0u);
  EXPECT_EQ(postgres::Settings{}.statement_cache, 256u);
  EXPECT_EQ(postgres::FormatUri(postgres::Settings{.libpq_uri = "postgres://h/db"}),
            "postgres://h/db");
}

TEST(DatabaseWithDefaultParameter, PostgresTakesPoolSizeAndNotify) {
  EXPECT_EQ(Database::WithDefaultParameter("postgresql://u@h/db?sslmode=disable", "pool_size",
                                           "32"),
            "postgresql://u@h/db?sslmode=disable&pool_size=32");
  EXPECT_EQ(Database::WithDefaultParameter("postgres://u@h/db", "notify", "true"),
            "postgres://u@h/db?notify=true");
  EXPECT_EQ(Database::WithDefaultParameter("postgresql://u@h/db", "synchronous", "full"),
            "postgresql://u@h/db");
  EXPECT_EQ(Database::WithDefaultParameter("postgresql://u@h/db", "lock_timeout_ms", "100"),
            "postgresql://u@h/db?lock_timeout_ms=100");
}

// Checked before any connection is tried: port 1 on loopback has no server, so reaching
// libpq's connect would be kUnavailable instead.
TEST(PostgresUriParameters, BadParametersAreRefusedBeforeConnecting) {
  const std::string base = "postgresql://converge@127.0.0.1:1/none";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"?pool_size=0", "pool_size=0 is not an integer from 1"},
      {"?notify=yes", "notify=yes must be true or false"},
      {"?notify=true&notify=true", "'notify' is given more than once"},
      {"?lock_timeout_ms=-1", "lock_timeout_ms=-1 is not an integer from 0"},
      {"?lock_timeout_ms=soon", "lock_timeout_ms=soon is not an integer"},
      {"?statement_cache=-1", "statement_cache=-1 is not an integer from 0"},
      {"?pool_sise=4", "pool_sise"},
      {"?synchronous=full", "synchronous"},
      {"?sslmode=disable&readers=2", "readers"},
  };
  for (const auto& [query, message] : cases) {
    auto db = Database::Open(base + query);
    ASSERT_FALSE(db) << query;
    EXPECT_EQ(db.error().code(), StatusCode::kInvalidArgument) << query << ": "
                                                               << db.error().ToString();
    EXPECT_NE(db.error().message().find(message), std::string::npos)
        << query << ": " << db.error().ToString();
  }
  // libpq's own parameters pass through: this one fails to connect, not to parse.
  auto db =
      Database::Open(base + "?connect_timeout=2&pool_size=2&notify=false&lock_timeout_ms=0");
  ASSERT_FALSE(db);
  EXPECT_EQ(db.error().code(), StatusCode::kUnavailable) << db.error().ToString();
}

#else

TEST(DatabaseOpen, PostgresUriIsRefusedWhenBuiltWithoutPostgres) {
  for (const char* uri : {"postgresql://u@127.0.0.1/db", "postgres://u@127.0.0.1/db"}) {
    auto db = Database::Open(uri);
    ASSERT_FALSE(db) << uri;
    EXPECT_EQ(db.error().code(), StatusCode::kInvalidArgument) << uri;
    EXPECT_NE(db.error().message().find("built without PostgreSQL support"), std::string::npos)
        << db.error().ToString();
  }
  EXPECT_EQ(Database::WithDefaultParameter("postgresql://u@h/db", "pool_size", "32"),
            "postgresql://u@h/db");
}

#endif  // CONVERGE_WITH_POSTGRES

}  // namespace
}  // namespace converge
