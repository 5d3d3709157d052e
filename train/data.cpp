#include "train/data.hpp"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <nlohmann/json.hpp>

#include "check/golden.hpp"
#include "model/errors.hpp"
#include "model/json_brief.hpp"
#include "model/safetensors.hpp"
#include "model/synthetic.hpp"
#include "model/json_text.hpp"

namespace gemma::train {

using nlohmann::json;
namespace fs = std::filesystem;

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  // Text a row must not hold, longest first, each with what it is: every control and unknown piece, and every added
  // token of tokenizer_config.json that SentencePiece does not read as its one id (added_token_is_read).
  std::vector<std::pair<std::string, std::string>> special;
};

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::~Tokenizer() = default;

namespace {

// HF writes a token either as a string or as an AddedToken object {"content": "<bos>", ...}; `what` names the
// entry in the error (exit 2) for anything else.
std::string token_text(const json& v, const std::string& what, const std::string& path) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  fail(path, what + " is neither a string nor an object with a string 'content'");
}

// A special token's text under `key`, or nothing where the key is absent or null.
std::optional<std::string> special_token(const json& j, const char* key, const std::string& path) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::nullopt;
  return token_text(*it, key, path);
}

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::load(const TokenizerOptions& o, int64_t vocab_size) {
  if (!o.model_path) throw std::logic_error("Tokenizer::load without a model path");
  const std::string& path = *o.model_path;
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) fail(path, "no such file (--tokenizer wants a SentencePiece tokenizer.model)");
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  const auto st = t->impl_->sp.Load(path);
  if (!st.ok()) fail(path, "not a SentencePiece model: " + st.ToString());
  t->pieces = t->impl_->sp.GetPieceSize();
  if (t->pieces > vocab_size)
    fail(path, "has " + std::to_string(t->pieces) + " pieces, more than the model's vocab_size " + std::to_string(vocab_size) +
                   ": it is not this model's tokenizer");
  t->bos_id = t->impl_->sp.bos_id();
  t->eos_id = t->impl_->sp.eos_id();
  auto& special = t->impl_->special;
  for (int id = 0; id < t->impl_->sp.GetPieceSize(); ++id)
    if (t->impl_->sp.IsControl(id) || t->impl_->sp.IsUnknown(id))
      if (const std::string p = t->impl_->sp.IdToPiece(id); !p.empty())
        special.emplace_back(p, "the text of a special token: HF's tokenizer reads it as that token, SentencePiece "
                                "as characters");
  if (o.config_path) {
    const std::string& cp = *o.config_path;
    json j;
    try {
      j = parse_json(read_text_file(cp));
    } catch (const json::exception& e) {
      fail(cp, std::string("malformed JSON: ") + e.what());
    }
    if (!j.is_object()) fail(cp, "is not a JSON object");
    if (auto it = j.find("add_bos_token"); it != j.end()) {
      if (!it->is_boolean()) fail(cp, "add_bos_token is not true or false");
      t->add_bos_token = it->get<bool>();
    }
    // add_eos_token makes HF's tokenizer end every encoded text with EOS. The recipe ends each example with exactly
    // one EOS of its own (docs/train.md), so false (Gemma's setting) is what it computes; true would mean a second
    // EOS to one reader and the same one to another, and is refused rather than guessed.
    if (auto it = j.find("add_eos_token"); it != j.end()) {
      if (!it->is_boolean()) fail(cp, "add_eos_token is not true or false");
      if (it->get<bool>())
        fail(cp, "add_eos_token = true is not implemented: the recipe ends every text example with one EOS of its own "
                 "(add_eos_token false, Gemma's setting)");
    }
    auto piece = [&](const char* key, int64_t& id) {
      if (auto s = special_token(j, key, cp)) {
        const int v = t->impl_->sp.PieceToId(*s);
        // PieceToId answers unk_id for a piece the model does not have.
        if (v == t->impl_->sp.unk_id() && t->impl_->sp.IdToPiece(v) != *s)
          fail(cp, std::string(key) + " '" + *s + "' is not a piece of " + path);
        id = v;
      }
    };
    piece("bos_token", t->bos_id);
    piece("eos_token", t->eos_id);
    // Added tokens (tokenizer.add_tokens, a chat template's markers): HF's tokenizer splits their text out of a row
    // before SentencePiece sees it and gives each its one id; SentencePiece alone spells a token it does not have as
    // characters (found by a probe, 2026-12-06: "<extra>" at id 200 became 6 pieces). A token SentencePiece reads as
    // its declared id on its own and inside a word (Gemma's <start_of_turn>, a user-defined piece) is left to it;
    // any other one is refused in a row's text.
    auto added = [&](const json& tok, std::optional<int64_t> id, const std::string& where) {
      const std::string c = token_text(tok, where + " has an entry that", cp);
      if (c.empty() || t->added_token_is_read(c, id)) return;
      special.emplace_back(c, "an added token (" + where + (id ? ", id " + std::to_string(*id) : std::string()) +
                                  "): HF's tokenizer reads it as that one token, SentencePiece otherwise");
    };
    if (auto it = j.find("added_tokens_decoder"); it != j.end() && !it->is_null()) {
      if (!it->is_object()) fail(cp, "added_tokens_decoder is not an object of id: token");
      for (const auto& [k, v] : it->items()) {
        int64_t id = -1;
        try {
          size_t n = 0;
          id = std::stoll(k, &n);
          if (n != k.size() || id < 0) id = -1;
        } catch (const std::exception&) {
        }
        if (id < 0) fail(cp, "added_tokens_decoder key '" + k + "' is not a token id");
        added(v, id, "added_tokens_decoder");
      }
    }
    if (auto it = j.find("additional_special_tokens"); it != j.end() && !it->is_null()) {
      if (!it->is_array()) fail(cp, "additional_special_tokens is not a list");
      for (const auto& v : *it) added(v, std::nullopt, "additional_special_tokens");
    }
    for (const char* key : {"pad_token", "unk_token", "mask_token"})
      if (auto it = j.find(key); it != j.end() && !it->is_null()) added(*it, std::nullopt, key);
    // Nothing is read past without a word (found by a probe, 2026-12-05: chat_template, legacy and the rest went
    // unmentioned). Read above: add_bos_token, add_eos_token, bos_token, eos_token. Known to leave the ids of this
    // recipe alone: provenance and limits (tokenizer_class, name_or_path, model_max_length: rows are --seq-len),
    // decoding (clean_up_tokenization_spaces, spaces_between_special_tokens), the chat template (never applied:
    // rows are text or Alpaca), padding and truncation sides (rows are padded and cut on the right by the recipe).
    // The added and special tokens' lists are read above. Any other key is named in one warning.
    static const std::set<std::string> known = {
        "add_bos_token", "add_eos_token", "bos_token", "eos_token", "tokenizer_class", "name_or_path",
        "model_max_length", "clean_up_tokenization_spaces", "spaces_between_special_tokens", "chat_template",
        "padding_side", "truncation_side", "added_tokens_decoder", "additional_special_tokens", "pad_token",
        "unk_token", "mask_token"};
    std::string unread;
    for (const auto& [k, v] : j.items())
      if (!known.count(k)) unread += (unread.empty() ? "'" : ", '") + k + "'";
    if (!unread.empty())
      t->warnings.push_back(cp + ": not read: " + unread +
                            " (this recipe tokenizes with the SentencePiece model as is; check they do not change the ids)");
  }
  std::stable_sort(special.begin(), special.end(), [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  // With add_bos_token false no BOS is prepended, so --bos-id would change nothing; a flag that is read past is
  // refused, as --tokenizer is on data that is tokenized already.
  if (o.bos_id && !t->add_bos_token)
    fail("--bos-id", "changes nothing: add_bos_token is false in " + *o.config_path + ", so no BOS is prepended");
  if (o.bos_id) t->bos_id = *o.bos_id;
  if (o.eos_id) t->eos_id = *o.eos_id;
  // "give --bos-id" is advice for an id the tokenizer supplied; a flag's own id out of range is said to be so.
  const auto check_id = [&](const char* what, int64_t id, const std::optional<int64_t>& given, const char* flag) {
    if (id >= 0 && id < vocab_size) return;
    const std::string vocab = "not in the vocabulary [0, " + std::to_string(vocab_size) + ")";
    if (given) fail(flag, std::to_string(id) + " is out of range: " + vocab);
    fail(path, std::string(what) + " id " + std::to_string(id) + " is " + vocab + " (give " + flag + ")");
  };
  check_id("BOS", t->bos_id, o.bos_id, "--bos-id");
  check_id("EOS", t->eos_id, o.eos_id, "--eos-id");
  return t;
}

std::vector<int64_t> Tokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  const auto st = impl_->sp.Encode(text, &ids);
  if (!st.ok()) throw InputError("tokenizer: " + st.ToString());
  return std::vector<int64_t>(ids.begin(), ids.end());
}

