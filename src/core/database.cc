#include "converge/database.h"

#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <utility>

namespace converge {

int64_t Row::Int(size_t i) const {
  const Value& v = values_[i];
  if (auto p = std::get_if<int64_t>(&v)) return *p;
  if (auto p = std::get_if<double>(&v)) return static_cast<int64_t>(*p);
  if (auto p = std::get_if<std::string>(&v)) {
    int64_t out = 0;
    std::from_chars(p->data(), p->data() + p->size(), out);
    return out;
  }
  if (auto p = std::get_if<TextRef>(&v)) {
    int64_t out = 0;
    std::from_chars(p->text.data(), p->text.data() + p->text.size(), out);
    return out;
  }
  return 0;
}

double Row::Double(size_t i) const {
  const Value& v = values_[i];
  if (auto p = std::get_if<double>(&v)) return *p;
  if (auto p = std::get_if<int64_t>(&v)) return static_cast<double>(*p);
  if (auto p = std::get_if<std::string>(&v)) return std::strtod(p->c_str(), nullptr);
  if (auto p = std::get_if<TextRef>(&v)) return std::strtod(std::string(p->text).c_str(), nullptr);
  return 0;
}

std::string Row::Text(size_t i) const {
  const Value& v = values_[i];
  if (auto p = std::get_if<std::string>(&v)) return *p;
  if (auto p = std::get_if<Blob>(&v)) return p->bytes;
  if (auto p = std::get_if<TextRef>(&v)) return std::string(p->text);
  if (auto p = std::get_if<BlobRef>(&v)) return std::string(p->bytes);
  if (auto p = std::get_if<int64_t>(&v)) return std::to_string(*p);
  if (auto p = std::get_if<double>(&v)) return std::to_string(*p);
  return {};
}

Status Tx::Savepoint(const std::function<Status(Tx&)>& fn) {
  std::string name = "cv_sp" + std::to_string(savepoint_depth_);
  CONVERGE_RETURN_IF_ERROR(ExecParams("SAVEPOINT " + name, {}));
  // The hooks fn adds are the ones past this index: a rollback drops exactly those, a
  // release leaves them to the enclosing level. (Walking every hook at each savepoint, as
  // a depth per hook required, made a long transaction of nested calls quadratic.)
  const size_t first_hook = hooks_.size();
  ++savepoint_depth_;
  Status st = fn(*this);
  --savepoint_depth_;
  bool released_failed = false;  // the RELEASE below waited for fn's deferred statements
  if (st.ok()) {
    Status released = StatusOf(ExecParams("RELEASE SAVEPOINT " + name, {}));
    if (released.ok()) return st;
    released_failed = true;
    // fn returned OK, yet the savepoint cannot be released: a statement inside failed and
    // fn swallowed its error (harmless on SQLite; on PostgreSQL the failed statement
    // aborted the transaction). Roll back to the savepoint so the enclosing transaction
    // can go on, and report the scope as failed.
    // (Or a deferred statement of fn failed, answered with the release: Tx::ExecDeferred.)
    st = Status(released.code(),
                "a statement inside the savepoint failed (a deferred one, or one whose error "
                "was not returned), so the savepoint was rolled back: " + released.message(),
                released.reason());
  }
  // Everything fn added is undone with it.
  hooks_.resize(std::min(hooks_.size(), first_hook));
  if (!released_failed) {
    // fn failed without waiting for the server: deferred statements of fn (ExecDeferred)
    // may still be on their way, and on PostgreSQL a ROLLBACK TO sent behind one that
    // fails would be skipped with it, leaving the whole transaction aborted. A statement
    // that waits collects their answers first; their failure is part of fn's, which st
    // already reports.
    (void)ExecParams("SELECT 1", {});
  }
  Status undo = StatusOf(ExecParams("ROLLBACK TO SAVEPOINT " + name, {}));
  if (undo.ok()) undo = StatusOf(ExecParams("RELEASE SAVEPOINT " + name, {}));
  if (!undo.ok()) return undo;  // the transaction itself is in trouble: report that
  return st;
}

std::vector<std::function<void()>> Tx::TakeCommitHooks() {
  return std::exchange(hooks_, {});
}

}  // namespace converge
