// What a tool runs on: a preset with synthetic weights, a case file, or an HF checkpoint directory, plus a
// batch. Shared by verify, train and make-goldens so that every tool accepts the same inputs the same way.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "model/casefile.hpp"

namespace gemma::check {

struct InputSpec {
  std::optional<std::string> model;    // --model PRESET (synthetic weights)
  std::optional<std::string> case_path;  // --case FILE
  std::optional<std::string> config, weights, adapter;  // --config/--weights/--adapter
  std::optional<int64_t> layers, seq, batch;
  uint64_t seed = 0;
  // --lora-r: rank of synthetic adapters (seeded by `seed`) on a preset (default 8) or on a checkpoint without
  // --adapter (default none); 0 trains every weight. With --adapter or --case it is refused: they fix the adapter.
  std::optional<int64_t> lora_r;
  // --quantize nf4: the base projections quantized as QLoRA quantizes them (model/nf4.hpp) and replaced by their
  // dequantized values, on a preset or an unquantized checkpoint. Refused with --case (its expected values are of
  // the weights it holds).
  std::optional<std::string> quantize;
  // Whether the float64 reference will run this batch (everything but train --backend fast): its attention caches
  // then bound the sequence length by this machine's memory (refuse_beyond_memory in inputs.cpp).
  bool reference_runs = true;
};

// A preset's synthetic adapters when --lora-r is not given.
inline constexpr int64_t kDefaultPresetLoraR = 8;

struct Inputs {
  Checkpoint model;
  Batch batch;
  std::map<std::string, Expected> expected;       // from a case file
  std::map<std::string, std::string> provenance;  // attributes on /expected
  std::string description;                        // one line for the report header
  std::string source;                             // "preset:gemma2-27b", a case path, a checkpoint path
  int64_t micro_rows = 0;  // sequences per micro-batch of the step (0: the whole batch at once)
  std::vector<std::string> paths;  // what a gate setting exercises (check/setting.hpp), printed by verify
  // How this kind of input gets LoRA adapters, for messages that suggest them: "--lora-r R" where that flag
  // works, a case file with adapters otherwise.
  std::string adapters_hint;
};

// Default depth of a synthetic run of a released preset: the true widths with few layers fit this
// project's 24 GB CPU machine; both layer kinds (sliding, global) are present with two.
inline constexpr int64_t kDefaultPresetLayers = 2;

// The shape of a synthetic run of a preset when no flag says otherwise: released presets 2 layers of 2 x 48 (the
// gate setting's two micro-batches, and sequences three times its window), gemma2-odd all 3 layers of 3 x 40,
// the test presets all layers of 2 x 20.
struct PresetShape {
  int64_t layers, batch, seq;
};
PresetShape preset_shape(const std::string& name);

// The sequence length of the gate's gemma2-odd companion when the trainer runs it (verify --backend fast or both,
// gate-mutants): 150 rather than the preset's 40, so that queries past 64 see more than one of the mma.sync
// kernels' 64-key tiles (fast/attention.cuh, gemma2-odd's head_dim 18) and the forward's rescaling of its running
// output is exercised. At 40 every row sees one tile, and a build without that rescale passed the gate at 0.43 of
// its tolerance (H100, 2026-12-05). `--backend reference` keeps 40, the shape of gemma2-odd's goldens.
inline constexpr int64_t kOddTrainerSeq = 150;

// One setting a released preset's gate runs beside the preset itself: what the released widths cannot reach.
struct GateCompanion {
  std::string tag;  // its prefix in reports and its key in --json: "odd ", "odd nf4 ", "hd128 ", "hd256 "
  InputSpec spec;
  bool first_combination_only = false;  // the NF4 run: one more small run, in the first softcap combination
};

// The companions of a gate of `main`, in the order verify runs and reports them; none unless `main` is a released
// preset (check/setting.hpp gate_preset, not gate_companion). Each takes main's seed, --lora-r and --quantize.
//  - gemma2-odd: an odd vocabulary, a padding mask, sqrt(hidden) not a bf16 number, head_dim 18; at kOddTrainerSeq
//    tokens when `trainer` (verify --backend fast|both, gate-mutants), the preset's 40 otherwise.
//  - with `trainer` and main not quantized: gemma2-odd again with its base in NF4 (the trainer's QLoRA path, code a
//    bf16 run never reaches), first combination only.
//  - with `trainer`: gemma2-hd128 and gemma2-hd256 in their own shape (preset_shape), the attention kernels of the
//    released head sizes (fast/attention_sm90.cuh) at widths where the tolerances are tight. The reference's code
//    path for them is gemma2-odd's, so `--backend reference` does not run them.
std::vector<GateCompanion> gate_companions(const InputSpec& main, bool trainer);

Inputs load_inputs(const InputSpec& spec);

// The files `spec` reads, each (flag, path): --case, --config, --weights, --adapter where given. The tools refuse an
// output naming one of them (check_output_paths' inputs).
std::vector<std::pair<std::string, std::string>> input_paths(const InputSpec& spec);

// Throws InputError naming --adapter when it is given without --config/--weights: a PEFT adapter belongs to a
// checkpoint (a case file carries its own adapters; a preset's synthetic base takes --lora-r). load_inputs and
// diagnose's synthetic setting both call it.
void refuse_adapter_outside_checkpoint(const InputSpec& spec);

// Synthetic LoRA adapters in PEFT's layout on all seven projections, alpha = 2r. `r` is --lora-r's: above
// kMaxLoraRank it is refused naming that flag.
AdapterConfig synthetic_adapter_config(int64_t r);

}  // namespace gemma::check
