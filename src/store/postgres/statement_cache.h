// The server-side prepared statements of one PostgreSQL connection, keyed by SQL text and
// parameter types: a statement is parsed and planned once per connection instead of once
// per call. Internal to the PostgreSQL backend (postgres_database.cc, which sends the
// Parse, Bind and Execute messages and reports back what the server answered).
//
// An entry is created when a statement is first used on the connection, and is pending
// until the server has answered its prepare: the prepare travels in the same pipeline as
// the statement's first execution (no extra round trip), so a later use in the same
// pipeline may already name it, but an entry whose prepare failed or was skipped (an
// earlier statement of the pipeline failed) is forgotten. Names are never reused on a
// connection, so an answer about a forgotten entry cannot be taken for a newer one.
//
// At most `capacity` entries: using one more evicts the least recently used, whose name
// the caller deallocates on the server. Capacity 0 prepares nothing.
//
// Thread-safety: none; a connection is used by one thread at a time, and so is its cache.
#ifndef CONVERGE_STORE_POSTGRES_STATEMENT_CACHE_H_
#define CONVERGE_STORE_POSTGRES_STATEMENT_CACHE_H_

#include <cstddef>
#include <cstdint>
#include <list>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>

namespace converge::postgres {

class StatementCache {
 public:
  explicit StatementCache(size_t capacity) : capacity_(capacity) {}
  StatementCache(const StatementCache&) = delete;
  StatementCache& operator=(const StatementCache&) = delete;

  // Whether `sql` is worth preparing: a statement the server plans (SELECT, INSERT,
  // UPDATE, DELETE, WITH, VALUES, TABLE). Transaction control, DDL, SET, LOCK and the
  // like run unnamed: they have no plan to keep, and DDL may change what a plan depends on.
  static bool Preparable(std::string_view sql);
  // Whether running `sql` drops the session's prepared statements (DISCARD, DEALLOCATE).
  static bool Drops(std::string_view sql);

  struct Use {
    std::string name;       // the prepared statement to execute
    bool prepare = false;   // a new entry: send its prepare first, then report Prepared
    bool confirmed = false; // prepared in an earlier pipeline, answered OK by the server
    std::optional<std::string> evicted;  // a name to deallocate on the server
  };
  // The entry for `key` (the SQL text and its parameter types), made the most recently
  // used; a new pending one when there is none. nullopt when the capacity is 0.
  std::optional<Use> Lookup(const std::string& key);

  // The server answered the prepare of `name` for `key` with success.
  void Prepared(const std::string& key, const std::string& name);
  // The prepare of `name` failed or was skipped, or the statement went stale (a cached
  // plan whose result type changed): the next use prepares it afresh under a new name.
  void Forget(const std::string& key, const std::string& name);
  // The server no longer has any of this session's prepared statements.
  void Clear();

  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    std::string name;
    bool confirmed = false;
    std::list<std::string>::iterator lru;  // position in lru_, most recent first
  };
  const size_t capacity_;
  uint64_t next_ = 0;
  std::unordered_map<std::string, Entry> entries_;
  std::list<std::string> lru_;
};

}  // namespace converge::postgres

#endif  // CONVERGE_STORE_POSTGRES_STATEMENT_CACHE_H_
