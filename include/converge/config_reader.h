// Reading a TOML configuration strictly: unknown sections and keys are errors, every
// value is checked for its type and range, and each error names the key and what it must
// be. Shared by the converge CLI's modes and the example services. Header-only, over
// toml++ (a dependency of whoever includes it).
//
// Thread safety: a reader only reads the table it was given.
#ifndef CONVERGE_CONFIG_READER_H_
#define CONVERGE_CONFIG_READER_H_

#include <cstdint>
#include <initializer_list>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <toml++/toml.h>

#include "converge/clock.h"
#include "converge/status.h"

namespace converge {

namespace internal {
// For ConfigReader::Secret and Secrets (src/core/config_secret.cc). `where` names the key
// in errors; no error shows the secret itself.
// The value of environment variable `name`.
Status SecretFromEnv(const std::string& where, const std::string& name, std::string* out);
// The content of the regular file at `path`, less one final line end.
Status SecretFromFile(const std::string& where, const std::string& path, std::string* out);
}  // namespace internal

// Reads section.key values of `root` into the out-parameters; a key that is absent leaves
// its out-parameter as it was (the default).
class ConfigReader {
 public:
  explicit ConfigReader(const toml::table& root) : root_(root) {}

  // The TOML file at `path`; kInvalidArgument with the parser's message and line.
  static Result<toml::table> ParseFile(const std::string& path) {
    try {
      return toml::parse_file(path);
    } catch (const toml::parse_error& e) {
      return tl::unexpected(InvalidArgumentError("config " + path + ": " +
                                                 std::string(e.description()) + " at line " +
                                                 std::to_string(e.source().begin.line)));
    }
  }

  // Calls fn(reader) for each table of the array of tables [[name]] in `root`, the reader
  // seeing that one table as section `name`. Stops at the first error, which then says
  // which of the tables it is about (" (in [[name]] #2)").
  template <class Fn>
  static Status ForEachTable(const toml::table& root, const char* name, Fn fn) {
    const toml::array* tables = root[name].as_array();
    if (tables == nullptr) return OkStatus();
    size_t n = 0;
    for (const auto& element : *tables) {
      ++n;
      toml::table one;
      one.insert(name, *element.as_table());
      Status st = fn(ConfigReader(one));
      if (!st.ok()) {
        return Status(st.code(),
                      st.message() + " (in [[" + name + "]] #" + std::to_string(n) + ")",
                      st.reason());
      }
    }
    return OkStatus();
  }

  // Checks that each section has only the keys `schema` lists for it ("*": any key) and
  // that no unknown section exists. A section may be a table ([name]) or an array of
  // tables ([[name]]), each checked alike.
  Status Known(const std::map<std::string, std::set<std::string>>& schema) const {
    for (const auto& [section, node] : root_) {
      const std::string name(section.str());
      auto it = schema.find(name);
      if (it == schema.end()) {
        return InvalidArgumentError("config: unknown section [" + name + "]");
      }
      if (const toml::array* tables = node.as_array()) {
        for (const auto& element : *tables) {
          const toml::table* t = element.as_table();
          if (t == nullptr) return InvalidArgumentError("config: [[" + name + "]] must be tables");
          CONVERGE_RETURN_IF_ERROR(KnownKeys(name, *t, it->second));
        }
        continue;
      }
      const toml::table* t = node.as_table();
      if (t == nullptr) return InvalidArgumentError("config: '" + name + "' must be a table");
      CONVERGE_RETURN_IF_ERROR(KnownKeys(name, *t, it->second));
    }
    return OkStatus();
  }

