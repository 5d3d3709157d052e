// fast_bench: training throughput and peak GPU memory of the fast trainer on a released Gemma 2 shape, with
// synthetic bf16 weights generated on the device. Not a test: it reports, docs/benchmarks.md records.
//
//   fast_bench --model gemma2-9b --batch 2 --seq 1024 --rank 32 --warmup 2 --steps 5 [--gpus N] [--quantize nf4]
//   fast_bench --model gemma2-9b --batch 1 --quantize nf4 --offload --longest --memory-limit 80 --warmup 0 --steps 1
//   fast_bench --model gemma2-9b --batch 2 --seq 4096 --attention --steps 20
//
// --attention: the attention forward and backward alone at the model's shapes (a global and a sliding layer, the
// cap on and off, the Hopper kernels and the mma.sync ones), each the median of --steps runs, as TFLOP/s beside
// a cuBLAS bf16 product measured in the same run. FLOPs are counted as is usual for causal attention: 4 hd per
// visible (query, key) pair and head forward (Q K^T and P V), 2.5 times that backward (five products). The
// kernels execute more than that (the backward's dS products run over its three-way split, and every kernel runs
// the products of the diagonal tiles in full), so the rate counted is below the rate the tensor cores run at.
//
// --quantize nf4: the base projections in NF4 on the device as QLoRA keeps them (blocksize 64, double
// quantization), dequantized a layer at a time. --longest: the longest sequence (a multiple of 1024) whose step
// fits under --memory-limit GiB of the trainer's allocations (or the device), found by allocating every buffer
// of a step of that length (all a step allocates); then the steps run at that length and their measured peak is
// reported, so the claim rests on a step that ran. With --steps 0 only the search runs (a step at 100K+ tokens
// takes minutes): its figure is then a fit by allocation, and says so.
//
// With --gpus N > 1 the trainer is data parallel (fast/data_parallel.hpp): --batch sequences on each GPU, a global
// batch of N x --batch, tokens/s counted over all GPUs; each step's all-reduce time is reported beside it.
//
// Tokens/s is batch * seq over the median of the timed optimizer steps (forward, backward, AdamW; each step
// ends with a device synchronize), after the warm-up steps. Peak memory is the trainer's own peak of device
// allocations (what torch.cuda.max_memory_allocated reports for PyTorch), and the device's used memory.
#include <cuda_runtime_api.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "fast/data_parallel.hpp"
#include "fast/device.hpp"
#include "fast/fast.hpp"
#include "fast/kernels.hpp"
#include "model/synthetic.hpp"
#include "model/optimizer.hpp"

using namespace gemma;

