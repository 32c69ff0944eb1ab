// OutboxTable's ingest in-process, on SQLite: rows that cannot be events hold back their
// own aggregate and nothing else (the relay and the other modes run in
// tests/e2e/outbox_table_test.cc).
#include "converge/outbox_table.h"

#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "converge/outbox.h"
#include "tests/unit/test_util.h"

namespace converge {
namespace {

using testing::OpenSqlite;
using testing::QueryInt;
using testing::TempDir;

class OutboxTableTest : public ::testing::Test {
 protected:
  void SetUp() override {
    db_ = OpenSqlite(dir_.File("db.sqlite"));
    ASSERT_NE(db_, nullptr);
    ASSERT_TRUE(db_->Transact([](Tx& tx) {
                     return StatusOf(tx.Exec(
                         "CREATE TABLE app_outbox (id TEXT PRIMARY KEY, aggregatetype TEXT, "
                         "aggregateid TEXT, type TEXT, payload TEXT, created_at INTEGER)"));
                   }).ok());
  }

  void Insert(const std::string& id, const std::string& aggregate, const std::string& type,
              const std::string& payload) {
    ASSERT_TRUE(db_->Transact([&](Tx& tx) {
                     return StatusOf(tx.Exec(
                         "INSERT INTO app_outbox VALUES ($1, 'order', $2, $3, $4, $5)", id,
                         aggregate, type, payload, ++created_));
                   }).ok());
  }

  std::unique_ptr<OutboxTable> Open(size_t batch) {
    OutboxTableOptions o;
    o.table = "app_outbox";
    o.batch = batch;
    auto table = OutboxTable::Open(*db_, outbox_, o);
    EXPECT_TRUE(table) << table.error().ToString();
    return table ? std::move(*table) : nullptr;
  }

  int64_t Copies(const std::string& aggregate) {
    return QueryInt(*db_, "SELECT count(*) FROM outbox_events WHERE aggregate_id = '" +
                              aggregate + "'");
  }

  TempDir dir_;
  std::unique_ptr<Database> db_;
  Outbox outbox_;
  int64_t created_ = 0;
};

// A bad row holds back the rest of its aggregate and nothing else (while the held rows
// leave room in the batch: outbox-table-relay.md).
TEST_F(OutboxTableTest, ABadRowHoldsBackItsAggregateOnly) {
  Insert("a0", "A", "", "{}");  // no type: cannot be an event
  for (int i = 1; i <= 9; ++i) Insert("a" + std::to_string(i), "A", "order.placed", "{}");
  Insert("b0", "B", "order.placed", R"({"n":0})");
  Insert("b1", "B", "order.paid", R"({"n":1})");
  auto table = Open(/*batch=*/16);
  ASSERT_NE(table, nullptr);
  auto read = table->Ingest();
  ASSERT_TRUE(read) << read.error().ToString();
  EXPECT_EQ(Copies("B"), 2);
  EXPECT_EQ(Copies("A"), 0);  // order: nothing of A passes its bad row
  EXPECT_EQ(table->stats().held_back, 10);
  EXPECT_NE(table->stats().last_error.find("row a0"), std::string::npos)
      << table->stats().last_error;
  // In B's order.
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM outbox_events a, outbox_events b "
                           "WHERE a.event_id = 'b0' AND b.event_id = 'b1' AND a.seq < b.seq"),
            1);
  // Fixed, A goes out, in its order, and nothing is copied twice.
  ASSERT_TRUE(db_->Transact([](Tx& tx) {
                   return StatusOf(
                       tx.Exec("UPDATE app_outbox SET type = 'order.placed' WHERE id = 'a0'"));
                 }).ok());
  ASSERT_TRUE(table->Ingest());
  EXPECT_EQ(Copies("A"), 10);
  EXPECT_EQ(Copies("B"), 2);
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM outbox_events a, outbox_events b "
                           "WHERE a.event_id = 'a0' AND b.event_id = 'a9' AND a.seq < b.seq"),
            1);
  EXPECT_EQ(table->stats().held_back, 0);
  EXPECT_EQ(table->stats().last_error, "");
}

// Found by review: SQLite hands text over as it was written, and a field or payload that
// was not UTF-8 made nlohmann's dump() throw inside the ingest's transaction, which failed
// on every pass and stopped every aggregate.
TEST_F(OutboxTableTest, TextThatIsNotUtf8HoldsBackItsAggregateOnly) {
  Insert("c0", "C", "order.plac\xe9", "{}");
  Insert("d0", "D", "order.placed", "caf\xe9");  // neither JSON nor UTF-8
  Insert("e0", "E", "order.placed", "plain text");  // not JSON: goes as a JSON string
  auto table = Open(/*batch=*/10);
  ASSERT_NE(table, nullptr);
  auto read = table->Ingest();
  ASSERT_TRUE(read) << read.error().ToString();
  EXPECT_EQ(Copies("C"), 0);
  EXPECT_EQ(Copies("D"), 0);
  EXPECT_EQ(Copies("E"), 1);
  EXPECT_EQ(table->stats().held_back, 2);
  EXPECT_NE(table->stats().last_error.find("not UTF-8"), std::string::npos)
      << table->stats().last_error;
  EXPECT_EQ(QueryInt(*db_, "SELECT count(*) FROM outbox_events WHERE event_id = 'e0' AND "
                           "payload LIKE '%\"data\":\"plain text\"%'"),
            1);
}

TEST(OutboxPrepare, AFieldThatIsNotUtf8IsRefusedNotThrown) {
  Outbox outbox;
  Event e;
  e.type = "order.placed";
  e.subject = "order-\xff";
  e.data = "{}";
  auto prepared = outbox.Prepare(e);
  ASSERT_FALSE(prepared);
  EXPECT_EQ(prepared.error().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(prepared.error().message().find("not UTF-8"), std::string::npos);
}

}  // namespace
}  // namespace converge
