// Training data: a JSONL file read into fixed-length rows, and the rows each optimizer step trains on.
//
// A line is one example, in one of three forms (docs/train.md):
//   {"input_ids": [2, 651, ...], "labels": [-100, 651, ...]}   tokenized; labels optional (default: input_ids);
//       also attention_mask (all ones), completion_mask (TRL's: 0 = not scored) and, with --packing,
//       position_ids (the row's own positions: documents restart at 0)
//   {"instruction": "...", "input": "...", "output": "..."}   Alpaca; needs a tokenizer; prompt tokens get -100
//   {"text": "..."}                                           plain text; needs a tokenizer; every token scored
// Labels follow HF's causal-LM convention, unshifted: position t is scored against labels[t + 1] (Batch::target).
// Every problem is an InputError "FILE:LINE: what is wrong" (tools exit 2).
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "model/checkpoint.hpp"

namespace gemma::train {

// Which SentencePiece model tokenizes text rows, and which BOS / EOS ids frame them. An id given here wins over
// tokenizer_config.json's bos_token / eos_token, which win over the SentencePiece model's own bos_id / eos_id
// (Gemma's: BOS 2, EOS 1).
struct TokenizerOptions {
  std::optional<std::string> model_path;   // --tokenizer tokenizer.model
  std::optional<std::string> config_path;  // --tokenizer-config tokenizer_config.json (HF's)
  std::optional<int64_t> bos_id, eos_id;   // --bos-id, --eos-id
};

// A SentencePiece tokenizer as HF's GemmaTokenizer uses it: BOS prepended when add_bos_token (default true),
// never an EOS of its own (add_eos_token, default false); the instruction template appends EOS to the response.
class Tokenizer {
 public:
  // Loads options.model_path; refuses (InputError naming the file) a model that does not load, a tokenizer whose
  // pieces do not fit the model's vocabulary, or BOS / EOS ids outside it.
  static std::unique_ptr<Tokenizer> load(const TokenizerOptions& options, int64_t vocab_size);
  ~Tokenizer();
  std::vector<int64_t> encode(const std::string& text) const;  // no BOS, no EOS
  // The first special token (a control or unknown piece: <bos>, <eos>, <pad>, <unk>, ...) or added token that
  // SentencePiece does not read as its one id (added_token_is_read) whose text appears in `text`, or nothing. HF's
  // tokenizer reads such text as the token, SentencePiece otherwise, so a row holding it would train on other ids
  // than HF's. Returns the text and what it is, with how the two tokenizers read it.
  std::optional<std::pair<std::string, std::string>> special_text_in(const std::string& text) const;
  // Whether SentencePiece reads `content` (an added token of tokenizer_config.json, with its declared id if known)
  // as that one token, as HF's tokenizer does: a piece of the model with that id, neither control nor unknown, encoded
  // alone as itself and once inside "a...a". A user-defined piece passes; text the model lacks does not.
  bool added_token_is_read(const std::string& content, std::optional<int64_t> id) const;
  int64_t bos_id = 2, eos_id = 1;
  bool add_bos_token = true;
  int64_t pieces = 0;  // the SentencePiece vocabulary size
  // tokenizer_config.json's keys that were not read and are not known to leave the ids alone: one line, to print.
  std::vector<std::string> warnings;

 private:
  Tokenizer();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Stanford Alpaca's prompt for {"instruction", "input"}; the response follows it directly.
std::string alpaca_prompt(const std::string& instruction, const std::string& input);

struct DataOptions {
  std::string path;       // --data FILE.jsonl
  int64_t seq_len = 0;    // T: every row is T tokens (--seq-len)
  bool packing = false;   // --packing: examples concatenated into rows, position_ids restarting per example
  std::string flag = "--data";  // the option that named `path`, for messages
};

// One fixed-length row of the dataset (T tokens).
struct Row {
  std::vector<int64_t> input_ids, labels;  // [T]
  std::vector<int64_t> position_ids;       // [T] when packing (restarting at 0 per example), else empty
  std::vector<uint8_t> attention_mask;     // [T] when padding (0 = padding), else empty
  int64_t tail = 0;                        // packing: the pad tokens that fill the row after its last example
};

struct Dataset {
  std::string path;
  int64_t seq_len = 0;
  bool packing = false;
  std::vector<Row> rows;
  int64_t examples = 0;        // JSONL examples read (blank lines are skipped)
  int64_t text_examples = 0;   // of them, text or instruction rows (tokenized here)
  int64_t truncated = 0;       // examples longer than seq_len, cut to their first seq_len tokens
  int64_t tokens = 0;          // real (non-padding) tokens in all rows
  int64_t scored = 0;          // scored targets in all rows
  std::string sha256;          // of the file's bytes: a resumed run must see the same data
};

// Reads and checks every line (token ids and labels in [0, vocab) or -100; at least one scored target after
// truncation; text rows only with a tokenizer), then builds the rows:
//  - padding (default): one example per row, right-padded with pad_token_id (0 when null) to T, attention_mask 0
//    on padding; labels -100 there.
//  - packing: examples in file order fill rows greedily; an example that does not fit the rest of a row starts the
//    next one. position_ids restart at 0 at every example, so HF (and every backend here) keeps each example to
//    itself (Batch::packed); each example's first label is -100 (the previous example's last token is not
//    trained to predict it, as HF's DataCollatorWithFlattening does), and a row's unused tail is one more
//    document of pad tokens with labels -100, which nothing scored can see.
// `tok` may be null when every row is tokenized. `warnings` gets one line per kind of thing worth a word.
Dataset load_dataset(const DataOptions& o, const Config& c, const Tokenizer* tok, std::vector<std::string>* warnings);

// Optimizer steps in one pass over `rows` rows taken `batch` at a time; the last step of an epoch may have fewer
// rows (HF's Trainer with dataloader_drop_last false).
int64_t steps_per_epoch(int64_t rows, int64_t batch);
// The order of the rows in epoch e (0-based): a Fisher-Yates shuffle driven by splitmix64 of (seed, e, i), the
// same on every machine; identity when !shuffle.
std::vector<int64_t> epoch_order(int64_t rows, uint64_t seed, int64_t epoch, bool shuffle);
// The rows of optimizer step `step` (1-based) as one Batch: epoch (step - 1) / steps_per_epoch, rows of that
// epoch's order. Depends only on (dataset, batch, seed, step): a resumed run gets the same rows.
Batch step_batch(const Dataset& d, int64_t batch, uint64_t seed, bool shuffle, int64_t step);
// Every row in file order, as batches of at most `batch` rows (evaluation).
std::vector<Batch> all_batches(const Dataset& d, int64_t batch);

}  // namespace gemma::train
