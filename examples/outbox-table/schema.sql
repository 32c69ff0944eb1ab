-- The application's outbox table: the outbox event router convention's columns (Debezium's)
-- plus a timestamp. docs/design/outbox-table-relay.md says what each is for.

-- SQLite
CREATE TABLE outbox (
  id            TEXT PRIMARY KEY,           -- the event id (a UUID; UUIDv7 sorts by time)
  aggregatetype TEXT NOT NULL,              -- e.g. 'order'
  aggregateid   TEXT NOT NULL,              -- order is kept per aggregate id
  type          TEXT NOT NULL,              -- e.g. 'order.created'
  payload       TEXT NOT NULL,              -- JSON
  created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  published_at  TEXT                        -- optional: only for on_published = "mark"
);

-- PostgreSQL
CREATE TABLE outbox (
  id            uuid PRIMARY KEY,
  aggregatetype text NOT NULL,
  aggregateid   text NOT NULL,
  type          text NOT NULL,
  payload       jsonb NOT NULL,
  created_at    timestamptz NOT NULL DEFAULT now(),
  published_at  timestamptz,                           -- optional: on_published = "mark"
  seq           bigint GENERATED ALWAYS AS IDENTITY    -- optional: order_column = "seq"
);
-- With on_published = "mark", keep the unpublished rows cheap to find:
-- CREATE INDEX outbox_unpublished ON outbox (seq) WHERE published_at IS NULL;
