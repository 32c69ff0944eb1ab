// converge dlq list|show|replay|discard --db URI
#include <cstdio>
#include <memory>
#include <string>
#include <utility>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "apps/converge/commands.h"
#include "converge/database.h"
#include "converge/dead_letters.h"
#include "converge/effects.h"
#include "converge/http_service.h"
#include "converge/nats.h"
#include "converge/relay.h"
#include "converge/saga.h"
#include "converge/sql_queue.h"

namespace converge::cli {
namespace {

struct DlqFlags {
  std::string db;
  std::string state = "parked";
  std::string consumer;
  bool all = false;
  bool json = false;
  int64_t limit = 100;
  int64_t after = 0;
  int64_t id = 0;
};

// Refuses every replay with `why` (kFailedPrecondition): the letter stays parked.
class NotFromHere : public Requeuer {
 public:
  explicit NotFromHere(std::string why) : why_(std::move(why)) {}
  Status Requeue(Tx&, const DeadLetter& letter) override {
    return FailedPreconditionError("dead letter " + std::to_string(letter.id) + " of queue '" +
                                   letter.queue + "': " + why_);
  }

 private:
  std::string why_;
};

// The same JSON as the admin API's (http_service.h), pretty-printed.
nlohmann::json ToJson(const DeadLetter& d, bool with_envelope) {
  return nlohmann::json::parse(http::DeadLetterJson(d, with_envelope));
}

// Exit codes, for scripts: also in `converge dlq --help` (kExitCodes) and the README.
constexpr int kExitError = 1;      // anything else: bad URI, unreachable store, ...
constexpr int kExitNotFound = 3;   // no dead letter with that id
constexpr int kExitNotParked = 4;  // replay/discard of a letter that is no longer parked
constexpr const char* kExitCodes =
    "Exit codes: 0 done; 1 error (bad URI, store unreachable, ...); 2 bad "
    "CONVERGE_FAILPOINTS; 3 no dead letter with that id; 4 replay or discard refused: the "
    "letter is no longer parked (already replayed or discarded, perhaps by a concurrent "
    "call); usage errors: CLI11's codes (>= 100).";

int Fail(const std::string& what, const Status& st) {
  std::fprintf(stderr, "converge dlq %s: %s\n", what.c_str(), st.ToString().c_str());
  if (st.code() == StatusCode::kNotFound) return kExitNotFound;
  // Not an error to retry: someone else (maybe a concurrent replay) already moved it on.
  if (st.code() == StatusCode::kFailedPrecondition && st.reason() == reason::kNotParked) {
    return kExitNotParked;
  }
  return kExitError;
}

std::unique_ptr<Database> OpenOrReport(const std::string& uri, int* exit_code) {
  auto db = Database::Open(uri);
  if (!db) {
    *exit_code = Fail("open", db.error());
    return nullptr;
  }
  return std::move(*db);
}

int List(const DlqFlags& f) {
  int code = 0;
  auto db = OpenOrReport(f.db, &code);
  if (!db) return code;
  DeadLetters dlq(*db);
  DeadLetterFilter filter;
  filter.state = f.all ? "" : f.state;
  filter.consumer = f.consumer;
  filter.limit = f.limit;
  filter.after_id = f.after;
  auto list = dlq.List(filter);
  if (!list) return Fail("list", list.error());
  if (f.json) {
    nlohmann::json a = nlohmann::json::array();
    for (const auto& d : *list) a.push_back(ToJson(d, false));
    std::printf("%s\n", a.dump(2).c_str());
    return 0;
  }
  std::printf("%-6s %-10s %-14s %-22s %-38s %-11s %-19s %4s  %s\n", "ID", "STATE", "CONSUMER",
              "TYPE", "EVENT", "CLASS", "CODE", "TRY", "ERROR");
  for (const auto& d : *list) {
    std::printf("%-6lld %-10s %-14s %-22s %-38s %-11s %-19s %4lld  %s\n",
                static_cast<long long>(d.id), d.state.c_str(), d.consumer.c_str(),
                d.type.c_str(), d.event_id.c_str(), d.error_class.c_str(),
                d.error_code.c_str(), static_cast<long long>(d.attempts), d.error.c_str());
  }
  std::printf("%zu dead letter(s)%s\n", list->size(),
              static_cast<int64_t>(list->size()) == f.limit ? " (more may follow: --after)" : "");
  return 0;
}

int Show(const DlqFlags& f) {
  int code = 0;
  auto db = OpenOrReport(f.db, &code);
  if (!db) return code;
  DeadLetters dlq(*db);
  auto d = dlq.Get(f.id);
  if (!d) return Fail("show", d.error());
  std::printf("%s\n", ToJson(*d, true).dump(2).c_str());
  return 0;
}

int Act(const DlqFlags& f, bool replay) {
  int code = 0;
  auto db = OpenOrReport(f.db, &code);
  if (!db) return code;
  // This store's replay targets, as the payments service routes them: effects' letters
  // re-open their intent, sagas' go back to compensating, a relay's refused events become
  // unpublished again, NATS consumers' letters are refused (below), and every other letter
  // goes back on its SQL queue. A letter must never fall through to the SQL queue when it
  // belongs elsewhere: it would be marked replayed and put where no one reads it.
  SqlQueue queue(*db);
  EffectRequeuer effects;
  SagaRequeuer sagas;  // the service's runners find the saga at their next poll
  OutboxRequeuer outbox;  // events a relay parked because the broker refused them
  NotFromHere nats(
      "a NATS consumer's letter goes back onto its stream through a broker connection, "
      "which this command does not open: replay it with the service's admin API "
      "(POST /admin/dead-letters/{id}/replay)");
  DeadLetters dlq(*db, {{"", &queue},
                        {std::string(kEffectQueuePrefix), &effects},
                        {std::string(kSagaQueuePrefix), &sagas},
                        {std::string(kRelayDeadLetterQueue), &outbox},
                        {std::string(kNatsQueuePrefix), &nats}});
  Status st = replay ? dlq.Replay(f.id) : dlq.Discard(f.id);
  if (!st.ok()) return Fail(replay ? "replay" : "discard", st);
  std::printf("dead letter %lld %s\n", static_cast<long long>(f.id),
              replay ? "replayed: back on its queue, through the inbox again" : "discarded");
  return 0;
}

}  // namespace

void AddDlqCommands(CLI::App& app, int* exit_code) {
  auto flags = std::make_shared<DlqFlags>();
  CLI::App* dlq = app.add_subcommand("dlq", "Inspect, replay and discard dead letters");
  dlq->require_subcommand(1);
  dlq->footer(kExitCodes);  // subcommands added below inherit it
  auto add_db = [&](CLI::App* c) {
    c->add_option("--db", flags->db, "Store URI, e.g. sqlite:app.db")->required();
  };

  CLI::App* list = dlq->add_subcommand("list", "List dead letters (parked ones by default)");
  add_db(list);
  list->add_option("--state", flags->state, "parked, replayed or discarded")
      ->check(CLI::IsMember({"parked", "replayed", "discarded"}));
  list->add_flag("--all", flags->all, "Every state");
  list->add_option("--consumer", flags->consumer, "Only this consumer's");
  list->add_option("--limit", flags->limit, "At most this many")->check(CLI::Range(1, 100000));
  list->add_option("--after", flags->after, "Only ids greater than this (paging)");
  list->add_flag("--json", flags->json, "JSON output");
  list->callback([flags, exit_code] { *exit_code = List(*flags); });

  CLI::App* show = dlq->add_subcommand("show", "Show one dead letter with its envelope");
  add_db(show);
  show->add_option("id", flags->id, "Dead letter id")->required()->check(CLI::PositiveNumber);
  show->callback([flags, exit_code] { *exit_code = Show(*flags); });

  CLI::App* replay = dlq->add_subcommand("replay", "Put a parked dead letter back on its queue");
  add_db(replay);
  replay->add_option("id", flags->id, "Dead letter id")->required()->check(CLI::PositiveNumber);
  replay->callback([flags, exit_code] { *exit_code = Act(*flags, true); });

  CLI::App* discard = dlq->add_subcommand("discard", "Mark a parked dead letter discarded");
  add_db(discard);
  discard->add_option("id", flags->id, "Dead letter id")->required()->check(CLI::PositiveNumber);
  discard->callback([flags, exit_code] { *exit_code = Act(*flags, false); });
}

}  // namespace converge::cli
