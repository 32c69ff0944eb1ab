// converge's schema in template form, the one source for every backend (schema.h says
// what each {{token}} becomes). Append-only: never edit a migration that has shipped, add
// one. SchemaContract/*.SameTablesColumnsKeysAndIndexesAsTheEmbeddedStore
// (tests/contract/schema_test.cc) checks that every backend ends at the same schema.
#include "src/core/schema/schema.h"

namespace converge::schema {

const std::vector<std::string_view>& MigrationTemplates() {
  static const std::vector<std::string_view> kMigrations = {
      // 1: the whole effective-once path.
      R"sql(
CREATE TABLE idempotency_keys (
  scope            TEXT    NOT NULL,
  key              TEXT    NOT NULL,
  request_hash     TEXT    NOT NULL,
  status           TEXT    NOT NULL CHECK (status IN ('in_progress', 'completed')),
  recovery_point   TEXT    NOT NULL,
  recovery_data    TEXT    NOT NULL DEFAULT '',
  lease_until       {{bigint}} NOT NULL,
  fence             {{bigint}} NOT NULL,
  response_status  INTEGER,
  response_headers TEXT,
  response_body    {{blob}},
  created_at       {{bigint}} NOT NULL,
  updated_at       {{bigint}} NOT NULL,
  expires_at       {{bigint}} NOT NULL,
  PRIMARY KEY (scope, key)
){{without_rowid}};
CREATE INDEX idempotency_keys_expires ON idempotency_keys (expires_at);

CREATE TABLE outbox_events (
  seq              {{autoincrement_pk}},
  event_id         TEXT    NOT NULL,
  source           TEXT    NOT NULL,
  aggregate_type   TEXT    NOT NULL,
  aggregate_id     TEXT    NOT NULL,
  type             TEXT    NOT NULL,
  payload          TEXT    NOT NULL,
  headers          TEXT    NOT NULL DEFAULT '{}',
  created_at       {{bigint}} NOT NULL,
  published_at     {{bigint}},
  publish_attempts INTEGER NOT NULL DEFAULT 0,
  last_error       TEXT,
  UNIQUE (source, event_id)
);
CREATE INDEX outbox_unpublished ON outbox_events (seq) WHERE published_at IS NULL;
CREATE INDEX outbox_published ON outbox_events (published_at) WHERE published_at IS NOT NULL;

CREATE TABLE consumer_inbox (
  consumer     TEXT    NOT NULL,
  source       TEXT    NOT NULL,
  event_id     TEXT    NOT NULL,
  processed_at {{bigint}} NOT NULL,
  expires_at   {{bigint}} NOT NULL,
  outcome      TEXT    NOT NULL DEFAULT 'applied'
               CHECK (outcome IN ('applied', 'dead_lettered')),
  PRIMARY KEY (consumer, source, event_id)
){{without_rowid}};
CREATE INDEX consumer_inbox_expires ON consumer_inbox (expires_at);

CREATE TABLE queue_subscriptions (
  queue      TEXT    NOT NULL,
  pattern    TEXT    NOT NULL,
  created_at {{bigint}} NOT NULL,
  PRIMARY KEY (queue, pattern)
){{without_rowid}};

CREATE TABLE queue_messages (
  id               {{autoincrement_pk}},
  queue            TEXT    NOT NULL,
  event_id         TEXT    NOT NULL,
  source           TEXT    NOT NULL,
  type             TEXT    NOT NULL,
  subject          TEXT    NOT NULL,
  envelope         TEXT    NOT NULL,
  enqueued_at      {{bigint}} NOT NULL,
  visible_at       {{bigint}} NOT NULL,
  attempts         INTEGER NOT NULL DEFAULT 0,
  claim_token      TEXT,
  first_failure_at {{bigint}},
  last_error       TEXT
);
CREATE INDEX queue_messages_ready ON queue_messages (queue, visible_at, id);

CREATE TABLE dead_letters (
  id               {{autoincrement_pk}},
  consumer         TEXT    NOT NULL,
  queue            TEXT    NOT NULL,
  event_id         TEXT    NOT NULL,
  source           TEXT    NOT NULL,
  type             TEXT    NOT NULL,
  envelope         TEXT    NOT NULL,
  error_class      TEXT    NOT NULL,
  error_code       TEXT    NOT NULL,
  error            TEXT    NOT NULL,
  attempts         INTEGER NOT NULL,
  first_failure_at {{bigint}} NOT NULL,
  last_failure_at  {{bigint}} NOT NULL,
  state            TEXT    NOT NULL DEFAULT 'parked'
                   CHECK (state IN ('parked', 'replayed', 'discarded')),
  replay_count     INTEGER NOT NULL DEFAULT 0,
  updated_at       {{bigint}} NOT NULL
);
CREATE INDEX dead_letters_state ON dead_letters (state, id);
)sql",
      // 2: journalled external effects (effects.h).
      R"sql(
CREATE TABLE effects (
  effect_key      TEXT    NOT NULL PRIMARY KEY,
  kind            TEXT    NOT NULL,
  payload         TEXT    NOT NULL,
  state           TEXT    NOT NULL CHECK (state IN ('pending', 'done', 'failed')),
  attempts        INTEGER NOT NULL DEFAULT 0,
  next_attempt_at {{bigint}} NOT NULL,
  result          TEXT,
  last_error      TEXT,
  created_at      {{bigint}} NOT NULL,
  updated_at      {{bigint}} NOT NULL
){{without_rowid}};
CREATE INDEX effects_due ON effects (kind, state, next_attempt_at);
)sql",
      // 3: relay partitions: ownership by lease and fencing token (relay.h).
      R"sql(
ALTER TABLE outbox_events ADD COLUMN partition_no INTEGER NOT NULL DEFAULT 0;
CREATE INDEX outbox_unpublished_partition ON outbox_events (partition_no, seq)
  WHERE published_at IS NULL;
CREATE TABLE relay_partitions (
  partition_no INTEGER NOT NULL PRIMARY KEY,
  owner        TEXT    NOT NULL,
  fence        {{bigint}}  NOT NULL,
  lease_until  {{bigint}}  NOT NULL
);
CREATE TABLE relay_members (
  owner        TEXT    NOT NULL PRIMARY KEY,
  lease_until  {{bigint}}  NOT NULL
);
)sql",
      // 4: fencing tokens from one store-wide sequence (never reused for a key, even
      // after it expired and was swept); per-call claims of journalled effects; finding
      // abandoned multi-phase requests (the completer); handler starts of redelivered
      // messages, so one that kills its process is parked (consumer.h).
      R"sql(
{{fence_sequence}}
ALTER TABLE effects ADD COLUMN claim_token TEXT;
ALTER TABLE relay_members ADD COLUMN incarnation {{bigint}} NOT NULL DEFAULT 0;
CREATE INDEX idempotency_keys_in_progress ON idempotency_keys (lease_until)
  WHERE status = 'in_progress';
