// Dialect: the few SQL fragments that differ between the stores converge runs on.
//
// converge writes one SQL text for every backend ($n placeholders, ON CONFLICT,
// RETURNING, partial indexes all mean the same on SQLite and PostgreSQL). Where a backend
// needs other words, code asks the transaction's dialect (`tx.dialect()`, database.h) for
// the fragment instead of asking which backend it runs on. So a query or a table is
// written once, and a new backend supplies its fragments in one place.
//
// Thread safety: a Dialect is immutable and lives as long as the Database it came from;
// it may be used from any thread.
#ifndef CONVERGE_DIALECT_H_
#define CONVERGE_DIALECT_H_

#include <string>
#include <string_view>

namespace converge {

// Column types whose spelling differs between backends. TEXT, INTEGER (32 bits on
// PostgreSQL) and NUMERIC are spelled the same everywhere and need no entry.
enum class ColumnType {
  kBigint,  // 64-bit integer: INTEGER on SQLite (every SQLite integer has 64 bits), BIGINT
  kDouble,  // 8-byte float: REAL on SQLite, DOUBLE PRECISION on PostgreSQL
  kBlob,    // bytes (Blob in database.h): BLOB on SQLite, BYTEA on PostgreSQL
};

class Dialect {
 public:
  Dialect() = default;
  Dialect(const Dialect&) = delete;
  Dialect& operator=(const Dialect&) = delete;
  virtual ~Dialect() = default;

  // The type name to write in a column definition or a CAST for `type`.
  virtual std::string_view TypeName(ColumnType type) const = 0;

  // A whole column definition, type and constraint, for an integer primary key that the
  // store numbers itself in ascending order: "INTEGER PRIMARY KEY AUTOINCREMENT" on
  // SQLite (AUTOINCREMENT: a deleted row's number is never handed out again) and
  // "BIGSERIAL PRIMARY KEY" on PostgreSQL. Write "id " + AutoIncrementPrimaryKey().
  virtual std::string_view AutoIncrementPrimaryKey() const = 0;

  // Appended to the SELECT of a claim (`UPDATE … WHERE id IN (SELECT … LIMIT n` + this +
  // `)`) or of a sweep's pick: lock the selected rows and skip rows another transaction
  // holds instead of waiting for it. " FOR UPDATE SKIP LOCKED" on PostgreSQL; empty on
  // SQLite, where one write transaction runs at a time and no row is ever held by another.
  // Because PostgreSQL re-checks only the outer WHERE after a lock wait, a claim repeats
  // its conditions there.
  virtual std::string_view ForUpdateSkipLocked() const = 0;

  // Appended after the closing parenthesis of CREATE TABLE for a table whose primary key
  // is its only identity: " WITHOUT ROWID" on SQLite (the rows live in the primary key's
  // b-tree, saving a second one); empty on PostgreSQL.
  virtual std::string_view WithoutRowid() const = 0;

  // An SQL expression that draws the next fencing token (Tx::NextFence, same guarantees)
  // inside another statement, so that a claim inserts its row and draws its fence in one
  // round trip: "nextval('converge_fences')" on PostgreSQL. Empty where a fence can only
  // be drawn on its own (SQLite, where NextFence is an UPDATE): call Tx::NextFence first.
  virtual std::string_view NextFenceExpression() const { return ""; }
  // How the sweeper (sweeper.h) finds expired idempotency keys and inbox rows. false
  // (PostgreSQL): through their expiry indexes, a LIMITed batch at a time; its deletions
  // run beside the writes, not inside them. true (SQLite): by walking each table in
  // primary-key order, a window of rows per transaction, so that one deleted leaf page
  // takes all of its expired rows at once; the store then keeps no expiry index (a
  // deletion in key order would dirty a page of that index per row again), which the
  // schema drops where this is true. docs/design/retention.md.
  virtual bool SweepsInKeyOrder() const { return false; }

  // A statement that waits until every transaction that has read `table` has ended, and
  // keeps new readers waiting until this transaction ends: "LOCK TABLE <table> IN ACCESS
  // EXCLUSIVE MODE" on PostgreSQL (a plain SELECT holds ACCESS SHARE until its
  // transaction ends). Empty on SQLite, where write transactions never overlap. A change
  // that must be seen by every transaction committing after it (a new SQL queue
  // subscription) takes it first, before reading the table itself.
  virtual std::string LockAgainstReaders(std::string_view table) const {
    (void)table;
    return "";
  }
};

}  // namespace converge

#endif  // CONVERGE_DIALECT_H_
