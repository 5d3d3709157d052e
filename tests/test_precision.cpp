// The rounding every precision policy is built on, pinned to known facts: the bf16 embedding normalizers of the
// released models, round-to-nearest-even on ties, NaN and infinity kept, and the policies' cast points.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "reference/gemma2.hpp"

using namespace gemma;
using namespace gemma::ref;

namespace {
double bf16(double x) { return round_to(DType::bf16, x); }
double f16(double x) { return round_to(DType::f16, x); }
}  // namespace

TEST(Bf16, NormalizersOfTheReleasedModels) {
  // sqrt(hidden_size) rounded to bf16, as HF computes torch.tensor(hidden**0.5, dtype=bfloat16).
  EXPECT_EQ(bf16(std::sqrt(2304.0)), 48.0);   // gemma2-2b: exact
  EXPECT_EQ(bf16(std::sqrt(3584.0)), 59.75);  // gemma2-9b: 59.866 -> 59.75
  EXPECT_EQ(bf16(std::sqrt(4608.0)), 68.0);   // gemma2-27b: 67.882 -> 68.0
  EXPECT_EQ(bf16(std::sqrt(3072.0)), 55.5);   // Gemma 1 7b: 55.426 -> 55.5
  // And through the policy the reference runs with.
  const Policy p = policy_hf_bf16();
  EXPECT_EQ(cast(p, Cast::normalizer, std::sqrt(3584.0)), 59.75);
  EXPECT_EQ(cast(policy_f64(), Cast::normalizer, std::sqrt(3584.0)), std::sqrt(3584.0));
}

TEST(Bf16, TiesRoundToEven) {
  // bf16 keeps 8 significant bits: between 1 and 2 the spacing is 2^-7.
  EXPECT_EQ(bf16(1.0 + 0x1p-8), 1.0);                   // halfway, 1.0 has the even mantissa
  EXPECT_EQ(bf16(1.0 + 3 * 0x1p-8), 1.0 + 0x1p-6);      // halfway, rounds up to the even one
  EXPECT_EQ(bf16(-(1.0 + 0x1p-8)), -1.0);
  EXPECT_EQ(bf16(1.0 + 0x1p-8 + 0x1p-20), 1.0 + 0x1p-7);  // just above halfway rounds up
  EXPECT_EQ(bf16(1.0 + 0x1p-8 - 0x1p-20), 1.0);           // just below rounds down
  // A value that is a tie only in float32 after rounding from float64 (docs/model.md: bf16 rounds the fp32 value).
  EXPECT_EQ(bf16(1.0 + 0x1p-8 + 0x1p-40), 1.0);
}

TEST(Bf16, NanStaysNanAndInfinityStaysInfinity) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(std::isnan(bf16(nan)));
  // A float32 NaN with only low mantissa bits set: adding the rounding bias would carry it into infinity.
  EXPECT_TRUE(std::isnan(double(bf16_to_float(float_to_bf16(bits_float(0x7f800001u))))));
  EXPECT_TRUE(std::isnan(double(bf16_to_float(float_to_bf16(bits_float(0xff800001u))))));
  EXPECT_EQ(bf16(std::numeric_limits<double>::infinity()), std::numeric_limits<double>::infinity());
  EXPECT_EQ(bf16(-std::numeric_limits<double>::infinity()), -std::numeric_limits<double>::infinity());
  // The largest float32 lies beyond bf16's largest value plus half a spacing: it rounds to infinity.
  EXPECT_EQ(bf16(double(std::numeric_limits<float>::max())), std::numeric_limits<double>::infinity());
  EXPECT_EQ(bf16(0x1.fep127), 0x1.fep127);  // bf16's largest finite value is kept
}

TEST(F16, TiesSubnormalsAndOverflow) {
  EXPECT_EQ(f16(1.0 + 0x1p-11), 1.0);             // spacing 2^-10 between 1 and 2; tie to even
  EXPECT_EQ(f16(1.0 + 3 * 0x1p-11), 1.0 + 0x1p-9);
  EXPECT_EQ(f16(0x1p-24), 0x1p-24);               // smallest subnormal
  EXPECT_EQ(f16(0x1p-25), 0.0);                   // tie with zero rounds to even (zero)
  EXPECT_EQ(f16(3 * 0x1p-25), 0x1p-23);           // tie between 1 and 2 units rounds to 2
  EXPECT_EQ(f16(65504.0), 65504.0);               // largest finite half
  EXPECT_EQ(f16(65520.0), std::numeric_limits<double>::infinity());  // halfway to 65536: to even, infinity
  EXPECT_EQ(f16(65519.0), 65504.0);
  EXPECT_TRUE(std::isnan(f16(std::nan(""))));
}

TEST(Policies, HfBf16RoundsWhereHfStoresBf16AndKeepsFp32Islands) {
  const Policy p = policy_hf_bf16();
  for (Cast c : {Cast::normalizer, Cast::norm_out, Cast::matmul_out, Cast::rope_cossin, Cast::attn_probs, Cast::residual,
                 Cast::logits, Cast::logits_capped, Cast::softcap_steps})
    EXPECT_EQ(p[c], DType::bf16) << cast_name(c);
  // The fast trainer computes c tanh(x / c) in one go: no rounding inside the cap.
  EXPECT_EQ(policy_fast()[Cast::softcap_steps], DType::f64);
  // RMSNorm computes in fp32 and casts once; RoPE angles and the loss are fp32; PEFT keeps adapters in fp32.
  for (Cast c : {Cast::norm_normed, Cast::norm_scale, Cast::rope_angle, Cast::loss, Cast::adapters, Cast::lora_out})
    EXPECT_EQ(p[c], DType::f32) << cast_name(c);
  EXPECT_TRUE(policy_f64().exact());
  EXPECT_FALSE(policy_fast().exact());
  EXPECT_EQ(policy_named("fast").name, "fast");
  EXPECT_THROW(policy_named("bogus"), InputError);
}
