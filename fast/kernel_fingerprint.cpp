// kernel_fingerprint: a 64-bit FNV-1a hash of every output of the attention kernels (att, o32, dq, dk, dv, and att,
// o32 of the recomputed forward) and of the LoRA projection groups (y, dx, dA, dB) on fixed inputs, one line per
// case. Not a test: two builds whose lines are equal computed the same bits, which is how a rewrite of a kernel that
// keeps its products and their order (a new copy mechanism, a new schedule) is shown to change nothing; a rewrite
// that reorders a sum shows up as different lines and must be judged by the GPU tests' tolerances instead.
//
//   kernel_fingerprint [--mma]     (--mma: attention.cuh's mma.sync kernels even where the Hopper ones apply)
//
// The attention cases cover both head sizes, global and sliding layers, the cap on and off, packed documents,
// padding, T not a multiple of the tiles, one tile, and inputs whose scores reach the cap (q, k up to 8). The LoRA
// cases take each of lora_out_add's kernels on the H200 (the Hopper one at K padded to 64, 128 and 192, the
// mma.sync one, none: the product into fp32 and lora_add_kernel), blocks that walk several row tiles, widths that
// are no multiple of the 128-column tile or of 8, and 9b's q|k|v widths. Inputs are drawn from xorshift64 with a
// fixed seed (bf16 values where the kernels take bf16, full fp32 adapter masters), so every build sees the same
// ones. Exit 0; 2 without a CUDA device.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "fast/fast.hpp"
#include "fast/kernels.hpp"

