// `converge relay --config` publishing an application's own outbox table, all real
// processes and none of the peers in C++: the application writing rows is Python's sqlite3
// module (SQLite) or psql (PostgreSQL), the HTTP target is a Python receiver that dedupes
// by event id and checks the order per aggregate (tests/outbox_table/app.py). A relay
// SIGKILLed at a failpoint loses nothing and doubles nothing observable; two relays on
// PostgreSQL share the partitions; a row that commits late is published, after the rows
// that committed before it; bad configuration gets a clear error.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "converge/database.h"
#include "converge/http.h"
#include "converge/webhook.h"
#include "harness/serve_process.h"
#include "tests/e2e/support.h"
#include "tests/unit/test_util.h"

namespace converge {
namespace {

using harness::ServeProcess;
using testing::Shell;
using json = nlohmann::json;

constexpr const char* kApp = CONVERGE_SOURCE_DIR "/tests/outbox_table/app.py";

class OutboxTableE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    receiver_ = std::make_unique<testing::PythonPeer>(
        dir_.path(), "receiver", kApp,
        std::vector<std::string>{"receiver", "{port_file}", secret_});
    ASSERT_TRUE(receiver_->WaitReady()) << "the Python receiver did not start";
  }

  // A relay configuration for `store`; `target` and `table` are the TOML sections' extra
  // lines.
  std::string WriteConfig(const std::string& name, const std::string& store,
                          const std::string& table, const std::string& target = "") {
    const std::string path = dir_.File(name + ".toml");
    std::ofstream f(path);
    f << "[relay]\nstore = \"" << store << "\"\nname = \"" << name << "\"\npoll_ms = 50\n"
      << "lease_ms = 6000\n[outbox_table]\ntable = \"outbox\"\nbatch = 50\npoll_ms = 20\n"
      << table << "[target]\n"
      << (target.empty() ? "kind = \"http\"\nurl = \"" + receiver_->Url("/events") +
                               "\"\nsecret = \"" + secret_ + "\"\ntimeout_ms = 2000\n"
                         : target);
    return path;
  }
  std::unique_ptr<ServeProcess> Relay(const std::string& config, const std::string& name) {
    return std::make_unique<ServeProcess>(ServeProcess::Options{
        .binary = CONVERGE_BIN_PATH, .command = "relay", .config_path = config,
        .dir = dir_.path(), .name = name});
  }
  // Starts `relay` with `failpoints` armed and waits for the SIGKILL they cause. The rows
  // are there before it starts, so it may reach the point before it wrote its port file
  // (a loaded machine, a sanitizer build): Start() then fails with the child killed, and
  // that counts as the crash.
  void StartToCrash(ServeProcess& relay, const std::string& failpoints) {
    const Status st = relay.Start(failpoints);
    if (!st.ok()) {
      std::ifstream log(relay.log_path());
      EXPECT_TRUE(relay.killed_at_start())
          << st.ToString() << "\n" << std::string(std::istreambuf_iterator<char>(log), {});
      return;
    }
    EXPECT_TRUE(relay.KilledWithin(std::chrono::seconds(20))) << "see " << relay.log_path();
  }
  json Stats() {
    auto r = client_.Send({.url = receiver_->Url("/stats")});
    return r && r->status == 200 ? json::parse(r->body) : json{{"distinct", -1}};
  }
  // Waits until the receiver holds `n` distinct events; then checks none arrived out of
  // its aggregate's order.
  void ExpectDelivered(int n) {
    EXPECT_TRUE(testing::WaitUntil([&] { return Stats()["distinct"] == n; },
                                   std::chrono::seconds(60)))
        << Stats().dump();
    const json s = Stats();
    EXPECT_EQ(s["distinct"], n);
    EXPECT_TRUE(s["violations"].empty()) << s["violations"].dump();
    EXPECT_EQ(s["bad_signatures"], 0);
  }
  std::string SqliteDb() { return dir_.File("app.db"); }
  void CreateSqliteTable() {
    auto [code, out] = Shell("python3 " + std::string(kApp) + " create-sqlite " + SqliteDb());
    ASSERT_EQ(code, 0) << out;
  }
  void WriteSqlite(int aggregates, int per, const std::string& prefix) {
    auto [code, out] = Shell("python3 " + std::string(kApp) + " write-sqlite " + SqliteDb() + " " +
                             std::to_string(aggregates) + " " + std::to_string(per) + " " + prefix);
    ASSERT_EQ(code, 0) << out;
  }
  int64_t SqliteCount(const std::string& sql) {
    auto db = Database::Open("sqlite:" + SqliteDb());
    return db ? testing::QueryInt(**db, sql) : -1;
  }

  testing::TempDir dir_;
  const std::string secret_ = webhook::NewSecret();
  std::unique_ptr<testing::PythonPeer> receiver_;
  http::Client client_;
};

