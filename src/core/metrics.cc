#include "converge/metrics.h"

#include <cmath>
#include <cstdio>

namespace converge {
namespace {

std::string Escape(std::string_view v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

// # HELP text: backslash and line feed escaped, as the exposition format wants.
std::string EscapeHelp(std::string_view v) {
  std::string out;
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string Number(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  if (v == static_cast<double>(static_cast<int64_t>(v)) && v < 1e15 && v > -1e15) {
    std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(v));
  } else {
    std::snprintf(buf, sizeof buf, "%.9g", v);
  }
  return buf;
}

// Joins a label key ("a=\"1\",b=\"2\"") with one more label.
std::string With(const std::string& key, const std::string& extra) {
  if (key.empty()) return "{" + extra + "}";
  return "{" + key + "," + extra + "}";
}

}  // namespace

std::string Metrics::LabelKey(const Labels& labels) {
  std::string out;
  for (const auto& [k, v] : labels) {
    if (!out.empty()) out += ",";
    out += k + "=\"" + Escape(v) + "\"";
  }
  return out;
}

void Metrics::Describe(const std::string& name, const std::string& type, const std::string& help) {
  std::lock_guard<std::mutex> l(mu_);
  Family& f = families_[name];
  f.type = type;
  f.help = help;
}

void Metrics::Add(const std::string& name, const Labels& labels, double v) {
  std::lock_guard<std::mutex> l(mu_);
  families_[name].series[LabelKey(labels)].value += v;
}

void Metrics::Set(const std::string& name, const Labels& labels, double v) {
  std::lock_guard<std::mutex> l(mu_);
  families_[name].series[LabelKey(labels)].value = v;
}

void Metrics::Observe(const std::string& name, const Labels& labels, double v,
                      const std::vector<double>& bounds) {
  std::lock_guard<std::mutex> l(mu_);
  Series& s = families_[name].series[LabelKey(labels)];
  if (s.bounds.empty()) {
    s.bounds = bounds;
    s.buckets.assign(bounds.size(), 0);
  }
  for (size_t i = 0; i < s.bounds.size(); ++i) {
    if (v <= s.bounds[i]) ++s.buckets[i];
  }
  s.sum += v;
  ++s.count;
}

void Metrics::SetHistogram(const std::string& name, const Labels& labels,
                           const std::vector<double>& bounds,
                           const std::vector<uint64_t>& cumulative, double sum, uint64_t count) {
  std::lock_guard<std::mutex> l(mu_);
  Series& s = families_[name].series[LabelKey(labels)];
  s.bounds = bounds;
  s.buckets = cumulative;
  s.buckets.resize(bounds.size(), count);
  s.sum = sum;
  s.count = count;
}

double Metrics::Value(const std::string& name, const Labels& labels) const {
  std::lock_guard<std::mutex> l(mu_);
  auto f = families_.find(name);
  if (f == families_.end()) return 0;
  auto s = f->second.series.find(LabelKey(labels));
  return s == f->second.series.end() ? 0 : s->second.value;
}

std::string Metrics::Render() const {
  std::lock_guard<std::mutex> l(mu_);
  std::string out;
  for (const auto& [name, f] : families_) {
    if (!f.help.empty()) out += "# HELP " + name + " " + EscapeHelp(f.help) + "\n";
    out += "# TYPE " + name + " " + f.type + "\n";
    for (const auto& [key, s] : f.series) {
      if (f.type == "histogram") {
        for (size_t i = 0; i < s.bounds.size(); ++i) {
          out += name + "_bucket" + With(key, "le=\"" + Number(s.bounds[i]) + "\"") + " " +
                 Number(static_cast<double>(s.buckets[i])) + "\n";
        }
        out += name + "_bucket" + With(key, "le=\"+Inf\"") + " " +
               Number(static_cast<double>(s.count)) + "\n";
        std::string braces = key.empty() ? "" : "{" + key + "}";
        out += name + "_sum" + braces + " " + Number(s.sum) + "\n";
        out += name + "_count" + braces + " " + Number(static_cast<double>(s.count)) + "\n";
      } else {
        out += name + (key.empty() ? "" : "{" + key + "}") + " " + Number(s.value) + "\n";
      }
    }
  }
  return out;
}

}  // namespace converge
