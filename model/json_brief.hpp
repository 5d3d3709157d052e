// A JSON value quoted in an error message. Scalars and flat lists appear as written; anything nested is
// named by its kind: dumping it could print megabytes, and dump() recurses as deep as the input nests, so
// a hostile file of a million '[' would overflow the stack while we report it.
#pragma once
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>

namespace gemma {

// Any nlohmann JSON type: configs are read as json, adapter configs as ordered_json (PEFT's patterns are
// matched in the order they were written).
template <class Json>
inline std::string json_brief(const Json& v) {
  if (v.is_structured()) {
    bool flat = v.size() <= 8;
    for (const auto& e : v) flat = flat && !e.is_structured();
    if (!flat) return v.is_array() ? "a list of " + std::to_string(v.size()) + " entries" : "an object";
  }
  std::string s = v.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (s.size() > 120) s = s.substr(0, 117) + "...";
  return s;
}

// Whether v is an integer beyond int64: nlohmann stores one above INT64_MAX unsigned, and get<int64_t> wraps it
// (2^64 - 100 reads as -100). Readers of int64 values refuse it, naming v.get<uint64_t>().
template <class Json>
inline bool beyond_int64(const Json& v) {
  return v.is_number_unsigned() && v.template get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max());
}

}  // namespace gemma