namespace {

// Parameters of the base model (the tied embedding counted once).
double base_params(const Config& c) {
  double n = double(c.vocab_size) * double(c.hidden_size) + double(c.hidden_size);
  for (Proj p : kAllProj) n += double(proj_in(c, p)) * double(proj_out(c, p)) * double(c.num_hidden_layers);
  n += 4.0 * double(c.hidden_size) * double(c.num_hidden_layers);
  return n;
}

// Visible (query, key) pairs of one sequence of length T: causal, and within W keys on a sliding layer (W = 0:
// global).
double visible_pairs(int64_t T, int64_t W) {
  double n = 0;
  for (int64_t i = 0; i < T; ++i) n += double(W > 0 ? std::min<int64_t>(i + 1, W) : i + 1);
  return n;
}

void attention_bench(const Config& c, const std::string& model, int64_t B, int64_t T, int64_t iters,
                     const std::string& json) {
  cudaDeviceProp prop{};
  GEMMA_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s attention, batch %lld x %lld, %lld heads, %lld kv heads, head_dim %lld; %s\n", model.c_str(),
              (long long)B, (long long)T, (long long)c.num_attention_heads, (long long)c.num_key_value_heads,
              (long long)c.head_dim, prop.name);
  // The cuBLAS product runs last. Measured first, it slowed the configuration right after it (global, cap on) by
  // about 4% (backward 253.3 and 253.8 TFLOP/s against 263.7 and 264.5 with the product last, the same kernels in
  // one call; the sliding layer, the same work at T = 4096, gave 260-262 either way). The SM clock sampled every
  // 20 ms did not show why (docs/benchmarks.md, 2026-12-04).
  std::vector<std::string> json_lines;
  for (const bool sliding : {false, true}) {
    if (sliding && !c.sliding_window) continue;
    for (const bool cap : {true, false}) {
      for (const bool mma_only : {false, true}) {
        fast::kernels::AttnShape s;
        s.B = B;
        s.T = T;
        s.H = c.num_attention_heads;
        s.KV = c.num_key_value_heads;
        s.hd = c.head_dim;
        s.scale = 1.0 / std::sqrt(c.query_pre_attn_scalar);
        s.cap_on = cap;
        s.cap = c.attn_logit_softcapping.value_or(50.0);
        s.window = sliding ? *c.sliding_window : 0;
        const fast::kernels::AttnTiming t = fast::kernels::time_attention(s, int(iters), mma_only);
        const double fwd = 4.0 * double(s.hd) * double(s.H) * double(B) * visible_pairs(T, s.window);
        const double f_tf = fwd / (t.forward_ms * 1e-3) / 1e12, b_tf = 2.5 * fwd / (t.backward_ms * 1e-3) / 1e12;
        const char* kern = mma_only ? "mma.sync" : (fast::attn_hopper() ? "wgmma" : "mma.sync (wgmma off)");
        std::printf("%-7s cap %-3s %-9s forward %8.3f ms %6.1f TFLOP/s   backward %8.3f ms %6.1f TFLOP/s   "
                    "recomputed forward %8.3f ms\n",
                    sliding ? "sliding" : "global", cap ? "on" : "off", kern, t.forward_ms, f_tf, t.backward_ms, b_tf,
                    t.recomputed_forward_ms);
        if (!json.empty()) {
          std::ostringstream f;
          f << "{\"model\":\"" << model << "\",\"attention\":\"" << (sliding ? "sliding" : "global") << "\",\"batch\":" << B
            << ",\"seq\":" << T << ",\"cap\":" << (cap ? 1 : 0) << ",\"kernels\":\"" << kern
            << "\",\"forward_ms\":" << t.forward_ms << ",\"forward_tflops\":" << f_tf
            << ",\"backward_ms\":" << t.backward_ms << ",\"backward_tflops\":" << b_tf
            << ",\"recomputed_forward_ms\":" << t.recomputed_forward_ms
            << ",\"gemm_tflops\":";
          json_lines.push_back(f.str());
        }
      }
    }
  }
  const double ceiling = fast::kernels::gemm_tflops(8192, int(iters));
  std::printf("cuBLAS bf16 product 8192^3 (after the attention): %.0f TFLOP/s\n", ceiling);
  if (!json.empty()) {
    std::ofstream f(json, std::ios::app);
    for (const std::string& line : json_lines) f << line << ceiling << ",\"gpu\":\"" << prop.name << "\"}\n";
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fast_bench: tokens/s and peak GPU memory of the fast trainer"};
  std::string model = "gemma2-9b", softcap = "attn,logits", json;
  int64_t B = 2, T = 1024, rank = 32, warmup = 2, steps = 5, micro = 1, layers = 0, recompute_layers = -1;
  std::string recompute_layers_arg;
  int gpus = 1;
  bool no_recompute = false, mlp_only = false, offload = false, longest = false, attention = false;
  std::string quantize;
  double memory_limit_gib = 0;
  app.add_option("--model", model, "preset");
  app.add_option("--batch", B, "sequences per step (per GPU with --gpus)");
  app.add_option("--gpus", gpus, "data parallel over the first N GPUs (NCCL all-reduce of the adapter gradients)");
  app.add_option("--seq", T, "sequence length");
  app.add_option("--rank", rank, "LoRA rank on all seven projections (alpha = rank)");
  app.add_option("--warmup", warmup, "untimed steps first");
  app.add_option("--steps", steps, "timed steps (0 with --longest: the search only)");
  app.add_option("--micro-batches", micro, "gradient accumulation");
  app.add_option("--layers", layers, "use only the first N layers (0: all)");
  app.add_option("--softcap", softcap, "none|attn|logits|attn,logits");
  app.add_flag("--no-recompute", no_recompute, "keep every layer's activations (no activation checkpointing)");
  app.add_flag("--recompute-mlp-only", mlp_only,
               "keep each layer's attention-block and down_proj outputs too: the backward recomputes only the MLP's "
               "input half");
  app.add_option("--recompute-num-layers", recompute_layers_arg,
                 "N: checkpoint and recompute only the first N layers, the rest keep every activation (with "
                 "--recompute-mlp-only gate|up's output) (default: all); auto: the fewest that fit the device or "
                 "--memory-limit");
  app.add_flag("--offload", offload, "activation checkpoints in pinned host memory");
  app.add_option("--json", json, "append one JSON line with the result");
  app.add_option("--quantize", quantize, "nf4: base projections in NF4 as QLoRA keeps them")
      ->check(CLI::IsMember({"nf4"}));
  app.add_option("--memory-limit", memory_limit_gib, "GiB: allocations beyond this fail as on a smaller GPU (0: the device)")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--attention", attention, "time the attention kernels alone at the model's shapes (--steps runs each)");
  app.add_flag("--longest", longest, "search the longest sequence that fits (multiples of 1024; --seq is ignored)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "fast_bench: %s\n", e.what());
    return 2;
  }
  const bool recompute_layers_set = app.count("--recompute-num-layers") > 0;
  bool fit_layers = false;
  if (recompute_layers_set) {
    try {
      const std::optional<int64_t> n = parse_recompute_num_layers(recompute_layers_arg, "--recompute-num-layers");
      fit_layers = !n;
      recompute_layers = n.value_or(-1);
    } catch (const InputError& e) {
      std::fprintf(stderr, "fast_bench: %s\n", e.what());
      return 2;
    }
    if (no_recompute) {
      std::fprintf(stderr, "fast_bench: --recompute-num-layers chooses the layers activation checkpointing recomputes; "
                           "--no-recompute turns it off\n");
      return 2;
    }
  }
  if (fit_layers && longest) {
    std::fprintf(stderr, "fast_bench: --recompute-num-layers auto and --longest are two searches: one at a time\n");
    return 2;
  }
  if (attention) {
    // The attention bench times both caps and both kernel families at the model's shapes, one warm-up run each:
    // the options of a training step would be ignored there, so they are refused.
    for (const char* o : {"--rank", "--warmup", "--micro-batches", "--layers", "--softcap", "--gpus", "--no-recompute",
                          "--recompute-mlp-only", "--recompute-num-layers", "--offload", "--quantize", "--memory-limit", "--longest"})
      if (app.count(o) > 0) {
        std::fprintf(stderr, "fast_bench: %s does not apply to --attention (it times the attention kernels alone)\n", o);
        return 2;
      }
  }
  try {
    if (steps < 1 && !longest) {
      std::fprintf(stderr, "fast_bench: --steps must be at least 1\n");
      return 2;
    }
    // The model and the flags that depend on it first: they are wrong on any machine.
    Config c = preset(model);
    if (layers > 0) c = with_layers(c, layers);
    if (recompute_layers > c.num_hidden_layers) {
      std::fprintf(stderr, "fast_bench: --recompute-num-layers %lld is more than the model's %lld layers\n",
                   (long long)recompute_layers, (long long)c.num_hidden_layers);
      return 2;
    }
    std::string why;
    if (!fast::device_available(&why)) {
      std::fprintf(stderr, "fast_bench: %s\n", why.c_str());
      return 2;
    }
    // What the device holds before the trainer exists (the CUDA context): --memory-limit counts it too.
    GEMMA_CUDA(cudaFree(nullptr));
    size_t free0 = 0, total0 = 0;
    GEMMA_CUDA(cudaMemGetInfo(&free0, &total0));
    const size_t context_bytes = total0 - free0;
    if (attention) {
      attention_bench(c, model, B, T, steps, json);
      return 0;
    }
    const Softcap sc = parse_softcap(softcap, "--softcap");
    AdapterConfig a;
    a.r = rank;
    a.lora_alpha = double(rank);
    a.target_modules.assign(kAllProj.begin(), kAllProj.end());
    AdamWConfig h;
    fast::TrainerOptions o;
    o.recompute = !no_recompute;
    o.offload = offload;
    o.recompute_mlp_only = mlp_only;
    o.recompute_num_layers = recompute_layers;
    o.quantize_nf4 = quantize == "nf4";
    if (longest && gpus > 1) {
      std::fprintf(stderr, "fast_bench: --longest runs on one GPU (--gpus 1)\n");
      return 2;
    }
    // One GPU: the Trainer as train and the published figures use it; several: the data-parallel trainer.
    std::unique_ptr<fast::Trainer> one;
    std::unique_ptr<fast::DataParallelTrainer> many;
    if (gpus > 1)
      many = std::make_unique<fast::DataParallelTrainer>(c, a, 1234, gpus, h, sc, o);
    else
      one = std::make_unique<fast::Trainer>(c, a, 1234, h, sc, o);
    const double gib = double(1ull << 30);
    if (memory_limit_gib > 0) {
      if (!one) {
        std::fprintf(stderr, "fast_bench: --memory-limit applies to one GPU (--gpus 1)\n");
        return 2;
      }
      const size_t limit = size_t(memory_limit_gib * gib);
      if (limit <= context_bytes) {
        std::fprintf(stderr, "fast_bench: --memory-limit %.2f GiB is below the CUDA context's %.2f GiB\n", memory_limit_gib,
                     double(context_bytes) / gib);
        return 2;
      }
      one->set_memory_limit(limit - context_bytes);
      std::printf("memory limit %.2f GiB: %.2f GiB for the trainer's allocations after the CUDA context's %.2f GiB\n",
                  memory_limit_gib, double(limit - context_bytes) / gib, double(context_bytes) / gib);
    }
    if (fit_layers) {
      const int64_t rows = (B + micro - 1) / micro;
      recompute_layers = one ? one->fit_recompute_num_layers(rows, T) : many->fit_recompute_num_layers(rows, T);
      std::printf("--recompute-num-layers auto: %lld of %lld layers recomputed (the fewest with which micro-batches "
                  "of %lld x %lld tokens fit)\n",
                  (long long)recompute_layers, (long long)c.num_hidden_layers, (long long)rows, (long long)T);
    }
    if (longest) {
      // Doubling from 1024 while a step fits, then bisection on multiples of 1024 between the last fit and the
      // first miss.
      auto fits = [&](int64_t t) {
        std::string why;
        const bool ok = one->reserve(B, t, &why);
        std::printf("%s: %lld tokens%s\n", ok ? "fits" : "does not fit", (long long)t, ok ? "" : (" (" + why + ")").c_str());
        std::fflush(stdout);
        return ok;
      };
      int64_t fit = 0, miss = 1024;
      while (fits(miss)) {
        fit = miss;
        miss *= 2;
      }
      while (miss - fit > 1024) {
        const int64_t mid = (fit + miss) / 2048 * 1024;
        (fits(mid) ? fit : miss) = mid;
      }
      if (fit == 0) {
        std::fprintf(stderr, "fast_bench: not even 1024 tokens fit\n");
        return 2;
      }
      T = fit;
      if (!one->reserve(B, T)) throw std::logic_error("fast_bench: the length found no longer fits");
      size_t free_b = 0, total_b = 0;
      GEMMA_CUDA(cudaMemGetInfo(&free_b, &total_b));
      std::printf("longest sequence that fits: %lld tokens (batch %lld): the trainer holds %.2f GiB with every buffer of "
                  "its step allocated; device memory in use %.2f GiB\n",
                  (long long)T, (long long)B, double(one->peak_device_bytes()) / gib, double(total_b - free_b) / gib);
      if (steps == 0) {  // the search alone: a step at this length may take minutes (attention is quadratic)
        if (!json.empty()) {
          std::ofstream f(json, std::ios::app);
          f << "{\"model\":\"" << model << "\",\"batch\":" << B << ",\"longest_seq\":" << T
            << ",\"quantize\":\"" << (o.quantize_nf4 ? "nf4" : "none") << "\",\"memory_limit_gib\":" << memory_limit_gib
            << ",\"offload\":" << (offload ? 1 : 0) << ",\"reserved_gib\":" << double(one->peak_device_bytes()) / gib
            << ",\"device_used_gib\":" << double(total_b - free_b) / gib << "}\n";
        }
        return 0;
      }
    }
    const int64_t global_B = B * gpus;
    if (auto w = beyond_max_positions(c, T, "--seq")) std::fprintf(stderr, "fast_bench: warning: %s\n", w->c_str());
    const Batch batch = synthetic_batch(c, global_B, T, 99, 0.0);
    std::vector<double> secs, allreduce;
    double last_loss = 0;
    for (int64_t s = 0; s < warmup + steps; ++s) {
      double loss = 0, sec = 0, ar = 0;
      if (many) {
        const fast::DataParallelTrainer::Step st = many->step(batch, micro);
        loss = st.loss, sec = st.seconds, ar = st.allreduce_seconds;
      } else {
        const fast::Trainer::Step st = one->step(batch, micro);
        loss = st.loss, sec = st.seconds;
      }
      last_loss = loss;
      std::printf("step %lld: loss %.6f, %.3f s%s%s\n", (long long)s, loss, sec,
                  many ? (", all-reduce " + std::to_string(ar * 1e3) + " ms").c_str() : "", s < warmup ? " (warm-up)" : "");
      if (s >= warmup) {
        secs.push_back(sec);
        allreduce.push_back(ar);
      }
      if (!std::isfinite(loss)) {
        std::fprintf(stderr, "fast_bench: non-finite loss\n");
        return 1;
      }
    }
    std::sort(secs.begin(), secs.end());
    std::sort(allreduce.begin(), allreduce.end());
    const double med = secs[secs.size() / 2], tps = double(global_B * T) / med;
    const size_t peak = many ? many->peak_device_bytes() : one->peak_device_bytes();
    size_t free_b = 0, total_b = 0;
    GEMMA_CUDA(cudaMemGetInfo(&free_b, &total_b));
    cudaDeviceProp prop{};
    GEMMA_CUDA(cudaGetDeviceProperties(&prop, 0));
    const double N = base_params(c);
    // LoRA with a frozen base: forward 2N, input gradients 2N, recomputed forward 2N FLOPs per token (plus
    // attention and the adapters, not counted), so 6N with activation checkpointing and 4N without; with
    // --recompute-mlp-only the recomputation is gate|up's 2 (2 I D) per layer; --recompute-num-layers n recomputes
    // n of the L layers.
    const double n_gu = double(c.num_hidden_layers) * 2.0 * double(proj_in(c, Proj::gate_proj)) *
                        double(proj_out(c, Proj::gate_proj));
    const int64_t n_rec = !o.recompute ? 0 : recompute_layers < 0 ? c.num_hidden_layers : recompute_layers;
    const double rec_frac = double(n_rec) / double(c.num_hidden_layers);
    const double flops_tok = 4.0 * N + rec_frac * (mlp_only ? 2.0 * n_gu : 2.0 * N);
    const std::string rec_layers =
        o.recompute && n_rec < c.num_hidden_layers ? ", " + std::to_string(n_rec) + " layers recomputed" : "";
    std::printf("\n%s (%lld layers%s), batch %lld x %lld%s, LoRA r=%lld on 7 projections, softcap %s, %s%s, %s\n",
                model.c_str(), (long long)c.num_hidden_layers, o.quantize_nf4 ? ", base in NF4" : ", base in bf16",
                (long long)B, (long long)T, gpus > 1 ? (" per GPU on " + std::to_string(gpus) + " GPUs").c_str() : "",
                (long long)rank,
                softcap_name(sc).c_str(),
                !o.recompute ? "no recompute" : mlp_only ? "activation checkpointing (MLP only)" : "activation checkpointing",
                (rec_layers + (offload ? " (offloaded)" : "")).c_str(), prop.name);
    std::printf("median step %.3f s over %lld steps (min %.3f, max %.3f): %.0f tokens/s\n", med, (long long)steps,
                secs.front(), secs.back(), tps);
    if (many) std::printf("median all-reduce of the adapter gradients: %.2f ms\n", allreduce[allreduce.size() / 2] * 1e3);
    std::printf("model FLOPs (%.2gN per token, N = %.3g): %.0f TFLOP/s\n", flops_tok / N, N, flops_tok * tps / 1e12);
    std::printf("peak device allocations %.2f GiB%s; device memory in use at the end %.2f GiB of %.2f GiB\n",
                double(peak) / gib, many ? " (the largest GPU's)" : "", double(total_b - free_b) / gib, double(total_b) / gib);
    const std::string prof = one ? one->profile() : "";
    if (!prof.empty()) std::printf("%s", prof.c_str());
    if (!json.empty()) {
      std::ofstream f(json, std::ios::app);
      f << "{\"model\":\"" << model << "\",\"layers\":" << c.num_hidden_layers << ",\"batch\":" << B << ",\"seq\":" << T
        << ",\"rank\":" << rank << ",\"softcap\":\"" << softcap_name(sc) << "\",\"recompute\":" << (o.recompute ? 1 : 0)
        << ",\"recompute_mlp_only\":" << (mlp_only ? 1 : 0) << ",\"recompute_num_layers\":" << n_rec
        << ",\"offload\":" << (offload ? 1 : 0) << ",\"gpus\":" << gpus << ",\"quantize\":\""
        << (o.quantize_nf4 ? "nf4" : "none") << "\",\"memory_limit_gib\":" << memory_limit_gib << ",\"median_s\":" << med
        << ",\"tokens_per_s\":" << tps << ",\"peak_gib\":" << double(peak) / gib
        << ",\"device_used_gib\":" << double(total_b - free_b) / gib << ",\"loss\":" << last_loss << ",\"gpu\":\""
        << prop.name << "\"}\n";
    }
    return 0;
  } catch (const InputError& e) {
    std::fprintf(stderr, "fast_bench: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fast_bench: %s\n", e.what());
    return 1;
  }
}
