#include "src/store/postgres/statement_cache.h"

#include <array>
#include <cctype>

namespace converge::postgres {
namespace {

// The first word of `sql`, upper-cased, past leading blanks and parentheses.
std::string FirstWord(std::string_view sql) {
  size_t i = 0;
  while (i < sql.size() &&
         (std::isspace(static_cast<unsigned char>(sql[i])) || sql[i] == '(')) {
    ++i;
  }
  std::string word;
  while (i < sql.size() && std::isalpha(static_cast<unsigned char>(sql[i]))) {
    word += static_cast<char>(std::toupper(static_cast<unsigned char>(sql[i++])));
  }
  return word;
}

}  // namespace

bool StatementCache::Preparable(std::string_view sql) {
  static constexpr std::array<std::string_view, 7> kPlanned = {
      "SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "VALUES", "TABLE"};
  const std::string word = FirstWord(sql);
  for (std::string_view w : kPlanned) {
    if (word == w) return true;
  }
  return false;
}

bool StatementCache::Drops(std::string_view sql) {
  const std::string word = FirstWord(sql);
  return word == "DISCARD" || word == "DEALLOCATE";
}

std::optional<StatementCache::Use> StatementCache::Lookup(const std::string& key) {
  if (capacity_ == 0) return std::nullopt;
  if (auto it = entries_.find(key); it != entries_.end()) {
    lru_.splice(lru_.begin(), lru_, it->second.lru);
    return Use{it->second.name, false, it->second.confirmed, std::nullopt};
  }
  Use use;
  if (entries_.size() >= capacity_) {
    auto victim = entries_.find(lru_.back());
    // A pending victim (more distinct statements in one pipeline than the capacity) may
    // still be prepared by the server: it is then left there, unnamed by any entry.
    if (victim->second.confirmed) use.evicted = victim->second.name;
    entries_.erase(victim);
    lru_.pop_back();
  }
  use.name = "converge_s" + std::to_string(++next_);
  use.prepare = true;
  lru_.push_front(key);
  entries_.emplace(key, Entry{use.name, false, lru_.begin()});
  return use;
}

void StatementCache::Prepared(const std::string& key, const std::string& name) {
  auto it = entries_.find(key);
  if (it != entries_.end() && it->second.name == name) it->second.confirmed = true;
}

void StatementCache::Forget(const std::string& key, const std::string& name) {
  auto it = entries_.find(key);
  if (it == entries_.end() || it->second.name != name) return;
  lru_.erase(it->second.lru);
  entries_.erase(it);
}

void StatementCache::Clear() {
  entries_.clear();
  lru_.clear();
}

}  // namespace converge::postgres