CREATE TABLE consumer_starts (
  consumer   TEXT    NOT NULL,
  source     TEXT    NOT NULL,
  event_id   TEXT    NOT NULL,
  starts     {{bigint}} NOT NULL,
  PRIMARY KEY (consumer, source, event_id)
){{without_rowid}};
)sql",
      // 5: the SQL queue claims only the oldest message of a subject (order per
      // aggregate at the consumer): finding an earlier one is an index probe.
      R"sql(
CREATE INDEX queue_messages_subject ON queue_messages (queue, subject, id);
)sql",
      // 6: sagas: instances owned by lease and fence, and their step log (saga.h).
      R"sql(
CREATE TABLE saga_instances (
  saga_id         TEXT    NOT NULL PRIMARY KEY,
  type            TEXT    NOT NULL,
  state           TEXT    NOT NULL CHECK (state IN ('running', 'compensating', 'completed',
                                                    'compensated', 'failed_to_compensate')),
  step            INTEGER NOT NULL,
  data            TEXT    NOT NULL,
  version         {{bigint}} NOT NULL,
  attempts        INTEGER NOT NULL,
  step_started_at {{bigint}} NOT NULL,
  deadline        {{bigint}},
  next_attempt_at {{bigint}} NOT NULL,
  lease_until     {{bigint}} NOT NULL,
  fence           {{bigint}} NOT NULL,
  error           TEXT,
  created_at      {{bigint}} NOT NULL,
  updated_at      {{bigint}} NOT NULL
){{without_rowid}};
CREATE INDEX saga_instances_due ON saga_instances (type, next_attempt_at)
  WHERE state IN ('running', 'compensating');