std::optional<std::pair<std::string, std::string>> Tokenizer::special_text_in(const std::string& text) const {
  for (const auto& p : impl_->special)
    if (text.find(p.first) != std::string::npos) return p;
  return std::nullopt;
}

bool Tokenizer::added_token_is_read(const std::string& content, std::optional<int64_t> id) const {
  const int piece = impl_->sp.PieceToId(content);
  if (impl_->sp.IdToPiece(piece) != content || (id && *id != piece)) return false;
  if (impl_->sp.IsControl(piece) || impl_->sp.IsUnknown(piece)) return false;
  const auto has = [&](const std::string& text) {
    const std::vector<int64_t> ids = encode(text);
    return std::count(ids.begin(), ids.end(), piece) == 1;
  };
  // Inside a word, not beside whitespace: Gemma's user-defined pieces include runs of newlines and spaces, and a
  // longer run beside one ("\n\n" then "\n") is rightly read as the longer token by both tokenizers.
  return encode(content) == std::vector<int64_t>{piece} && has("a" + content + "a");
}

// Stanford Alpaca's PROMPT_DICT (tatsu-lab/stanford_alpaca, train.py): the prompt ends at "### Response:" and the
// output follows it directly. It ended "### Response:\n" here (alpaca-lora's variant) while docs/train.md said
// Stanford's: one more prompt token on every row (found by a probe, 2026-12-05).
std::string alpaca_prompt(const std::string& instruction, const std::string& input) {
  if (input.empty())
    return "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
           "### Instruction:\n" + instruction + "\n\n### Response:";
  return "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
         "response that appropriately completes the request.\n\n### Instruction:\n" + instruction +
         "\n\n### Input:\n" + input + "\n\n### Response:";
}