TEST_F(OutboxTableE2E, SqliteRowsAreDeliveredOnceInOrderPerAggregateThenDeleted) {
  CreateSqliteTable();
  auto relay = Relay(WriteConfig("r1", "sqlite:" + SqliteDb(), "order_column = \"rowid\"\n"),
                     "relay");
  ASSERT_TRUE(relay->Start().ok()) << "see " << relay->log_path();
  WriteSqlite(8, 25, "order-");  // while the relay runs
  ExpectDelivered(200);
  EXPECT_EQ(Stats()["posts"], 200);  // nothing was sent twice without a crash
  EXPECT_TRUE(testing::WaitUntil([&] { return SqliteCount("SELECT count(*) FROM outbox") == 0; }))
      << "published rows are deleted";
  auto metrics = client_.Send({.url = relay->Url("/metrics")});
  ASSERT_TRUE(metrics);
  EXPECT_NE(metrics->body.find("outbox_table_ingested_total 200"), std::string::npos)
      << metrics->body;
}

// Killed after the target took a batch and before the relay marked it; then, in a second
// run, after the relay marked events published and before it deleted their rows. Every
// event arrives, in order per aggregate; the receiver's dedupe by event id absorbs the
// re-sent batch of the first kill, and the second kill sends nothing again.
TEST_F(OutboxTableE2E, SqliteRelayKilledAtFailpointsLosesNothingAndDoublesNothing) {
  CreateSqliteTable();
  WriteSqlite(6, 20, "order-");
  const std::string config =
      WriteConfig("r1", "sqlite:" + SqliteDb(), "order_column = \"rowid\"\n");
  auto relay = Relay(config, "relay");
  StartToCrash(*relay, "relay.after_publish_before_mark=crash@2");
  const int before = Stats()["posts"];
  EXPECT_GT(before, 0);
  ASSERT_TRUE(relay->Start().ok()) << "see " << relay->log_path();
  // The batch the killed relay sent but did not mark is sent again (all 120 events may
  // have reached the receiver before the kill, so wait for the repeat, not the count).
  EXPECT_TRUE(testing::WaitUntil([&] { return Stats()["posts"].get<int>() > before; }))
      << "the unmarked batch was not sent again";
  ExpectDelivered(120);
  ASSERT_TRUE(testing::WaitUntil([&] { return SqliteCount("SELECT count(*) FROM outbox") == 0; }));

  // Ingest copies the 30 rows in one transaction and the relay publishes them in one
  // batch, marking them together; the first finalize that finds them dies before its
  // commit.
  relay->Stop();
  WriteSqlite(6, 5, "later-");
  StartToCrash(*relay, "outbox_table.finalize_before_commit=crash");
  EXPECT_EQ(Stats()["distinct"], 150);
  EXPECT_EQ(SqliteCount("SELECT count(*) FROM outbox"), 30) << "published, not yet deleted";
  // What the file holds as published. Usually all 30. But SQLite's group commit may have
  // run the finalize in the same physical commit as the relay's mark (it saw the mark in
  // the batch's earlier savepoint), and the kill lost both: the relay had not been told
  // the mark committed, so it sends those events again, as it must. (CI met this once.)
  const int64_t marked = SqliteCount(
      "SELECT count(*) FROM outbox a JOIN outbox_events e ON e.event_id = a.id "
      "WHERE e.published_at IS NOT NULL");
  ASSERT_GE(marked, 0) << "the relay's file could not be read";
  const int posts = Stats()["posts"].get<int>();
  ASSERT_TRUE(relay->Start().ok()) << "see " << relay->log_path();
  EXPECT_TRUE(testing::WaitUntil([&] { return SqliteCount("SELECT count(*) FROM outbox") == 0; }));
  ExpectDelivered(150);
  EXPECT_EQ(Stats()["posts"].get<int>(), posts + (30 - marked))
      << "the rows marked published were sent again (" << marked << " of 30 were marked)";
  const json s = Stats();
  for (int a = 0; a < 6; ++a) {
    EXPECT_EQ(s["order"]["later-" + std::to_string(a)].size(), 5u);
  }
}

