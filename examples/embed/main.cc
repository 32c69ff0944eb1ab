// The smallest useful embedding: an idempotent create that writes a business row and an
// outbox event in one transaction, relayed to a queue and applied once by a consumer.
//
//   embed PATH.db
#include <cstdio>

#include "converge/consumer.h"
#include "converge/database.h"
#include "converge/idempotency.h"
#include "converge/outbox.h"
#include "converge/relay.h"
#include "converge/sql_queue.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: embed PATH.db\n");
    return 2;
  }
  auto db = converge::Database::Open(std::string("sqlite:") + argv[1]);
  if (!db) {
    std::fprintf(stderr, "open: %s\n", db.error().ToString().c_str());
    return 1;
  }
  converge::Database& store = **db;
  converge::Status st = store.Transact([](converge::Tx& tx) {
    return converge::StatusOf(tx.Exec(
        "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, total INTEGER NOT NULL)"));
  });
  converge::SqlQueue queue(store);
  if (st.ok()) st = queue.Subscribe("shipping", "order.*");
  if (!st.ok()) {
    std::fprintf(stderr, "setup: %s\n", st.ToString().c_str());
    return 1;
  }

  converge::Outbox outbox;
  converge::IdempotencyKeys keys(store);
  auto create = [&](const char* key) {
    return keys.Execute(
        {"tenant-1", key, converge::RequestFingerprint("POST", "/orders", R"({"total":42})")},
        [&](converge::Tx& tx) -> converge::Result<converge::StoredResponse> {
          CONVERGE_RETURN_IF_ERROR(tx.Exec("INSERT INTO orders (id, total) VALUES ($1, 42)", key));
          converge::Event e;
          e.type = "order.created";
          e.subject = key;
          e.data = R"({"total":42})";
          CONVERGE_RETURN_IF_ERROR(outbox.Enqueue(tx, e));
          return converge::StoredResponse{201, {}, R"({"id":"order-1"})"};
        });
  };
  auto first = create("order-1");
  auto again = create("order-1");  // a client retry
  if (!first || !again || first->replayed || !again->replayed) {
    std::fprintf(stderr, "idempotent create did not replay\n");
    return 1;
  }

  converge::Relay relay(store, outbox, queue);
  auto sub = queue.OpenSubscriber("shipping");
  converge::Consumer shipping(store, *sub, {.name = "shipping"});
  int shipped = 0;
  // A handler may run more than once (its transaction may run again): count at commit.
  shipping.On("order.created", [&](converge::Tx& tx, const converge::Event&) {
    tx.OnCommit([&] { ++shipped; });
    return converge::OkStatus();
  });
  if (!relay.RunOnce() || !shipping.RunOnce()) {
    std::fprintf(stderr, "relay or consumer failed\n");
    return 1;
  }
  std::printf("embed: order created once, replayed once, shipped %d time(s)\n", shipped);
  return shipped == 1 ? 0 : 1;
}
