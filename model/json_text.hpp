// Every JSON text the project reads (config.json, adapter_config.json, tokenizer_config.json, a safetensors header
// or index, a bitsandbytes quant state, a JSONL line, a train log or trainer state) goes through parse_json.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

namespace gemma {

// nlohmann::json's parser takes a NUL byte outside a string for the end of its input, so "{...}\0{...}" parsed as
// its first object and the rest was dropped without a word: a JSONL line lost its second record, a config.json
// its trailing keys. JSON text cannot hold a raw NUL (RFC 8259: only whitespace between tokens, control characters
// escaped inside strings), and Python's json.loads, which HF and PEFT read these files with, refuses one. So does
// this: json::parse_error 101 at the NUL's 1-based byte offset, caught where the parser's own errors are. An error
// the parser finds before the NUL (a number no double holds, bad syntax) is reported as it is.
// Json: nlohmann::json, or ordered_json (adapter configs, whose patterns match in the order written).
template <class Json = nlohmann::json>
Json parse_json(const std::string& text, typename Json::parser_callback_t callback = nullptr) {
  const size_t nul = text.find('\0');
  const auto nul_error = [&] {
    return Json::parse_error::create(101, nul + 1, "a NUL byte, which JSON text cannot hold", nullptr);
  };
  Json j;
  try {
    j = Json::parse(text, callback);
  } catch (const typename Json::parse_error& e) {
    // The parser stops at the NUL: an error it reports there ("unexpected end of input") is the NUL's.
    if (nul != std::string::npos && e.byte >= nul + 1) throw nul_error();
    throw;
  }
  if (nul != std::string::npos) throw nul_error();
  return j;
}

}  // namespace gemma