namespace {

struct Example {
  std::vector<int64_t> ids, labels;
  std::vector<int64_t> positions;  // the row's own position_ids (with --packing only), else empty
  bool text = false;               // tokenized here (a text or instruction row)
  int64_t line = 0;
};

// The keys only a tokenized row (input_ids) may carry; on a text or instruction row each is refused.
constexpr const char* kTokenizedRowKeys[] = {"labels", "attention_mask", "position_ids", "completion_mask",
                                             "assistant_masks", "seq_lengths"};

// The keys a row may carry; any other key is reported once (load_dataset's warnings) and not used, as HF's Trainer
// drops the dataset columns its model's forward does not take.
bool known_row_key(const std::string& k) {
  for (const char* known : {"input_ids", "text", "instruction", "input", "output"})
    if (k == known) return true;
  for (const char* known : kTokenizedRowKeys)
    if (k == known) return true;
  return false;
}

std::vector<int64_t> int_list(const json& v, const std::string& where, const char* key) {
  if (!v.is_array()) fail(where, std::string(key) + " is not a list of integers");
  std::vector<int64_t> out;
  out.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if (!v[i].is_number_integer())
      fail(where, std::string(key) + "[" + std::to_string(i) + "] is " + json_brief(v[i]) + ", not an integer");
    // Wrapped, a label 2^64 - 100 became -100 and went silently unscored (found by a probe, 2026-12-06).
    if (beyond_int64(v[i]))
      fail(where, std::string(key) + "[" + std::to_string(i) + "] is " + std::to_string(v[i].get<uint64_t>()) +
                      ", out of range (at most " + std::to_string(std::numeric_limits<int64_t>::max()) + ")");
    out.push_back(v[i].get<int64_t>());
  }
  return out;
}

// A per-token list beside input_ids (attention_mask, completion_mask, position_ids): integers, one per token.
std::vector<int64_t> token_list(const json& j, const char* key, const std::string& where, size_t n) {
  std::vector<int64_t> v = int_list(j[key], where, key);
  if (v.size() != n) fail(where, std::string(key) + " and input_ids differ in length");
  return v;
}