// The SQL queue in the application's own SQLite file: publish and mark are one local
// transaction, so a kill between them publishes nothing twice; rows are marked, not
// deleted.
TEST_F(OutboxTableE2E, SqlQueueTargetQueuesEachRowOnceAndMarksIt) {
  CreateSqliteTable();
  WriteSqlite(4, 10, "order-");
  const std::string config = WriteConfig(
      "r1", "sqlite:" + SqliteDb(),
      "order_column = \"rowid\"\non_published = \"mark\"\npublished_column = \"published_at\"\n",
      "kind = \"sql_queue\"\nqueue = \"billing\"\npattern = \"order.*\"\n");
  auto relay = Relay(config, "relay");
  StartToCrash(*relay, "relay.after_publish_before_mark=crash@1");
  ASSERT_TRUE(relay->Start().ok()) << "see " << relay->log_path();
  EXPECT_TRUE(testing::WaitUntil([&] {
    return SqliteCount("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL") == 40;
  }));
  EXPECT_EQ(SqliteCount("SELECT count(*) FROM queue_messages WHERE queue = 'billing'"), 40);
  EXPECT_EQ(SqliteCount("SELECT count(DISTINCT event_id) FROM queue_messages "
                        "WHERE queue = 'billing'"),
            40);
  // Each queued event is the row: its id, its aggregate as the subject.
  EXPECT_EQ(SqliteCount("SELECT count(*) FROM queue_messages q JOIN outbox o ON o.id = "
                        "q.event_id AND o.aggregateid = q.subject"),
            40);
}

TEST_F(OutboxTableE2E, BadConfigurationIsRefusedWithAClearError) {
  CreateSqliteTable();
  const std::string bin = CONVERGE_BIN_PATH;
  auto refused = [&](const std::string& table_lines, const std::string& flags = "") {
    return Shell(bin + " relay --config " +
                 WriteConfig("bad", "sqlite:" + SqliteDb(), table_lines) +
                 " --listen 127.0.0.1:0 " + flags);
  };
  auto [code, out] = refused("", "--outbox-table nope");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("outbox table 'nope' cannot be read"), std::string::npos) << out;
  EXPECT_NE(out.find("no such table"), std::string::npos) << out;
  std::tie(code, out) = refused("payload_column = \"body\"\n");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("no such column: body"), std::string::npos) << out;
  std::tie(code, out) = refused("order_column = \"seq; DROP TABLE outbox\"\n");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("is not an SQL identifier"), std::string::npos) << out;
  std::tie(code, out) = refused("on_published = \"archive\"\n");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("on_published must be"), std::string::npos) << out;
  std::tie(code, out) = refused("colour = \"blue\"\n");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("colour"), std::string::npos) << out;
  // A pass sends for half the lease: one POST's timeout must fit in it.
  std::tie(code, out) = Shell(bin + " relay --listen 127.0.0.1:0 --config " +
                              WriteConfig("bad", "sqlite:" + SqliteDb(), "",
                                          "kind = \"http\"\nurl = \"http://127.0.0.1:9/e\"\n"
                                          "secret = \"" + secret_ + "\"\ntimeout_ms = 2500\n"));
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("relay.lease_ms (6000) must be at least three times target.timeout_ms "
                     "(2500)"),
            std::string::npos)
      << out;
  std::tie(code, out) = Shell(bin + " relay --db sqlite:" + SqliteDb());
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("give --db and --broker"), std::string::npos) << out;
  EXPECT_EQ(SqliteCount("SELECT count(*) FROM outbox"), 0);
}

// PostgreSQL: the application is psql.
class OutboxTablePgE2E : public OutboxTableE2E {
 protected:
  void SetUp() override {
    if (!testing::ScratchPgDatabase::Available()) {
      GTEST_SKIP() << "needs CONVERGE_TEST_PG_DSN (scripts/with-postgres.sh)";
    }
    db_ = std::make_unique<testing::ScratchPgDatabase>("converge_ot_");
    ASSERT_TRUE(db_->ok()) << db_->error();
    psql_ = db_->psql();
    uri_ = db_->uri();
    // The README's PostgreSQL table, with the optional ordering column.
    auto [code, out] = Psql(
        "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, "
        "aggregateid text NOT NULL, type text NOT NULL, payload jsonb NOT NULL, "
        "created_at timestamptz NOT NULL DEFAULT now(), published_at timestamptz, "
        "seq bigint GENERATED ALWAYS AS IDENTITY)");
    ASSERT_EQ(code, 0) << out;
    OutboxTableE2E::SetUp();
  }
  void TearDown() override {
    relays_.clear();
    db_.reset();
  }
  std::pair<int, std::string> Psql(const std::string& sql) { return db_->Psql(sql); }
  ServeProcess& AddRelay(const std::string& name, const std::string& table_lines = "") {
    relays_.push_back(
        Relay(WriteConfig(name, uri_, "order_column = \"seq\"\n" + table_lines), name));
    return *relays_.back();
  }
  int64_t PartitionsOwned(ServeProcess& relay) {
    auto r = client_.Send({.url = relay.Url("/metrics")});
    if (!r) return -1;
    std::istringstream in(r->body);
    for (std::string line; std::getline(in, line);) {
      if (line.rfind("relay_partitions_owned{", 0) == 0) {
        return std::atoll(line.substr(line.rfind(' ') + 1).c_str());
      }
    }
    return -1;
  }