  Status String(const char* section, const char* key, std::string* out) {
    auto n = root_[section][key];
    if (!n) return OkStatus();
    if (!n.is_string()) return Bad(section, key, "a string");
    *out = *n.value<std::string>();
    return OkStatus();
  }
  Status Bool(const char* section, const char* key, bool* out) {
    auto n = root_[section][key];
    if (!n) return OkStatus();
    if (!n.is_boolean()) return Bad(section, key, "true or false");
    *out = *n.value<bool>();
    return OkStatus();
  }
  template <class T>
  Status Int(const char* section, const char* key, T* out, int64_t lo, int64_t hi) {
    auto n = root_[section][key];
    if (!n) return OkStatus();
    if (!n.is_integer()) return Bad(section, key, "an integer");
    int64_t v = *n.value<int64_t>();
    if (v < lo || v > hi) {
      return Bad(section, key, "between " + std::to_string(lo) + " and " + std::to_string(hi));
    }
    *out = static_cast<T>(v);
    return OkStatus();
  }
  Status Duration(const char* section, const char* key, Millis* out, int64_t lo_ms,
                  int64_t hi_ms) {
    int64_t ms = out->count();
    CONVERGE_RETURN_IF_ERROR(Int(section, key, &ms, lo_ms, hi_ms));
    *out = Millis(ms);
    return OkStatus();
  }
  Status Strings(const char* section, const char* key, std::vector<std::string>* out) {
    auto n = root_[section][key];
    if (!n) return OkStatus();
    const toml::array* a = n.as_array();
    if (a == nullptr) return Bad(section, key, "an array of strings");
    out->clear();
    for (const auto& e : *a) {
      if (!e.is_string()) return Bad(section, key, "an array of strings");
      out->push_back(*e.value<std::string>());
    }
    return OkStatus();
  }
  // A secret, given one of three ways (at most one): `key` itself, `key_env` the name of
  // an environment variable that holds it, or `key_file` the path of a regular file that
  // holds it (as Docker and Kubernetes mount secrets; one final line end is dropped; a
  // relative path is taken from the working directory). A variable unset or empty, a file
  // unreadable, empty or over 64 KiB, and a secret read from either with a control
  // character, a byte-order mark or surrounding blanks (likely not the secret meant) are
  // errors naming the key, never showing the secret. The caller lists the three keys as
  // known.
  Status Secret(const char* section, const char* key, std::string* out) {
    const std::string env_key = std::string(key) + "_env", file_key = std::string(key) + "_file";
    CONVERGE_RETURN_IF_ERROR(OneOf(section, {key, env_key, file_key}));
    std::string from;
    if (root_[section][env_key]) {
      CONVERGE_RETURN_IF_ERROR(String(section, env_key.c_str(), &from));
      return FromEnv(section, env_key, from, out);
    }
    if (root_[section][file_key]) {
      CONVERGE_RETURN_IF_ERROR(String(section, file_key.c_str(), &from));
      return FromFile(section, file_key, from, out);
    }
    return String(section, key, out);
  }
  // Several secrets (while one rotates), the same three ways: `key` an array of secrets,
  // `key_env` an array of variable names, `key_file` an array of paths, each variable or
  // file holding one secret.
  Status Secrets(const char* section, const char* key, std::vector<std::string>* out) {
    const std::string env_key = std::string(key) + "_env", file_key = std::string(key) + "_file";
    CONVERGE_RETURN_IF_ERROR(OneOf(section, {key, env_key, file_key}));
    for (const std::string* from_key : {&env_key, &file_key}) {
      if (!root_[section][*from_key]) continue;
      std::vector<std::string> sources;
      CONVERGE_RETURN_IF_ERROR(Strings(section, from_key->c_str(), &sources));
      out->clear();
      for (const std::string& source : sources) {
        std::string secret;
        CONVERGE_RETURN_IF_ERROR(from_key == &env_key
                                     ? FromEnv(section, *from_key, source, &secret)
                                     : FromFile(section, *from_key, source, &secret));
        out->push_back(std::move(secret));
      }
      return OkStatus();
    }
    return Strings(section, key, out);
  }
  Status Ints(const char* section, const char* key, std::vector<int>* out, int lo, int hi) {
    auto n = root_[section][key];
    if (!n) return OkStatus();
    const toml::array* a = n.as_array();
    const std::string what = "an array of integers between " + std::to_string(lo) + " and " +
                             std::to_string(hi);
    if (a == nullptr) return Bad(section, key, what);
    out->clear();
    for (const auto& e : *a) {
      if (!e.is_integer() || *e.value<int64_t>() < lo || *e.value<int64_t>() > hi) {
        return Bad(section, key, what);
      }
      out->push_back(static_cast<int>(*e.value<int64_t>()));
    }
    return OkStatus();
  }
  Status StringMap(const char* section, const char* key, std::map<std::string, std::string>* out) {
    auto n = root_[section][key];
    if (!n) return OkStatus();
    const toml::table* t = n.as_table();
    if (t == nullptr) return Bad(section, key, "a table of strings");
    for (const auto& [k, v] : *t) {
      if (!v.is_string()) return Bad(section, key, "a table of strings");
      (*out)[std::string(k.str())] = *v.value<std::string>();
    }
    return OkStatus();
  }

 private:
  Status OneOf(const char* section, std::initializer_list<std::string> keys) const {
    std::string given;
    for (const std::string& k : keys) {
      if (!root_[section][k]) continue;
      if (!given.empty()) {
        return InvalidArgumentError(std::string("config: ") + section + "." + given + " and " +
                                    section + "." + k + " both give the secret; keep one");
      }
      given = k;
    }
    return OkStatus();
  }
  static Status FromEnv(const char* section, const std::string& key, const std::string& name,
                        std::string* out) {
    return internal::SecretFromEnv(std::string("config: ") + section + "." + key, name, out);
  }
  static Status FromFile(const char* section, const std::string& key, const std::string& path,
                         std::string* out) {
    return internal::SecretFromFile(std::string("config: ") + section + "." + key, path, out);
  }
  static Status KnownKeys(const std::string& section, const toml::table& t,
                          const std::set<std::string>& keys) {
    for (const auto& [key, v] : t) {
      if (!keys.count(std::string(key.str())) && !keys.count("*")) {
        return InvalidArgumentError("config: unknown key '" + section + "." +
                                    std::string(key.str()) + "'");
      }
    }
    return OkStatus();
  }
  static Status Bad(const char* section, const char* key, const std::string& what) {
    return InvalidArgumentError(std::string("config: ") + section + "." + key + " must be " + what);
  }
  const toml::table& root_;
};

}  // namespace converge

#endif  // CONVERGE_CONFIG_READER_H_
