// What a synthetic run of a preset is made of. For the released presets and gemma2-odd it is the gate's setting:
// inputs chosen so that every path a Gemma 2 trainer has runs in one verify call (a padded head, micro-batches of
// unequal size, fp32-valued adapters, sequences longer than the window, packed documents or padding, positions far
// from 0, trained-like activations, a hidden size whose sqrt is not a bf16 number), and verify prints which ran.
#pragma once
#include <string>
#include <vector>

#include "check/inputs.hpp"

namespace gemma::check {

// Presets whose synthetic run is a gate setting (the three released models and their companions).
bool gate_preset(const std::string& name);
// The companions a released preset's gate runs beside it: gemma2-odd (what the released widths cannot reach: an odd
// vocabulary, padding masks, head_dim 18), gemma2-hd128 and gemma2-hd256 (the released head sizes' GPU attention,
// small widths).
bool gate_companion(const std::string& name);

// Turns a plain synthetic run of a gate preset (synthetic weights, bf16 adapters, a uniform batch) into the gate's
// setting, and lists in `in.paths` what it exercises. Deterministic in (preset, shape, seed).
void make_gate_setting(Inputs& in, const std::string& preset, uint64_t seed);

// Weights shaped like a trained Gemma 2's (post-norm scales near 4, logits shifted below 0, cooler attention, a
// sparse MLP whose gate inputs sit near gate_mean), so that bugs inside the layers reach the loss and a padded
// head's zero logits would matter. Returns one line saying what was done.
std::string make_trained_like(Checkpoint& ck, double shift, double q_scale, double gate_mean, double gate_spread);

}  // namespace gemma::check
