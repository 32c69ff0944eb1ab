// RequestFingerprint (idempotency.h): what makes two HTTP requests "the same request" for
// one idempotency key. The rule it keeps: two requests that differ in meaning never share a
// fingerprint, because a shared fingerprint turns the second request into a replay of the
// first (a wrong answer) where it should get 422. Two requests that differ only in
// formatting share one where that is cheap to see (whitespace, key order).
//
// Method: the SHA-256 hex of
//
//   escaped(method) '\n' escaped(path) '\n' body-part
//
// escaped() writes '\' as "\\" and a newline as "\n", so neither field holds a raw newline
// and the material splits back into its fields one way only.
//
// body-part, for a body that nlohmann's parser accepts (the parser the handlers use), is
// a canonical JSON text built from its SAX events, never from a DOM: a DOM holds every
// non-integer number as a double, which is what merged 18446744073709551616 with
// 18446744073709551617, and 0.1 with 0.10000000000000000001. The canonical text:
//   * objects: members sorted by key (bytewise); a repeated key keeps its last value, as
//     the DOM parse does; no whitespace anywhere;
//   * strings: UTF-8 as decoded, with '"', '\' and control characters escaped the way
//     nlohmann's dump() escapes them (the parser has already rejected invalid UTF-8);
//   * integers that fit int64/uint64: decimal, exactly;
//   * every other number (a fraction, an exponent, an integer past 64 bits): its source
//     text, with the decimal point written '.' whatever the C locale says. 1.0 and 1.00
//     then differ: the safe direction (a 422, never a wrong replay).
// For any other body, body-part is "\0raw\0" followed by the bytes. A canonical JSON text
// starts with '{', '[', '"', '-', a digit or a literal, never NUL, so a raw body can never
// meet a JSON one.
//
// For bodies without fractions or numbers past 64 bits, and a method and path without '\'
// or newlines, the material is byte for byte what the earlier version (DOM parse, then
// dump()) hashed: keys stored before an upgrade still match their retries. See
// docs/design/http-idempotency.md, "The fingerprint".
//
// Cost: linear in the body plus the sorting of each object's keys; nesting depth costs
// heap, never stack (the parser is iterative, and so is the serialisation below).
#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "converge/idempotency.h"
#include "src/core/crypto.h"

namespace converge {
namespace {

using json = nlohmann::json;

constexpr std::string_view kRawTag("\0raw\0", 5);

void AppendEscapedField(std::string_view field, std::string* out) {
  for (char c : field) {
    if (c == '\\') {
      out->append("\\\\");
    } else if (c == '\n') {
      out->append("\\n");
    } else {
      out->push_back(c);
    }
  }
}

// A JSON string literal for `s`, escaped as nlohmann's dump() (ensure_ascii = false) does.
void AppendQuoted(std::string_view s, std::string* out) {
  static constexpr char kHex[] = "0123456789abcdef";
  out->push_back('"');
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out->append("\\\""); break;
      case '\\': out->append("\\\\"); break;
      case '\b': out->append("\\b"); break;
      case '\f': out->append("\\f"); break;
      case '\n': out->append("\\n"); break;
      case '\r': out->append("\\r"); break;
      case '\t': out->append("\\t"); break;
      default:
        if (c < 0x20) {
          out->append("\\u00");
          out->push_back(kHex[c >> 4]);
          out->push_back(kHex[c & 0xf]);
        } else {
          out->push_back(ch);
        }
    }
  }
  out->push_back('"');
}