std::string str_field(const json& j, const char* key, const std::string& where, bool required) {
  auto it = j.find(key);
  // An Alpaca "input": null has two readings: Stanford's train.py tests `example.get("input", "") != ""`, so None
  // formats the prompt with an input reading "None", where other loaders take it as no input (found by a probe,
  // 2026-12-06). Refused rather than one reading picked.
  if (!required && it != j.end() && it->is_null())
    fail(where, std::string("'") + key + "' is null, which Stanford Alpaca's recipe formats as the text \"None\" and "
                "others as no input: give \"\" (or leave it out) for none, \"None\" for the text");
  if (it == j.end() || it->is_null()) {
    if (required)
      fail(where, std::string(std::strcmp(key, "text") == 0 ? "a text row needs '" : "an instruction row needs '") + key +
                      "'" + (it == j.end() ? "" : " as a string, not null"));
    return "";
  }
  if (!it->is_string()) fail(where, std::string("'") + key + "' is not a string");
  return it->get<std::string>();
}

Example parse_line(const std::string& text, const std::string& where, const Config& c, const Tokenizer* tok,
                   bool packing, std::set<std::string>* unknown) {
  json j;
  try {
    j = parse_json(text);
  } catch (const json::exception& e) {
    fail(where, std::string("not valid JSON: ") + e.what());
  }
  if (!j.is_object()) fail(where, "a line is one JSON object");
  for (const auto& [k, v] : j.items())
    if (!known_row_key(k) && unknown) unknown->insert(k);
  if (!j.contains("input_ids"))
    for (const char* k : kTokenizedRowKeys)
      if (j.contains(k)) fail(where, std::string("'") + k + "' belongs to a tokenized row (input_ids), not a text row");
  Example ex;
  const int64_t V = c.vocab_size;
  if (j.contains("input_ids")) {
    for (const char* k : {"text", "instruction", "input", "output"})
      if (j.contains(k)) fail(where, std::string("has both input_ids and '") + k + "': give one form per row");
    ex.ids = int_list(j["input_ids"], where, "input_ids");
    if (ex.ids.empty()) fail(where, "input_ids is empty");
    for (size_t i = 0; i < ex.ids.size(); ++i)
      if (ex.ids[i] < 0 || ex.ids[i] >= V)
        fail(where, "input_ids[" + std::to_string(i) + "] = " + std::to_string(ex.ids[i]) + " is outside the vocabulary [0, " +
                        std::to_string(V) + ")");
    if (j.contains("labels") && !j["labels"].is_null()) {
      ex.labels = int_list(j["labels"], where, "labels");
      if (ex.labels.size() != ex.ids.size())
        fail(where, "labels has " + std::to_string(ex.labels.size()) + " entries, input_ids " + std::to_string(ex.ids.size()));
      for (size_t i = 0; i < ex.labels.size(); ++i)
        if (ex.labels[i] != kIgnoreIndex && (ex.labels[i] < 0 || ex.labels[i] >= V))
          fail(where, "labels[" + std::to_string(i) + "] = " + std::to_string(ex.labels[i]) + " is neither -100 nor in [0, " +
                          std::to_string(V) + ")");
    } else {
      ex.labels = ex.ids;
    }
    // A mask from a tokenizer call is all ones for an unpadded example; padding here is train's job.
    if (j.contains("attention_mask")) {
      const std::vector<int64_t> m = token_list(j, "attention_mask", where, ex.ids.size());
      for (size_t i = 0; i < m.size(); ++i)
        if (m[i] != 1)
          fail(where, "attention_mask[" + std::to_string(i) + "] is " + std::to_string(m[i]) +
                          ": give only the real tokens (train pads or packs the rows itself)");
    }
    // TRL's completion-only and assistant-only losses: tokens a mask gives 0 are not scored, as TRL's collator
    // (trl/trainer/sft_trainer.py, DataCollatorForLanguageModeling) sets their labels to -100; with both masks a token
    // is scored only where both are 1. assistant_masks was named as unused and dropped, scoring the user's turns
    // (found by a probe, 2026-12-06).
    for (const char* key : {"completion_mask", "assistant_masks"})
      if (j.contains(key)) {
        const std::vector<int64_t> m = token_list(j, key, where, ex.ids.size());
        for (size_t i = 0; i < m.size(); ++i) {
          if (m[i] != 0 && m[i] != 1)
            fail(where, std::string(key) + "[" + std::to_string(i) + "] is " + std::to_string(m[i]) + ", not 0 or 1");
          if (m[i] == 0) ex.labels[i] = kIgnoreIndex;
        }
      }
    // A row's own RoPE positions, e.g. documents packed into it with positions restarting at 0: HF's model then
    // keeps each document to itself (Batch::packed). Only with --packing, whose rows carry no attention mask; a
    // padded row has one, under which HF would neither separate the documents nor is there one right answer.
    if (j.contains("position_ids")) {
      if (!packing)
        fail(where, "position_ids (a row's own RoPE positions and packed documents) needs --packing: padded rows carry "
                    "an attention mask, under which HF does not separate documents");
      ex.positions = token_list(j, "position_ids", where, ex.ids.size());
      if (ex.positions[0] != 0)
        fail(where, "position_ids[0] is " + std::to_string(ex.positions[0]) +
                        ": with --packing an example starts at position 0, so that it stays apart from the one before");
      for (size_t i = 0; i < ex.positions.size(); ++i)
        if (ex.positions[i] < 0)
          fail(where, "position_ids[" + std::to_string(i) + "] is " + std::to_string(ex.positions[i]) + ", negative");
    }
    // TRL's packed rows (SFTConfig packing, "bfd"): seq_lengths lists the lengths of the documents packed into the
    // row, and TRL's collator gives each its own positions from 0 (get_position_ids_from_packed_seq_lengths), which
    // keeps the documents apart as position_ids do above. It was named as unused and dropped, letting the documents
    // attend to each other (found by a probe, 2026-12-06).
    if (j.contains("seq_lengths")) {
      if (!packing)
        fail(where, "seq_lengths (documents packed into the row) needs --packing: padded rows carry an attention mask, "
                    "under which HF does not separate documents");
      if (j.contains("position_ids"))
        fail(where, "has both seq_lengths and position_ids: TRL derives the positions from seq_lengths; give one");
      const std::vector<int64_t> lengths = int_list(j["seq_lengths"], where, "seq_lengths");
      int64_t total = 0;
      for (size_t i = 0; i < lengths.size(); ++i) {
        if (lengths[i] < 1)
          fail(where, "seq_lengths[" + std::to_string(i) + "] is " + std::to_string(lengths[i]) + ", not a length");
        if (lengths[i] > int64_t(ex.ids.size()) - total)
          fail(where, "seq_lengths add up to more than input_ids' " + std::to_string(ex.ids.size()) + " tokens");
        total += lengths[i];
        for (int64_t p = 0; p < lengths[i]; ++p) ex.positions.push_back(p);
      }
      if (total != int64_t(ex.ids.size()))
        fail(where, "seq_lengths add up to " + std::to_string(total) + ", input_ids has " + std::to_string(ex.ids.size()) +
                        " tokens");
    }
    return ex;
  }
  // Alpaca's "input" makes a row an instruction row too: beside "text" it was dropped without a word.
  const bool text_row = j.contains("text"),
             instr_row = j.contains("instruction") || j.contains("input") || j.contains("output");
  if (!text_row && !instr_row) fail(where, "a row needs input_ids, text, or instruction and output");
  if (text_row && instr_row) fail(where, "has both 'text' and instruction fields: give one form per row");
  if (!tok) fail(where, "a text row needs a tokenizer (--tokenizer tokenizer.model)");
  ex.text = true;
  if (tok->add_bos_token) ex.ids.push_back(tok->bos_id);
  // Text holding a special token's text (a chat template rendered to a string starts with "<bos>") was spelled
  // out as ordinary pieces, where HF's tokenizer gives the token (found by a probe, 2026-12-05): refused, naming it.
  for (const char* field : {"text", "instruction", "input", "output"})
    if (auto it = j.find(field); it != j.end() && it->is_string())
      if (auto sp = tok->special_text_in(it->get<std::string>()))
        fail(where, std::string("'") + field + "' contains '" + sp->first + "', " + sp->second +
                        " (give this row as input_ids)");
  if (text_row) {
    const std::string t = str_field(j, "text", where, true);
    const std::vector<int64_t> body = tok->encode(t);
    ex.ids.insert(ex.ids.end(), body.begin(), body.end());
    ex.ids.push_back(tok->eos_id);
    ex.labels = ex.ids;
    return ex;
  }
  // Stanford Alpaca's recipe: tokenize prompt + response as one text, and mask as many leading tokens as the
  // prompt alone tokenizes to (where the two meet, SentencePiece may merge across the boundary, as it may in
  // Stanford's own masking).
  const std::string prompt = alpaca_prompt(str_field(j, "instruction", where, true), str_field(j, "input", where, false));
  const std::string output = str_field(j, "output", where, true);
  const size_t n_prompt = ex.ids.size() + tok->encode(prompt).size();
  const std::vector<int64_t> body = tok->encode(prompt + output);
  ex.ids.insert(ex.ids.end(), body.begin(), body.end());
  ex.ids.push_back(tok->eos_id);
  for (int64_t id : ex.ids)
    if (id >= c.vocab_size) fail(where, "the tokenizer gave id " + std::to_string(id) + ", outside the vocabulary");
  ex.labels = ex.ids;
  for (size_t i = 0; i < std::min(n_prompt, ex.labels.size()); ++i) ex.labels[i] = kIgnoreIndex;
  return ex;
}

}  // namespace

