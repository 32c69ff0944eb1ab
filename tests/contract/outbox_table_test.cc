// OutboxTable's ingest on every store: an ingest pages on past the rows its bad rows hold
// back, leaving the stopped aggregates out of the next page's query (PostgreSQL runs that
// query with a fresh snapshot: docs/design/outbox-table-relay.md).
#include "converge/outbox_table.h"

#include <memory>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "converge/failpoint.h"
#include "converge/outbox.h"
#include "tests/contract/store_fixture.h"

namespace converge {
namespace {

template <class Store>
class OutboxTableContract : public StoreContract<Store> {
 protected:
  void TearDown() override { ASSERT_TRUE(failpoint::Configure("").ok()); }
  void SetUp() override {
    StoreContract<Store>::SetUp();
    if (this->IsSkipped()) return;
    ASSERT_TRUE(this->db_->Transact([](Tx& tx) {
                     return StatusOf(tx.Exec(
                         "CREATE TABLE app_outbox (id TEXT PRIMARY KEY, aggregatetype TEXT, "
                         "aggregateid TEXT, type TEXT, payload TEXT, created_at BIGINT)"));
                   }).ok());
  }

  // A row whose order (created_at) is the next, or `created` when given.
  void Insert(const std::string& id, const std::string& aggregate, const std::string& type,
              int64_t created = -1) {
    if (created < 0) created = ++created_;
    ASSERT_TRUE(this->db_->Transact([&](Tx& tx) {
                     return StatusOf(tx.Exec(
                         "INSERT INTO app_outbox VALUES ($1, 'order', $2, $3, '{}', $4)", id,
                         aggregate, type, created));
                   }).ok());
  }
  std::unique_ptr<OutboxTable> Open(size_t batch) {
    OutboxTableOptions o;
    o.table = "app_outbox";
    o.batch = batch;
    auto table = OutboxTable::Open(*this->db_, outbox_, o);
    EXPECT_TRUE(table) << table.error().ToString();
    return table ? std::move(*table) : nullptr;
  }

  int64_t Copies(const std::string& aggregate) {
    return this->Count("SELECT count(*) FROM outbox_events WHERE aggregate_id = '" + aggregate +
                       "'");
  }
  // Whether `first` was copied before `second` (its seq is smaller).
  bool CopiedBefore(const std::string& first, const std::string& second) {
    return this->Count("SELECT count(*) FROM outbox_events a, outbox_events b WHERE "
                       "a.event_id = '" + first + "' AND b.event_id = '" + second +
                       "' AND a.seq < b.seq") == 1;
  }

