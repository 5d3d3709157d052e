// Seeded synthetic weights and batches, bit-identical on every machine: values come from a counter-based
// hash (splitmix64) of (seed, tensor name, index), never from <random>, whose distributions differ between
// standard libraries. Weights are bf16 values, so a bf16 backend and the float64 reference see the very
// same numbers.
#pragma once
#include <cstdint>
#include <string>

#include "checkpoint.hpp"

namespace gemma {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
uint64_t stream_key(uint64_t seed, const std::string& name);
// Element i of the stream: uniform in [-1, 1), a multiple of 2^-52.
inline double stream_uniform(uint64_t key, uint64_t i) {
  return double(splitmix64(key + i * 0x9e3779b97f4a7c15ull) >> 11) * 0x1.0p-52 - 1.0;
}

// Standard deviation the synthetic generator gives a weight, chosen so that the model exercises what a
// test must see: attention scores with a spread of a quarter of the attention cap and the largest final
// logits near the final cap (so both caps bend the values noticeably), unit-scale activations elsewhere,
// and norm weights far from zero (so a missing (1 + w) shows).
double synthetic_std(const Config& c, const std::string& name);

// Every base weight of `c`, in bf16.
TensorMap synthetic_weights(const Config& c, uint64_t seed);
// LoRA A and B for `a` (B is nonzero: PEFT's zero init would hide every bug in the A path).
TensorMap synthetic_adapters(const Config& c, const AdapterConfig& a, uint64_t seed);
// Uniform token ids; labels equal the ids (HF shifts them inside the loss), with about `ignore_fraction`
// of them set to -100. At least one target stays scored.
Batch synthetic_batch(const Config& c, int64_t B, int64_t T, uint64_t seed, double ignore_fraction = 0.125);

}  // namespace gemma