Dataset load_dataset(const DataOptions& o, const Config& c, const Tokenizer* tok, std::vector<std::string>* warnings) {
  Dataset d;
  d.path = o.path;
  d.seq_len = o.seq_len;
  d.packing = o.packing;
  const int64_t T = o.seq_len;
  if (T < 2) fail("--seq-len", "must be at least 2 (position t is scored against token t + 1)");
  std::error_code ec;
  // Said of the flag that named it, and of what the path is: /dev/null passed to --eval-data was "no such file
  // (--data wants ...)" (found by a probe, 2026-12-05).
  if (!fs::exists(o.path, ec)) fail(o.path, "no such file (" + o.flag + " wants a JSONL file)");
  if (!fs::is_regular_file(o.path, ec)) fail(o.path, "is not a regular file (" + o.flag + " wants a JSONL file)");
  std::ifstream in(o.path, std::ios::binary);
  if (!in) fail(o.path, "cannot open for reading");
  std::vector<Example> examples;
  std::set<std::string> unknown;
  std::string line;
  int64_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    const std::string where = o.path + ":" + std::to_string(lineno);
    Example ex = parse_line(line, where, c, tok, o.packing, &unknown);
    ex.line = lineno;
    if (int64_t(ex.ids.size()) > T) {
      ex.ids.resize(size_t(T));
      ex.labels.resize(size_t(T));
      if (!ex.positions.empty()) ex.positions.resize(size_t(T));
      ++d.truncated;
    }
    // Position t is scored against labels[t + 1]: the first label never counts.
    int64_t scored = 0;
    for (size_t i = 1; i < ex.labels.size(); ++i) scored += ex.labels[i] != kIgnoreIndex;
    if (scored == 0)
      fail(where, "no token is scored" + std::string(int64_t(ex.ids.size()) == T ? " within --seq-len " + std::to_string(T) : "") +
                      " (every label but the first is -100" + (int64_t(ex.ids.size()) == T ? ", or the prompt fills the row" : "") +
                      "): it would teach nothing");
    examples.push_back(std::move(ex));
  }
  if (in.bad()) fail(o.path, "read error");
  if (examples.empty()) fail(o.path, "holds no example");
  d.examples = int64_t(examples.size());
  d.sha256 = check::sha256_file(o.path);
  if (!unknown.empty() && warnings) {
    std::string keys;
    for (const std::string& k : unknown) keys += (keys.empty() ? "'" : ", '") + k + "'";
    warnings->push_back(o.path + ": rows carry " + keys +
                        ", which train does not use (as HF's Trainer drops columns the model does not take)");
  }
  if (d.truncated && warnings)
    warnings->push_back(o.path + ": " + std::to_string(d.truncated) + " of " + std::to_string(d.examples) +
                        " examples are longer than --seq-len " + std::to_string(T) + " and were cut to their first " +
                        std::to_string(T) + " tokens");
  const int64_t pad = c.pad_token_id ? (*c.pad_token_id < 0 ? *c.pad_token_id + c.vocab_size : *c.pad_token_id) : 0;
  auto new_row = [&]() {
    Row r;
    r.input_ids.reserve(size_t(T));
    return r;
  };
  if (!o.packing) {
    for (const Example& ex : examples) {
      Row r = new_row();
      r.input_ids = ex.ids;
      r.labels = ex.labels;
      r.attention_mask.assign(ex.ids.size(), 1);
      r.input_ids.resize(size_t(T), pad);
      r.labels.resize(size_t(T), kIgnoreIndex);
      r.attention_mask.resize(size_t(T), 0);
      d.rows.push_back(std::move(r));
    }
  } else {
    Row r = new_row();
    auto close = [&]() {
      // The tail: one more document (positions from 0) of pad tokens that nothing scored attends to.
      for (int64_t p = 0; int64_t(r.input_ids.size()) < T; ++p) {
        r.input_ids.push_back(pad);
        r.labels.push_back(kIgnoreIndex);
        r.position_ids.push_back(p);
        ++r.tail;
      }
      d.rows.push_back(std::move(r));
      r = new_row();
    };
    for (const Example& ex : examples) {
      if (int64_t(r.input_ids.size() + ex.ids.size()) > T) close();
      for (size_t i = 0; i < ex.ids.size(); ++i) {
        r.input_ids.push_back(ex.ids[i]);
        r.labels.push_back(i == 0 ? kIgnoreIndex : ex.labels[i]);
        r.position_ids.push_back(ex.positions.empty() ? int64_t(i) : ex.positions[i]);
      }
    }
    if (!r.input_ids.empty()) close();
  }
  for (const Example& ex : examples) {
    d.tokens += int64_t(ex.ids.size());
    d.text_examples += ex.text;
  }
  for (const Row& r : d.rows)
    for (size_t t = 1; t < r.labels.size(); ++t) d.scored += r.labels[t] != kIgnoreIndex;
  return d;
}