CREATE INDEX saga_instances_state ON saga_instances (state, created_at);
CREATE TABLE saga_steps (
  saga_id  TEXT    NOT NULL,
  seq      {{bigint}} NOT NULL,
  step     TEXT    NOT NULL,
  phase    TEXT    NOT NULL CHECK (phase IN ('action', 'compensation')),
  outcome  TEXT    NOT NULL CHECK (outcome IN ('done', 'retry', 'failed')),
  attempt  INTEGER NOT NULL,
  result   TEXT,
  error    TEXT,
  fence    {{bigint}} NOT NULL,
  at       {{bigint}} NOT NULL,
  PRIMARY KEY (saga_id, seq)
){{without_rowid}};
)sql",
      // 7: effects in order per subject (effects.h, Record with a subject): an intent
      // waits while an earlier one of its kind and subject is pending.
      R"sql(
ALTER TABLE effects ADD COLUMN subject TEXT;
ALTER TABLE effects ADD COLUMN seq {{bigint}};
CREATE INDEX effects_subject ON effects (kind, subject, seq) WHERE subject IS NOT NULL;
)sql",
      // 8: the journalled calls of a saga name their saga, so they live as long as it
      // does (the sweeper deletes them with the settled saga, never before). Rows written
      // before this migration are matched to their saga through its step log.
      R"sql(
ALTER TABLE effects ADD COLUMN saga_id TEXT;
UPDATE effects SET saga_id = (
  SELECT st.saga_id FROM saga_instances s JOIN saga_steps st ON st.saga_id = s.saga_id
  WHERE effects.effect_key = s.type || ':' || s.saga_id || ':' || st.step || ':' || st.phase
  LIMIT 1)
WHERE kind LIKE 'saga:%';
CREATE INDEX effects_saga ON effects (saga_id) WHERE saga_id IS NOT NULL;
)sql",
      // 9: time-partitioned idempotency_keys and consumer_inbox, on a PostgreSQL store
      // created with retention=partitioned (docs/design/retention.md); nothing elsewhere.
      R"sql(
{{partitioned_retention}}
)sql",
      // 10: the SQL queue claims in id order and stops after its batch: walking this
      // index costs the batch (plus what is in flight ahead of it), not the whole backlog
      // (queue_messages_ready took every visible row, then sorted them). IF NOT EXISTS: a
      // store rewound to an earlier version applies it again.
      R"sql(
CREATE INDEX IF NOT EXISTS queue_messages_order ON queue_messages (queue, id);
)sql",
      // 11: PostgreSQL checks the row count of a deferred statement (Tx::ExecDeferred)
      // in the statement itself, raising SQLSTATE CV001 when it differs, so that the
      // transaction aborts before its pipelined COMMIT; nothing elsewhere.
      R"sql(
{{deferred_checks}}
)sql",
      // 12: on a time-partitioned PostgreSQL store, outbox_events too (published events
      // past their retention go with their partition); nothing elsewhere.
      R"sql(
{{partitioned_outbox}}
)sql",
      // 13: where the sweeper walks idempotency_keys and consumer_inbox in key order
      // (SQLite), their expiry indexes go: nothing reads them there, and every row
      // written or deleted would cost a page of them. Nothing elsewhere.
      R"sql(
{{drop_expiry_indexes}}
)sql",
      // 14: where each walk in key order stands (sweeper.h), so that a sweeper that starts
      // again resumes its walk and its pace instead of walking flat out from the start.
      // `after_key`: the last key of the last window walked, each column as its length,
      // ':' and its bytes (NULL: the table's start).
      R"sql(
CREATE TABLE IF NOT EXISTS sweep_walks (
  walk           TEXT     NOT NULL PRIMARY KEY,
  after_key      {{blob}},
  pass_start     {{bigint}} NOT NULL,
  pass_rows      {{bigint}} NOT NULL,
  last_pass_rows {{bigint}} NOT NULL
);
)sql",
      // 15: a saga step's starts since the saga last recorded an outcome (saga.h): a step
      // that ends its runner every time (a crash in its call or local part) is stopped
      // after its attempts, where `attempts`, which counts recorded failures, never grew.
      R"sql(
ALTER TABLE saga_instances ADD COLUMN unsettled_starts INTEGER NOT NULL DEFAULT 0;
)sql",
      // 16: where outbox_unpublished_partition does not bound a relay's claim of several
      // partitions (SQLite: SqliteDialect::DropOutboxPartitionIndex), it goes; every
      // create paid for it in page writes. Nothing elsewhere.
      R"sql(
{{drop_outbox_partition_index}}
)sql",
  };
  return kMigrations;
}

int SchemaVersion() { return static_cast<int>(MigrationTemplates().size()); }

}  // namespace converge::schema
