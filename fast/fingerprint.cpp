// attn_fingerprint: a 64-bit FNV-1a hash of every output of the attention kernels (att, o32, dq, dk, dv, and att,
// o32 of the recomputed forward) on fixed inputs, one line per case. Not a test: two builds whose lines are equal
// computed the same bits, which is how a rewrite of a kernel that keeps its products and their order (a new copy
// mechanism, a new schedule) is shown to change nothing; a rewrite that reorders a sum shows up as different lines
// and must be judged by the GPU tests' tolerances instead.
//
//   attn_fingerprint [--mma]     (--mma: attention.cuh's mma.sync kernels even where the Hopper ones apply)
//
// The cases cover both head sizes, global and sliding layers, the cap on and off, packed documents, padding, T
// not a multiple of the tiles, one tile, and inputs whose scores reach the cap (q, k up to 8). Inputs are bf16
// values from xorshift64 with a fixed seed, so every build sees the same ones. Exit 0; 2 without a CUDA device.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "fast/fast.hpp"
#include "fast/kernels.hpp"

namespace {

uint64_t state = 88172645463325252ull;
// A bf16 value in [-a, a] (the float's low 16 bits cleared).
float draw(float a) {
  state ^= state << 13;
  state ^= state >> 7;
  state ^= state << 17;
  float x = (float((state >> 11) * (1.0 / 9007199254740992.0)) * 2 - 1) * a;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u &= 0xFFFF0000u;
  std::memcpy(&x, &u, 4);
  return x;
}

uint64_t fnv1a(const std::vector<float>& v) {
  uint64_t h = 1469598103934665603ull;
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

}  // namespace

int main(int argc, char** argv) {
  using namespace gemma::fast;
  bool mma = false;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--mma") {
      mma = true;
    } else {
      std::fprintf(stderr, "usage: attn_fingerprint [--mma]\n");
      return 2;
    }
  }
  std::string why;
  if (!device_available(&why)) {
    std::fprintf(stderr, "attn_fingerprint: %s\n", why.c_str());
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
  return 0;
}