  Outbox outbox_;
  int64_t created_ = 0;
};

TYPED_TEST_SUITE(OutboxTableContract, Stores, StoreNames);

// Found by review: an ingest read one page of `batch` rows, so a bad row with a batch of
// its aggregate behind it filled the page and stopped every aggregate.
TYPED_TEST(OutboxTableContract, ABadRowWithAFullBatchBehindItDoesNotStopTheOthers) {
  this->Insert("a0", "A", "");  // no type: cannot be an event
  for (int i = 1; i <= 4; ++i) this->Insert("a" + std::to_string(i), "A", "order.placed");
  this->Insert("c0", "C", "");
  for (int i = 1; i <= 3; ++i) this->Insert("c" + std::to_string(i), "C", "order.placed");
  this->Insert("b0", "B", "order.placed");
  this->Insert("b1", "B", "order.paid");
  OutboxTableOptions o;
  o.table = "app_outbox";
  o.batch = 4;  // page 1: a0..a3; page 2, A left out: c0..c3; page 3, C too: b0, b1
  auto table = OutboxTable::Open(*this->db_, this->outbox_, o);
  ASSERT_TRUE(table) << table.error().ToString();
  auto read = (*table)->Ingest();
  ASSERT_TRUE(read) << read.error().ToString();
  EXPECT_EQ(this->Copies("B"), 2);
  EXPECT_EQ(this->Copies("A"), 0);  // order: nothing of A passes its bad row
  EXPECT_EQ(this->Copies("C"), 0);
  EXPECT_EQ((*table)->stats().held_back, 8);
  EXPECT_TRUE(this->CopiedBefore("b0", "b1"));
  EXPECT_NE((*table)->stats().last_error.find("row a0"), std::string::npos)
      << (*table)->stats().last_error;

  // Fixed, each goes out in its order, and nothing is copied twice.
  ASSERT_TRUE(this->db_->Transact([](Tx& tx) {
                     return StatusOf(tx.Exec(
                         "UPDATE app_outbox SET type = 'order.placed' WHERE id IN ('a0', 'c0')"));
                   }).ok());
  for (int pass = 0; pass < 3; ++pass) ASSERT_TRUE((*table)->Ingest());
  EXPECT_EQ(this->Copies("A"), 5);
  EXPECT_EQ(this->Copies("C"), 4);
  EXPECT_EQ(this->Copies("B"), 2);
  EXPECT_TRUE(this->CopiedBefore("a0", "a1"));
  EXPECT_TRUE(this->CopiedBefore("a3", "a4"));
  EXPECT_TRUE(this->CopiedBefore("c0", "c1"));
  EXPECT_EQ((*table)->stats().held_back, 0);
  EXPECT_EQ((*table)->stats().last_error, "");
}

// An ingest's pages are bounded (OutboxTable::kMaxIngestPages): past them, what is left
// waits until the rows that hold it are fixed or removed, and nothing is lost.
TYPED_TEST(OutboxTableContract, AnIngestReadsBoundedPagesAndLosesNothing) {
  for (int i = 0; i < 12; ++i) this->Insert("x" + std::to_string(i), "X" + std::to_string(i), "");
  this->Insert("b0", "B", "order.placed");
  OutboxTableOptions o;
  o.table = "app_outbox";
  o.batch = 1;  // one row a page: 8 pages hold back 8 aggregates, and B waits
  auto table = OutboxTable::Open(*this->db_, this->outbox_, o);
  ASSERT_TRUE(table) << table.error().ToString();
  ASSERT_TRUE((*table)->Ingest());
  EXPECT_EQ(this->Copies("B"), 0);
  EXPECT_EQ((*table)->stats().held_back, 8);
  ASSERT_TRUE(this->db_->Transact([](Tx& tx) {
                     return StatusOf(tx.Exec("DELETE FROM app_outbox WHERE id LIKE 'x%'"));
                   }).ok());
  ASSERT_TRUE((*table)->Ingest());
  EXPECT_EQ(this->Copies("B"), 1);
}

// Found by review: the later pages read a whole batch each, so one ingest could copy up to
// 8 batches (and take as many advisory locks on PostgreSQL). A page reads what is left.
TYPED_TEST(OutboxTableContract, AnIngestCopiesAtMostABatch) {
  this->Insert("a0", "A", "");
  for (int i = 0; i < 6; ++i) this->Insert("b" + std::to_string(i), "B", "order.placed");
  auto table = this->Open(/*batch=*/4);  // page 1: a0 b0 b1 b2; page 2: b3 alone
  ASSERT_NE(table, nullptr);
  auto read = table->Ingest();
  ASSERT_TRUE(read) << read.error().ToString();
  EXPECT_EQ(this->Copies("B"), 4);
  auto more = table->RunOnce();  // a full batch copied: more is waiting
  ASSERT_TRUE(more) << more.error().ToString();
  EXPECT_EQ(this->Copies("B"), 6);
  EXPECT_TRUE(this->CopiedBefore("b3", "b4"));
}

// Found by review: a row with an empty id had its copy drawn a fresh id by Prepare, so the
// anti-join never found it and every pass copied it again. It is a bad row now.
TYPED_TEST(OutboxTableContract, ARowWithoutAnIdHoldsBackItsAggregateAndIsNeverCopied) {
  this->Insert("", "Z", "order.placed");
  this->Insert("z1", "Z", "order.placed");
  this->Insert("b0", "B", "order.placed");
  auto table = this->Open(/*batch=*/1);
  ASSERT_NE(table, nullptr);
  for (int pass = 0; pass < 3; ++pass) {
    auto more = table->RunOnce();
    ASSERT_TRUE(more) << more.error().ToString();
  }
  EXPECT_EQ(this->Copies("Z"), 0);
  EXPECT_EQ(this->Copies("B"), 1);
  EXPECT_EQ(this->Count("SELECT count(*) FROM outbox_events"), 1);
  EXPECT_NE(table->stats().last_error.find("has no id"), std::string::npos)
      << table->stats().last_error;
  auto more = table->RunOnce();
  ASSERT_TRUE(more);
  EXPECT_FALSE(*more);  // nothing waits that a pass could copy: no spin
}

// PostgreSQL runs each page's query on a fresh snapshot (READ COMMITTED). A row that
// commits between two pages with an earlier order than rows of its aggregate the next page
// reads comes first on that page: nothing is skipped, and the aggregate keeps its order.
TYPED_TEST(OutboxTableContract, ARowCommittedBetweenPagesKeepsItsAggregatesOrder) {
  if (!this->IsPostgres()) GTEST_SKIP() << "SQLite's writer holds every other write out";
  this->Insert("a0", "A", "");
  for (int i = 1; i <= 3; ++i) this->Insert("a" + std::to_string(i), "A", "order.placed");
  this->Insert("b0", "B", "order.placed");
  this->Insert("b1", "B", "order.placed");
  auto table = this->Open(/*batch=*/4);
  ASSERT_NE(table, nullptr);
  ASSERT_TRUE(failpoint::Configure("outbox_table.between_pages=pause").ok());
  Status ingested;
  std::thread t([&] { ingested = StatusOf(table->Ingest()); });
  ASSERT_TRUE(failpoint::WaitPaused("outbox_table.between_pages", std::chrono::seconds(30)));
  this->Insert("b_early", "B", "order.placed", /*created=*/0);  // commits now
  this->Insert("c0", "C", "order.placed");
  failpoint::Release("outbox_table.between_pages");
  t.join();
  ASSERT_TRUE(ingested.ok()) << ingested.ToString();
  EXPECT_EQ(this->Copies("B"), 3);
  EXPECT_EQ(this->Copies("C"), 1);
  EXPECT_TRUE(this->CopiedBefore("b_early", "b0"));
  EXPECT_TRUE(this->CopiedBefore("b0", "b1"));
}

}  // namespace
}  // namespace converge