// Collects the SAX events of one JSON text into a compact tree (scalars as canonical text
// in one arena, containers as lists of members), then writes the canonical text in one
// pass. Building the text bottom-up instead would copy each value once per enclosing
// level: quadratic in the nesting depth, which the body's sender controls.
class Canonicalizer {
 public:
  // --- nlohmann::json SAX interface -------------------------------------------------
  bool null() { return Scalar("null"); }
  bool boolean(bool value) { return Scalar(value ? "true" : "false"); }
  bool number_integer(json::number_integer_t value) { return Scalar(std::to_string(value)); }
  bool number_unsigned(json::number_unsigned_t value) { return Scalar(std::to_string(value)); }
  bool number_float(json::number_float_t /*value*/, const json::string_t& source) {
    // The lexer writes the decimal point as the C locale's; the other characters of a
    // number token are digits, signs and 'e'/'E'.
    std::string text = source;
    for (char& c : text) {
      const bool kept = (c >= '0' && c <= '9') || c == '-' || c == '+' || c == 'e' || c == 'E';
      if (!kept) c = '.';
    }
    return Scalar(text);
  }
  bool string(json::string_t& value) {
    std::string quoted;
    quoted.reserve(value.size() + 2);
    AppendQuoted(value, &quoted);
    return Scalar(quoted);
  }
  bool binary(json::binary_t& /*value*/) { return false; }  // JSON text has no binary
  bool start_object(std::size_t /*elements*/) { return Open(/*object=*/true); }
  bool key(json::string_t& name) {
    pending_key_ = {keys_.size(), name.size()};
    keys_.append(name);
    return true;
  }
  bool end_object() {
    Container& c = containers_[open_.back()];
    // Sort by key; among equal keys the stable sort keeps source order, and the last one
    // wins, as in the DOM parse (json::operator[] assigns over the earlier value).
    std::stable_sort(c.members.begin(), c.members.end(), [&](const Member& a, const Member& b) {
      return KeyOf(a) < KeyOf(b);
    });
    std::vector<Member> kept;
    kept.reserve(c.members.size());
    for (size_t i = 0; i < c.members.size(); ++i) {
      if (i + 1 < c.members.size() && KeyOf(c.members[i]) == KeyOf(c.members[i + 1])) continue;
      kept.push_back(c.members[i]);
    }
    c.members = std::move(kept);
    open_.pop_back();
    return true;
  }
  bool start_array(std::size_t /*elements*/) { return Open(/*object=*/false); }
  bool end_array() {
    open_.pop_back();
    return true;
  }
  bool parse_error(std::size_t /*position*/, const std::string& /*last_token*/,
                   const json::exception& /*error*/) {
    return false;
  }

  // The canonical text of the whole document. REQUIRES: the parse succeeded.
  void AppendCanonical(std::string* out) const {
    if (!root_.container) {
      out->append(scalars_, root_.begin, root_.size);
      return;
    }
    struct Frame {
      size_t container;
      size_t next;
    };
    std::vector<Frame> stack;
    auto open = [&](size_t index) {
      out->push_back(containers_[index].object ? '{' : '[');
      stack.push_back({index, 0});
    };
    open(root_.begin);
    while (!stack.empty()) {
      Frame& f = stack.back();
      const Container& c = containers_[f.container];
      if (f.next == c.members.size()) {
        out->push_back(c.object ? '}' : ']');
        stack.pop_back();
        continue;
      }
      const Member& m = c.members[f.next++];
      if (f.next > 1) out->push_back(',');
      if (c.object) {
        AppendQuoted(KeyOf(m), out);
        out->push_back(':');
      }
      if (m.value.container) {
        open(m.value.begin);  // may reallocate `stack`: `f` is not used after this
      } else {
        out->append(scalars_, m.value.begin, m.value.size);
      }
    }
  }

 private:
  struct Span {
    size_t begin = 0, size = 0;
  };
  // A value: scalar text in scalars_, or (container) the index of a Container.
  struct Ref {
    bool container = false;
    size_t begin = 0, size = 0;
  };
  struct Member {
    Span key;  // in keys_; unused in arrays
    Ref value;
  };
  struct Container {
    bool object = false;
    std::vector<Member> members;
  };

  std::string_view KeyOf(const Member& m) const {
    return std::string_view(keys_).substr(m.key.begin, m.key.size);
  }

  bool Scalar(std::string_view text) {
    Attach({false, scalars_.size(), text.size()});
    scalars_.append(text);
    return true;
  }

  bool Open(bool object) {
    const size_t index = containers_.size();
    containers_.push_back({object, {}});
    Attach({true, index, 0});
    open_.push_back(index);
    return true;
  }

  void Attach(Ref value) {
    if (open_.empty()) {
      root_ = value;
      return;
    }
    containers_[open_.back()].members.push_back({pending_key_, value});
  }

  std::string scalars_;
  std::string keys_;
  std::vector<Container> containers_;
  std::vector<size_t> open_;  // containers whose end has not been seen, innermost last
  Span pending_key_;
  Ref root_;
};

}  // namespace

std::string RequestFingerprint(std::string_view method, std::string_view path,
                               std::string_view body) {
  std::string material;
  material.reserve(method.size() + path.size() + body.size() + 8);
  AppendEscapedField(method, &material);
  material.push_back('\n');
  AppendEscapedField(path, &material);
  material.push_back('\n');
  Canonicalizer canonical;
  if (json::sax_parse(body.begin(), body.end(), &canonical)) {
    canonical.AppendCanonical(&material);
  } else {
    material.append(kRawTag).append(body);
  }
  return internal::Sha256Hex(material);
}

}  // namespace converge
