// The blocking HTTP client over libcurl. One easy handle per call: simple, and cheap next
// to the network round trip it wraps.
#include <curl/curl.h>

#include <mutex>

#include "converge/http.h"

namespace converge::http {
namespace {

struct BodySink {
  std::string* body;
  size_t max;  // 0: no bound
  bool over = false;
};

size_t OnBody(char* data, size_t size, size_t n, void* out) {
  auto* sink = static_cast<BodySink*>(out);
  if (sink->max != 0 && sink->body->size() + size * n > sink->max) {
    sink->over = true;
    return 0;  // fails the transfer: CURLE_WRITE_ERROR
  }
  sink->body->append(data, size * n);
  return size * n;
}

size_t OnHeader(char* data, size_t size, size_t n, void* out) {
  std::string_view line(data, size * n);
  auto colon = line.find(':');
  if (colon != std::string_view::npos) {
    std::string_view value = line.substr(colon + 1);
    while (!value.empty() && (value.front() == ' ' || value.front() == '\t'))
      value.remove_prefix(1);
    while (!value.empty() &&
           (value.back() == '\r' || value.back() == '\n' || value.back() == ' ')) {
      value.remove_suffix(1);
    }
    static_cast<Headers*>(out)->emplace_back(std::string(line.substr(0, colon)),
                                             std::string(value));
  } else if (line.rfind("HTTP/", 0) == 0) {
    static_cast<Headers*>(out)->clear();  // a new response (after 100 Continue or a redirect)
  }
  return size * n;
}

}  // namespace

Client::Client() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

Result<Response> Client::Send(const ClientRequest& r) {
  CURL* curl = curl_easy_init();
  if (curl == nullptr) return tl::unexpected(ResourceExhaustedError("curl_easy_init failed"));
  Response resp;
  struct curl_slist* list = nullptr;
  for (const auto& [k, v] : r.headers) list = curl_slist_append(list, (k + ": " + v).c_str());
  // No "Expect: 100-continue" round trip for bodies.
  list = curl_slist_append(list, "Expect:");
  curl_easy_setopt(curl, CURLOPT_URL, r.url.c_str());
  curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, r.method.c_str());
  // A HEAD answer has a Content-Length and no body: without NOBODY, curl waits for it.
  if (r.method == "HEAD") curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, list);
  if (!r.body.empty() || r.method == "POST" || r.method == "PUT" || r.method == "PATCH") {
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, r.body.data());
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(r.body.size()));
  }
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, static_cast<long>(r.timeout.count()));
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  BodySink sink{&resp.body, r.max_response_body};
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, OnBody);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &sink);
  curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, OnHeader);
  curl_easy_setopt(curl, CURLOPT_HEADERDATA, &resp.headers);
  CURLcode rc = curl_easy_perform(curl);
  long status = 0;
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
  curl_slist_free_all(list);
  curl_easy_cleanup(curl);
  std::string what = r.method + " " + r.url + ": " + curl_easy_strerror(rc);
  if (sink.over) {
    return tl::unexpected(ResourceExhaustedError(
        r.method + " " + r.url + ": the answer (status " + std::to_string(status) +
        ") has a body over " + std::to_string(r.max_response_body) + " bytes"));
  }
  switch (rc) {
    case CURLE_OK:
      resp.status = static_cast<int>(status);
      return resp;
    case CURLE_OPERATION_TIMEDOUT:
      return tl::unexpected(DeadlineExceededError(what));
    case CURLE_URL_MALFORMAT:
    case CURLE_UNSUPPORTED_PROTOCOL:
      return tl::unexpected(InvalidArgumentError(what));
    default:
      return tl::unexpected(UnavailableError(what));
  }
}

}  // namespace converge::http