namespace {

uint64_t state = 88172645463325252ull;
// A value in [-a, a]: a bf16 value (the float's low 16 bits cleared) unless full.
float draw(float a, bool full = false) {
  state ^= state << 13;
  state ^= state >> 7;
  state ^= state << 17;
  float x = (float((state >> 11) * (1.0 / 9007199254740992.0)) * 2 - 1) * a;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (!full) u &= 0xFFFF0000u;
  std::memcpy(&x, &u, 4);
  return x;
}

constexpr uint64_t kFnvOffset = 1469598103934665603ull;  // FNV-1a's 64-bit offset basis
// h continues an earlier hash, so that several vectors hash as their concatenation.
uint64_t fnv1a(const std::vector<float>& v, uint64_t h = kFnvOffset) {
  const auto* p = reinterpret_cast<const unsigned char*>(v.data());
  for (size_t i = 0; i < v.size() * sizeof(float); ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

struct Case {
  int B, T, H, KV, hd;
  bool cap;
  int window;
  bool documents, padding;
  float qk;  // q and k drawn from [-qk, qk]
};

struct LoraCase {
  int64_t N, in, r;
  std::vector<int64_t> outs;
  std::vector<bool> adapter;
};

}  // namespace

int main(int argc, char** argv) {
  using namespace gemma::fast;
  bool mma = false;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--mma") {
      mma = true;
    } else {
      std::fprintf(stderr, "usage: kernel_fingerprint [--mma]\n");
      return 2;
    }
  }
  std::string why;
  if (!device_available(&why)) {
    std::fprintf(stderr, "kernel_fingerprint: %s\n", why.c_str());
    return 2;
  }
  const Case cases[] = {{2, 333, 4, 2, 256, true, 0, false, false, 1},  {1, 200, 2, 1, 128, true, 64, false, false, 1},
                        {2, 257, 2, 1, 256, false, 100, true, true, 1}, {1, 1024, 2, 1, 256, true, 0, false, false, 8},
                        {1, 130, 4, 2, 128, false, 0, false, true, 4},  {1, 64, 2, 1, 256, true, 0, false, false, 1}};
  for (const Case& c : cases) {
    kernels::AttnShape s;
    s.B = c.B;
    s.T = c.T;
    s.H = c.H;
    s.KV = c.KV;
    s.hd = c.hd;
    s.scale = 1.0 / 16;
    s.cap_on = c.cap;
    s.cap = 50;
    s.window = c.window;
    const int64_t N = int64_t(c.B) * c.T;
    if (c.documents) {
      s.doc.resize(size_t(N));
      for (int64_t n = 0; n < N; ++n) s.doc[size_t(n)] = int32_t((n % c.T) / 90);
    }
    if (c.padding) {
      s.key_ok.assign(size_t(N), 1);
      for (int64_t n = 0; n < N; ++n)
        if (n % c.T < 5) s.key_ok[size_t(n)] = 0;  // left padding
    }
    std::vector<float> q(size_t(N * c.H * c.hd)), k(size_t(N * c.KV * c.hd)), v(k.size()), dout(q.size());
    for (float& x : q) x = draw(c.qk);
    for (float& x : k) x = draw(c.qk);
    for (float& x : v) x = draw(1);
    for (float& x : dout) x = draw(0.01f);
    const kernels::Attention a = kernels::attention(s, q, k, v, dout, mma);
    std::printf("B %d T %d H %d KV %d hd %d cap %d window %d documents %d padding %d qk %g: att %016llx o32 %016llx "
                "dq %016llx dk %016llx dv %016llx recomputed att %016llx o32 %016llx\n",
                c.B, c.T, c.H, c.KV, c.hd, int(c.cap), c.window, int(c.documents), int(c.padding), double(c.qk),
                static_cast<unsigned long long>(fnv1a(a.out)), static_cast<unsigned long long>(fnv1a(a.o32)),
                static_cast<unsigned long long>(fnv1a(a.dq)), static_cast<unsigned long long>(fnv1a(a.dk)),
                static_cast<unsigned long long>(fnv1a(a.dv)), static_cast<unsigned long long>(fnv1a(a.out_recomputed)),
                static_cast<unsigned long long>(fnv1a(a.o32_recomputed)));
  }
  const LoraCase lora_cases[] = {{4133, 64, 32, {1100, 52}, {true, true}},    {4000, 64, 16, {1101, 52}, {true, true}},
                                 {300, 256, 8, {200, 200}, {true, true}},      {4133, 64, 64, {1100, 52}, {true, true}},
                                 {21, 64, 5, {160, 160}, {false, true}},
                                 {2048, 3584, 32, {4096, 2048, 2048}, {true, true, true}}};
  for (const LoraCase& c : lora_cases) {
    std::vector<kernels::LoraProj> projs;
    int64_t out_total = 0;
    std::string outs;
    for (size_t i = 0; i < c.outs.size(); ++i) {
      kernels::LoraProj p;
      p.out = c.outs[i];
      p.W.resize(size_t(p.out * c.in));
      for (float& w : p.W) w = draw(1.0f / float(std::sqrt(double(c.in))));
      if (c.adapter[i]) {
        p.A.resize(size_t(c.r * c.in));
        p.B.resize(size_t(p.out * c.r));
        for (float& a : p.A) a = draw(1.0f / float(std::sqrt(double(c.in))), true);
        for (float& b : p.B) b = draw(0.25f / float(std::sqrt(double(c.r))), true);
      }
      out_total += p.out;
      outs += (i ? "|" : "") + std::to_string(p.out) + (c.adapter[i] ? "" : " (no adapter)");
      projs.push_back(std::move(p));
    }
    std::vector<float> x(size_t(c.N * c.in)), dy(size_t(c.N * out_total));
    for (float& v : x) v = draw(1);
    for (float& v : dy) v = draw(0.01f);
    const kernels::LoraGroup g = kernels::lora_group(c.N, c.in, c.r, 2.0, projs, x, dy);
    uint64_t hA = kFnvOffset, hB = hA;
    for (const std::vector<float>& a : g.dA) hA = fnv1a(a, hA);
    for (const std::vector<float>& b : g.dB) hB = fnv1a(b, hB);
    std::printf("lora N %lld in %lld r %lld outs %s: y %016llx dx %016llx dA %016llx dB %016llx\n", (long long)c.N,
                (long long)c.in, (long long)c.r, outs.c_str(), static_cast<unsigned long long>(fnv1a(g.y)),
                static_cast<unsigned long long>(fnv1a(g.dx)), static_cast<unsigned long long>(hA),
                static_cast<unsigned long long>(hB));
  }
  return 0;
}