int64_t steps_per_epoch(int64_t rows, int64_t batch) { return (rows + batch - 1) / batch; }

std::vector<int64_t> epoch_order(int64_t rows, uint64_t seed, int64_t epoch, bool shuffle) {
  std::vector<int64_t> order(static_cast<size_t>(rows));
  for (int64_t i = 0; i < rows; ++i) order[size_t(i)] = i;
  if (!shuffle) return order;
  const uint64_t key = splitmix64(stream_key(seed, "train/shuffle") ^ splitmix64(uint64_t(epoch)));
  for (int64_t i = rows - 1; i > 0; --i) {
    // Modulo bias is below 2^-40 for any dataset that fits in memory: irrelevant, and the same everywhere.
    const int64_t j = int64_t(splitmix64(key + uint64_t(i) * 0x9e3779b97f4a7c15ull) % uint64_t(i + 1));
    std::swap(order[size_t(i)], order[size_t(j)]);
  }
  return order;
}

namespace {

Batch make_batch(const Dataset& d, const std::vector<int64_t>& rows) {
  Batch b;
  b.B = int64_t(rows.size());
  b.T = d.seq_len;
  for (int64_t i : rows) {
    const Row& r = d.rows[size_t(i)];
    b.input_ids.insert(b.input_ids.end(), r.input_ids.begin(), r.input_ids.end());
    b.labels.insert(b.labels.end(), r.labels.begin(), r.labels.end());
    b.position_ids.insert(b.position_ids.end(), r.position_ids.begin(), r.position_ids.end());
    b.attention_mask.insert(b.attention_mask.end(), r.attention_mask.begin(), r.attention_mask.end());
    b.unmasked_padding += r.tail;
  }
  return b;
}

}  // namespace

Batch step_batch(const Dataset& d, int64_t batch, uint64_t seed, bool shuffle, int64_t step) {
  const int64_t R = int64_t(d.rows.size()), per_epoch = steps_per_epoch(R, batch);
  const int64_t epoch = (step - 1) / per_epoch, k = (step - 1) % per_epoch;
  const std::vector<int64_t> order = epoch_order(R, seed, epoch, shuffle);
  const int64_t first = k * batch, last = std::min(R, first + batch);
  return make_batch(d, std::vector<int64_t>(order.begin() + first, order.begin() + last));
}

std::vector<Batch> all_batches(const Dataset& d, int64_t batch) {
  std::vector<Batch> out;
  const int64_t R = int64_t(d.rows.size());
  for (int64_t first = 0; first < R; first += batch) {
    std::vector<int64_t> rows;
    for (int64_t i = first; i < std::min(R, first + batch); ++i) rows.push_back(i);
    out.push_back(make_batch(d, rows));
  }
  return out;
}

}  // namespace gemma::train