  std::unique_ptr<testing::ScratchPgDatabase> db_;
  std::string psql_, uri_;
  std::vector<std::unique_ptr<ServeProcess>> relays_;
};

// Two relays share the partitions while psql writes; one is SIGKILLed between publish and
// mark and the other takes its partitions over when their leases lapse. Every event
// arrives, in order per aggregate.
TEST_F(OutboxTablePgE2E, TwoRelaysSharePartitionsKeepOrderAndTakeOverFromAKilledOne) {
  ServeProcess& r1 = AddRelay("r1");
  ServeProcess& r2 = AddRelay("r2");
  ASSERT_TRUE(r1.Start("relay.after_publish_before_mark=crash@2").ok()) << r1.log_path();
  ASSERT_TRUE(r2.Start().ok()) << r2.log_path();
  auto [code, out] = Shell("python3 " + std::string(kApp) + " pg-sql 20 25 agg- | " + psql_ +
                         "'" + uri_ + "'");
  ASSERT_EQ(code, 0) << out;
  EXPECT_TRUE(r1.KilledWithin(std::chrono::seconds(30)));
  ExpectDelivered(500);
  ASSERT_TRUE(r1.Start().ok()) << r1.log_path();
  EXPECT_TRUE(testing::WaitUntil([&] {
    return PartitionsOwned(r1) > 0 && PartitionsOwned(r2) > 0;
  })) << PartitionsOwned(r1)
      << " " << PartitionsOwned(r2);
  EXPECT_EQ(PartitionsOwned(r1) + PartitionsOwned(r2), 64);
  // More rows, now with both relays alive: each publishes its share.
  std::tie(code, out) = Shell("python3 " + std::string(kApp) + " pg-sql 20 5 more- | " + psql_ +
                            "'" + uri_ + "'");
  ASSERT_EQ(code, 0) << out;
  ExpectDelivered(600);
  EXPECT_TRUE(
      testing::WaitUntil([&] { return Psql("SELECT count(*) FROM outbox").second == "0\n"; }));
}

// The late commit, forced: psql session A inserts a row and holds its transaction open (the
// row has the smaller seq); session B inserts a row of the same aggregate and commits. The
// relay publishes B's row without waiting for A, and when A commits, publishes A's row too:
// a relay that kept a high-water mark of seq would skip it for ever. Per aggregate the
// events are published in commit order.
TEST_F(OutboxTablePgE2E, ARowThatCommitsLateIsPublishedAfterTheRowsCommittedBeforeIt) {
  ServeProcess& r1 = AddRelay("r1", "on_published = \"mark\"\n");
  ASSERT_TRUE(r1.Start().ok()) << r1.log_path();
  const std::string a = "00000000-0000-4000-8000-00000000000a";
  const std::string b = "00000000-0000-4000-8000-00000000000b";
  const std::string insert =
      "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES ('";
  FILE* session_a = popen((psql_ + "'" + uri_ + "'").c_str(), "w");
  ASSERT_NE(session_a, nullptr);
  std::fprintf(session_a,
               "SET application_name = 'late_a';\nBEGIN;\n"
               "%s%s', 'order', 'late', 'order.updated', '{}');\n",
               insert.c_str(), a.c_str());
  std::fflush(session_a);
  // A holds its transaction open once it has written (a transaction id is assigned). The
  // session is found by its name: the relay's own connection is idle in a transaction with
  // an id too, for a moment, between the statements of a claim.
  ASSERT_TRUE(testing::WaitUntil([&] {
    return Psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'late_a' "
                "AND state = 'idle in transaction' AND backend_xid IS NOT NULL "
                "AND datname = current_database()")
               .second == "1\n";
  }));
  auto [code, out] = Psql(insert + b + "', 'order', 'late', 'order.updated', '{}')");
  ASSERT_EQ(code, 0) << out;
  ASSERT_TRUE(testing::WaitUntil([&] { return Stats()["distinct"] == 1; }));
  EXPECT_EQ(Stats()["order"]["late"], json::array({b}));
  std::fprintf(session_a, "COMMIT;\n");
  EXPECT_EQ(pclose(session_a), 0);
  ASSERT_TRUE(testing::WaitUntil([&] { return Stats()["distinct"] == 2; }))
      << "the late row was skipped: " << Stats().dump();
  EXPECT_EQ(Stats()["order"]["late"], json::array({b, a}));
  EXPECT_EQ(Stats()["posts"], 2);
  // A's row has the smaller seq, and both are marked published.
  EXPECT_EQ(Psql("SELECT string_agg(id::text, ',' ORDER BY seq) FROM outbox").second,
            a + "," + b + "\n");
  EXPECT_TRUE(testing::WaitUntil([&] {
    return Psql("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL").second == "2\n";
  }));
}

}  // namespace
}  // namespace converge
