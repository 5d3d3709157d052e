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
// this: json::parse_error 101 at the NUL's 1-based byte offset, caught where the parser's own errors are.
// Json: nlohmann::json, or ordered_json (adapter configs, whose patterns match in the order written).
template <class Json = nlohmann::json>
Json parse_json(const std::string& text, typename Json::parser_callback_t callback = nullptr) {
  if (const size_t at = text.find('\0'); at != std::string::npos)
    throw Json::parse_error::create(101, at + 1, "a NUL byte, which JSON text cannot hold", nullptr);
  return Json::parse(text, callback);
}

}  // namespace gemma
