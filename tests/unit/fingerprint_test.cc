// RequestFingerprint: requests that differ in meaning never share a fingerprint;
// formatting (whitespace, key order) does not make two requests differ. Regression tests
// for the correctness issue "fingerprints merge numbers that share a double": the earlier
// version hashed a JSON DOM re-serialised with dump(), so numbers went through a double.
#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "converge/idempotency.h"
#include "src/core/crypto.h"

namespace converge {
namespace {

std::string Fp(std::string_view body) { return RequestFingerprint("POST", "/v1/p", body); }

TEST(RequestFingerprint, HugeIntegersThatShareADoubleDiffer) {
  EXPECT_NE(Fp(R"({"amount":18446744073709551616})"), Fp(R"({"amount":18446744073709551617})"));
  EXPECT_NE(Fp(R"({"amount":-9223372036854775809})"), Fp(R"({"amount":-9223372036854775810})"));
  EXPECT_NE(Fp("123456789012345678901234567890"), Fp("123456789012345678901234567891"));
}

TEST(RequestFingerprint, FractionsThatShareADoubleDiffer) {
  EXPECT_NE(Fp(R"({"rate":0.1})"), Fp(R"({"rate":0.10000000000000000001})"));
  EXPECT_NE(Fp(R"([1e-400])"), Fp(R"([2e-400])"));  // both underflow to 0.0
}

TEST(RequestFingerprint, IntegersWithin64BitsAreExact) {
  EXPECT_NE(Fp("18446744073709551615"), Fp("18446744073709551614"));
  EXPECT_NE(Fp("9223372036854775807"), Fp("9223372036854775806"));
  EXPECT_NE(Fp("-9223372036854775808"), Fp("-9223372036854775807"));
  // An in-range integer and the same digits one past the range never meet.
  EXPECT_NE(Fp("18446744073709551615"), Fp("18446744073709551616"));
  EXPECT_EQ(Fp("-0"), Fp("0"));  // one integer, zero
}

// The documented trade-off: a number is its source text once it is not an exact integer,
// so two spellings of one value get a 422 rather than a replay.
TEST(RequestFingerprint, SpellingsOfOneNumberMayDiffer) {
  EXPECT_NE(Fp(R"({"a":1.0})"), Fp(R"({"a":1.00})"));
  EXPECT_NE(Fp(R"({"a":1})"), Fp(R"({"a":1.0})"));
  EXPECT_NE(Fp(R"({"a":1e2})"), Fp(R"({"a":100})"));
  EXPECT_EQ(Fp(R"({"a":1.50})"), Fp(R"({ "a" : 1.50 })"));
}

TEST(RequestFingerprint, KeyOrderAndWhitespaceDoNotMatter) {
  EXPECT_EQ(Fp(R"({"a":1,"b":2})"), Fp(" {\n\t\"b\" : 2 ,\r\n \"a\":1 } "));
  EXPECT_EQ(Fp(R"({"o":{"y":[1,{"q":true,"p":null}],"x":"s"},"n":-3})"),
            Fp(R"({ "n": -3, "o": { "x": "s", "y": [ 1, { "p": null, "q": true } ] } })"));
  EXPECT_NE(Fp(R"({"a":1})"), Fp(R"({"a":2})"));
  EXPECT_NE(Fp(R"({"a":1})"), Fp(R"({"b":1})"));
}

TEST(RequestFingerprint, NestedStructuresKeepTheirShape) {
  EXPECT_NE(Fp("[1,2]"), Fp("[2,1]"));
  EXPECT_NE(Fp("[[1],2]"), Fp("[1,[2]]"));
  EXPECT_NE(Fp(R"({"a":{"b":1}})"), Fp(R"({"a":{"b":2}})"));
  EXPECT_NE(Fp(R"({"a":{"b":1}})"), Fp(R"({"a":[{"b":1}]})"));
  EXPECT_NE(Fp(R"({"a":{}})"), Fp(R"({"a":[]})"));
  EXPECT_NE(Fp(R"({"a":"1"})"), Fp(R"({"a":1})"));
  EXPECT_NE(Fp(R"({"a":null})"), Fp(R"({})"));
  // Deep nesting costs heap, not stack, and time linear in the body (the DOM-and-dump()
  // version overflowed the stack here: dump() recurses).
  const size_t depth = 200000;
  const std::string deep = std::string(depth, '[') + std::string(depth, ']');
  const std::string deeper = std::string(depth + 1, '[') + std::string(depth + 1, ']');
  EXPECT_NE(Fp(deep), Fp(deeper));
  std::string objects;
  for (size_t i = 0; i < depth / 4; ++i) objects += R"({"b":1,"a":)";
  objects += "0" + std::string(depth / 4, '}');
  EXPECT_EQ(Fp(objects), Fp(objects));
}

TEST(RequestFingerprint, RepeatedKeyKeepsTheLastValueAsTheParserDoes) {
  EXPECT_EQ(Fp(R"({"a":1,"a":2})"), Fp(R"({"a":2})"));
  EXPECT_NE(Fp(R"({"a":1,"a":2})"), Fp(R"({"a":1})"));
  EXPECT_EQ(Fp(R"({"a":{"x":1},"b":0,"a":[7]})"), Fp(R"({"b":0,"a":[7]})"));
}

TEST(RequestFingerprint, StringsAreComparedByWhatTheyDecodeTo) {
  EXPECT_EQ(Fp(R"(["A"])"), Fp(R"(["\u0041"])"));
  EXPECT_EQ(Fp(R"(["a\nb"])"), Fp(R"(["a\u000ab"])"));
  EXPECT_EQ(Fp(R"(["\/"])"), Fp(R"(["/"])"));
  EXPECT_EQ(Fp("[\"\xc3\xa9\"]"), Fp(R"(["\u00e9"])"));
  EXPECT_EQ(Fp("[\"\xf0\x9f\x98\x80\"]"), Fp(R"(["\ud83d\ude00"])"));
  EXPECT_NE(Fp(R"(["a\"b"])"), Fp(R"(["a\\b"])"));
  EXPECT_NE(Fp(R"(["a\u0000b"])"), Fp(R"(["ab"])"));
  EXPECT_NE(Fp(R"(["a\u0000"])"), Fp(R"(["a\u0001"])"));
  // Escapes in keys, and keys that only an escape tells apart.
  EXPECT_EQ(Fp(R"({"\u0041":1})"), Fp(R"({"A":1})"));
  EXPECT_NE(Fp(R"({"a\"":1})"), Fp(R"({"a\\":1})"));
  // A string holding JSON is a string, not the JSON it spells.
  EXPECT_NE(Fp(R"("{\"a\":1}")"), Fp(R"({"a":1})"));
}

TEST(RequestFingerprint, NonJsonBodiesAreRawBytes) {
  EXPECT_EQ(Fp("amount=1"), Fp("amount=1"));
  EXPECT_NE(Fp("amount=1"), Fp("amount=2"));
  EXPECT_NE(Fp(R"({"a":1)"), Fp(R"({ "a":1)"));  // not JSON: whitespace counts
  EXPECT_NE(Fp(R"({"a":1} x)"), Fp(R"({"a":1})"));
  EXPECT_NE(Fp(std::string_view("\0", 1)), Fp(""));
  EXPECT_NE(Fp("1e400"), Fp("1e401"));  // beyond a double: the parser rejects it too
}

// Every field is delimited: what moves between method, path and body is a different request.
TEST(RequestFingerprint, MethodPathAndBodyCannotRunIntoEachOther) {
  EXPECT_NE(RequestFingerprint("POST", "/p", "x"), RequestFingerprint("PUT", "/p", "x"));
  EXPECT_NE(RequestFingerprint("POST", "/p", "x"), RequestFingerprint("POST", "/q", "x"));
  EXPECT_NE(RequestFingerprint("POST", "/p\nx", ""), RequestFingerprint("POST\n/p", "x", ""));
  EXPECT_NE(RequestFingerprint("POST", "/a\n{}", "x"), RequestFingerprint("POST", "/a", "{}\nx"));
  EXPECT_NE(RequestFingerprint("POST", "/a", "\n[1]"), RequestFingerprint("POST", "/a\n", "[1]"));
  EXPECT_NE(RequestFingerprint("GET", "/a\\n/b", ""), RequestFingerprint("GET", "/a\n/b", ""));
  EXPECT_NE(RequestFingerprint("GET", "/a\\", "\n"), RequestFingerprint("GET", "/a", "\\\n"));
}

// The canonical form is pinned: for plain bodies it is what the earlier dump()-based
// version hashed, so keys stored before an upgrade still match their retries.
TEST(RequestFingerprint, CanonicalFormIsTheDocumentedOne) {
  EXPECT_EQ(RequestFingerprint("POST", "/v1/payments",
                               R"({ "order_id": "o-1", "amount": 1200, "tags": ["x", null, true],
                                    "note": "tab\there \u00e9 \u001f" })"),
            internal::Sha256Hex("POST\n/v1/payments\n"
                                "{\"amount\":1200,\"note\":\"tab\\there \xc3\xa9 \\u001f\","
                                "\"order_id\":\"o-1\",\"tags\":[\"x\",null,true]}"));
  EXPECT_EQ(RequestFingerprint("POST", "/p",
                               R"({"b": 1.50, "a": -2E+3, "c": 18446744073709551616})"),
            internal::Sha256Hex("POST\n/p\n{\"a\":-2E+3,\"b\":1.50,\"c\":18446744073709551616}"));
  EXPECT_EQ(RequestFingerprint("POST", "/p", "not json"),
            internal::Sha256Hex(std::string("POST\n/p\n\0raw\0not json", 21)));
}

// The algorithms are fetched once per process and an HMAC key is keyed once (crypto.h):
// published test vectors (FIPS 180-2, RFC 4231 case 2), and the keyed form agrees with the
// one-shot form from many threads at once.
TEST(Crypto, Sha256AndHmacSha256MatchPublishedVectors) {
  EXPECT_EQ(internal::Sha256Hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  auto hex = [](const std::string& raw) {
    std::string out;
    for (unsigned char c : raw) {
      out += "0123456789abcdef"[c >> 4];
      out += "0123456789abcdef"[c & 0xf];
    }
    return out;
  };
  const std::string want = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
  EXPECT_EQ(hex(internal::HmacSha256("Jefe", "what do ya want for nothing?")), want);
  const internal::HmacSha256Key key("Jefe");
  std::vector<std::thread> threads;
  std::atomic<int> wrong{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 200; ++i) {
        if (hex(key.Sign("what do ya want for nothing?")) != want) ++wrong;
        if (key.Sign(std::to_string(i)) != internal::HmacSha256("Jefe", std::to_string(i))) {
          ++wrong;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0);
}

}  // namespace
}  // namespace converge
