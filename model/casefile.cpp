#include "casefile.hpp"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>

#include "errors.hpp"
#include "h5util.hpp"
#include "json_text.hpp"

namespace gemma {

// Why case files are read in a child process: libhdf5 1.10 trusts the file's metadata. A few hundred
// mutations of a valid case file make it memcpy gigabytes out of a corrupt global-heap entry (fuzz_case,
// docs/robustness.md), and no check before the call can rule that out short of re-implementing HDF5. So
// every libhdf5 call on a file verify or train did not write itself runs in a forked child that sends back
// the raw datasets and attributes over a pipe; the parent never touches the file through libhdf5, and a
// child killed by a signal, a sanitizer or a timeout becomes an InputError naming the file. Everything
// else (JSON, shapes, ids, finiteness) is checked in the parent, where the fuzzers see it.

namespace {

const std::set<std::string> kCombos = {"none", "attn", "logits", "attn_logits"};

// CPU seconds the reader child may spend: libhdf5 spins forever on some corrupt global heaps (fuzz_case
// found one within a minute), while a valid case file reads at well over 50 MB per CPU second. The limit is
// CPU time, not wall time, so a loaded machine cannot turn a slow valid read into an error; the wall-clock
// alarm behind it (ten times longer) only catches a child blocked outside the CPU.
// GEMMA_HDF5_CPU_SECONDS overrides it (the case fuzzer uses a quarter second to keep its rate up).
double child_cpu_seconds(uint64_t file_size) {
  if (const char* e = std::getenv("GEMMA_HDF5_CPU_SECONDS")) {
    const double v = std::atof(e);
    if (v > 0 && v < 1e6) return v;
  }
  return 20.0 + double(std::min<uint64_t>(file_size / (10u << 20), 3600));
}

// What the libhdf5 side extracts from a case file, unvalidated.
struct RawExpected {
  std::optional<Tensor> loss, logits;
  TensorMap grads;
};
struct RawCase {
  std::optional<std::string> config_json, adapter_json;
  bool has_weights = false;
  TensorMap weights;
  Shape ids_shape, labels_shape, pos_shape, mask_shape;
  std::vector<int64_t> ids, labels, pos, mask;
  bool has_pos = false, has_mask = false;  // the optional /position_ids and /attention_mask
  std::map<std::string, std::string> provenance;
  std::map<std::string, RawExpected> expected;
};

// The child's result as bytes: u64 counts and sizes, length-prefixed strings, tensors as dtype, shape, data.
struct WireOut {
  std::string s;
  void u64(uint64_t v) { s.append(reinterpret_cast<const char*>(&v), 8); }
  void str(const std::string& v) {
    u64(v.size());
    s += v;
  }
  void opt_str(const std::optional<std::string>& v) {
    u64(v.has_value());
    if (v) str(*v);
  }
  void shape(const Shape& sh) {
    u64(sh.size());
    for (int64_t d : sh) u64(uint64_t(d));
  }
  void tensor(const Tensor& t) {
    u64(uint64_t(t.dtype));
    shape(t.shape);
    s.append(reinterpret_cast<const char*>(t.bytes.get()), size_t(t.numel()) * dtype_size(t.dtype));
  }
  void opt_tensor(const std::optional<Tensor>& t) {
    u64(t.has_value());
    if (t) tensor(*t);
  }
  void tensors(const TensorMap& m) {
    u64(m.size());
    for (const auto& [n, t] : m) {
      str(n);
      tensor(t);
    }
  }
  void ints(const std::vector<int64_t>& v) {
    u64(v.size());
    s.append(reinterpret_cast<const char*>(v.data()), v.size() * 8);
  }
};

// Reads what WireOut wrote. The bytes come from our own child, but a child that died half-way through its
// write leaves them cut short, so every read is bounded.
struct WireIn {
  const std::string& s;
  size_t pos = 0;
  void need(uint64_t n) const {
    if (n > s.size() - pos) throw std::runtime_error("case-file reader: truncated result from the reader process");
  }
  uint64_t u64() {
    need(8);
    uint64_t v;
    std::memcpy(&v, s.data() + pos, 8);
    pos += 8;
    return v;
  }
  std::string str() {
    const uint64_t n = u64();
    need(n);
    std::string v = s.substr(pos, size_t(n));
    pos += size_t(n);
    return v;
  }
  std::optional<std::string> opt_str() { return u64() ? std::optional<std::string>(str()) : std::nullopt; }
  Shape shape() {
    const uint64_t r = u64();
    need(r * 8);
    Shape sh;
    for (uint64_t i = 0; i < r; ++i) sh.push_back(int64_t(u64()));
    return sh;
  }
  Tensor tensor() {
    const DType d = DType(u64());
    Shape sh = shape();
    const uint64_t bytes = uint64_t(shape_numel(sh)) * dtype_size(d);
    need(bytes);
    OwnedTensor o = make_tensor(d, std::move(sh));
    if (bytes) std::memcpy(o.raw, s.data() + pos, size_t(bytes));
    pos += size_t(bytes);
    return o.t;
  }
  std::optional<Tensor> opt_tensor() { return u64() ? std::optional<Tensor>(tensor()) : std::nullopt; }
  TensorMap tensors() {
    TensorMap m;
    for (uint64_t n = u64(); n > 0; --n) {
      std::string name = str();
      m.emplace(std::move(name), tensor());
    }
    return m;
  }
  std::vector<int64_t> ints() {
    const uint64_t n = u64();
    need(n * 8);
    std::vector<int64_t> v(static_cast<size_t>(n));
    if (n) std::memcpy(v.data(), s.data() + pos, size_t(n) * 8);
    pos += size_t(n) * 8;
    return v;
  }
};

void write_all(int fd, const std::string& s) {
  size_t done = 0;
  while (done < s.size()) {
    const ssize_t n = ::write(fd, s.data() + done, s.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // the parent is gone or the pipe broke: it will report the short result
    done += size_t(n);
  }
}

// Runs `body` in a forked child and returns the bytes it produced. The child answers with a tag byte:
// 'O' and the result, 'E' and an InputError's message (rethrown here as is), 'X' and a bug's message.
// GEMMA_HDF5_IN_PROCESS=1 runs `body` in this process instead: for triage only (a fuzzer or debugger then
// sees libhdf5's own crashes), never for users.
std::string in_child(const std::string& path, const std::function<std::string()>& body) {
  if (const char* e = std::getenv("GEMMA_HDF5_IN_PROCESS"); e && std::string(e) == "1") return body();
  std::error_code ec;
  const double cpu_seconds = child_cpu_seconds(std::filesystem::file_size(path, ec));
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) fail(path, std::string("cannot create a pipe to the reader: ") + std::strerror(errno));
  std::fflush(nullptr);  // the child must not inherit (and later print) buffered output
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    fail(path, std::string("cannot start the reader process: ") + std::strerror(errno));
  }
  if (pid == 0) {
    ::close(fds[0]);
    const struct rlimit no_core = {0, 0};
    ::setrlimit(RLIMIT_CORE, &no_core);  // a libhdf5 crash is expected here; leave no core files behind
    ::signal(SIGPIPE, SIG_DFL);
    // Whatever a crashing libhdf5 (or a sanitizer watching it) prints would break the one-line error.
    if (const int null = ::open("/dev/null", O_WRONLY | O_CLOEXEC); null >= 0) ::dup2(null, 2);
    // SIGPROF when the CPU time is spent (setitimer has the resolution a fuzzer needs, RLIMIT_CPU whole
    // seconds: it stays as the backstop should the child block SIGPROF).
    struct itimerval cpu = {};
    cpu.it_value.tv_sec = time_t(cpu_seconds);
    cpu.it_value.tv_usec = suseconds_t((cpu_seconds - double(time_t(cpu_seconds))) * 1e6);
    ::setitimer(ITIMER_PROF, &cpu, nullptr);
    const struct rlimit hard = {rlim_t(cpu_seconds) + 2, rlim_t(cpu_seconds) + 3};
    ::setrlimit(RLIMIT_CPU, &hard);
    ::alarm(unsigned(10 * cpu_seconds) + 1);
    std::string out;
    try {
      out = "O" + body();
    } catch (const InputError& e) {
      out = std::string("E") + e.what();
    } catch (const std::bad_alloc&) {
      out = "E" + path + ": out of memory while reading it";
    } catch (const std::exception& e) {
      out = std::string("X") + e.what();
    } catch (...) {
      out = "Xunknown exception";
    }
    write_all(fds[1], out);
    ::_exit(0);  // not exit(): the parent's atexit handlers and buffers are not the child's to run
  }
  ::close(fds[1]);
  std::string out;
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fds[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, size_t(n));
  }
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    if (sig == SIGPROF || sig == SIGXCPU || sig == SIGKILL || sig == SIGALRM) {
      char secs[32];
      std::snprintf(secs, sizeof secs, "%g", cpu_seconds);
      fail(path, std::string("corrupt HDF5 file: libhdf5 was still reading it after ") + secs +
                     " s of CPU time (or the reader was killed, e.g. out of memory)");
    }
    fail(path, std::string("corrupt HDF5 file: libhdf5 crashed reading it (") + ::strsignal(sig) + ")");
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || out.empty())
    fail(path, "corrupt HDF5 file: the reader process failed (exit status " + std::to_string(WEXITSTATUS(status)) + ")");
  if (out[0] == 'E') throw InputError(out.substr(1));
  if (out[0] == 'X') throw std::runtime_error("case-file reader: " + out.substr(1));
  return out.substr(1);
}

// Refuses what is plainly not an HDF5 file without starting libhdf5: the signature sits at byte 0 or at a
// user-block offset 512 * 2^k.
void check_hdf5_signature(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) fail(path, "no such file");
  if (std::filesystem::is_directory(path, ec)) fail(path, "is a directory, expected an HDF5 case file");
  // A FIFO or device would block the reader or never end; HDF5 needs to seek anyway.
  if (!std::filesystem::is_regular_file(path, ec)) fail(path, "is not a regular file, expected an HDF5 case file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot open for reading");
  const uint64_t size = std::filesystem::file_size(path, ec);
  if (ec) fail(path, "cannot read its size: " + ec.message());
  if (size == 0) fail(path, "empty file, not an HDF5 case file");
  static const char sig[8] = {'\x89', 'H', 'D', 'F', '\r', '\n', '\x1a', '\n'};
  for (uint64_t off = 0; off + 8 <= size; off = off ? off * 2 : 512) {
    char b[8] = {};
    in.seekg(std::streamoff(off));
    if (in.read(b, 8) && std::memcmp(b, sig, 8) == 0) return;
    in.clear();
  }
  fail(path, "not an HDF5 file (no HDF5 signature at byte 0 or any user-block offset)");
}

// Memory the reader may allocate for a file's datasets: generous for any real file (float16 on disk is
// float32 in memory, int8 labels are int64), but a few kilobytes cannot declare gigabytes.
int64_t read_budget(const std::string& path) {
  std::error_code ec;
  const uint64_t size = std::filesystem::file_size(path, ec);
  return (int64_t(256) << 20) + 100 * int64_t(std::min<uint64_t>(size, uint64_t(1) << 50));
}

H5::H5File open_readonly(const std::string& path) {
  h5::quiet();
  return h5::guard(path, "not a readable HDF5 file", [&] {
    if (!H5::H5File::isHdf5(path)) fail(path, "not an HDF5 file");
    return H5::H5File(path, H5F_ACC_RDONLY);
  });
}

// The libhdf5 side of read_case (runs in the child): every dataset and attribute, checked only for what
// reading them needs (existence, type class, rank, size).
RawCase read_raw(const std::string& path) {
  H5::H5File f = open_readonly(path);
  RawCase r;
  int64_t budget = read_budget(path);
  h5::guard(path, "reading case file", [&] {
    if (f.attrExists("config_json")) r.config_json = h5::read_string_attr(f, "config_json", path);
    if (f.attrExists("adapter_config_json")) r.adapter_json = h5::read_string_attr(f, "adapter_config_json", path);
    r.has_weights = h5::exists(f, "weights");
    if (r.has_weights) {
      if (f.childObjType("weights") != H5O_TYPE_GROUP) fail(path, "'/weights' is not a group");
      H5::Group w = f.openGroup("weights");
      for (const auto& name : h5::children(w)) {
        if (w.childObjType(name) != H5O_TYPE_DATASET) fail(path, "'/weights/" + name + "' is not a dataset");
        r.weights[name] = h5::read_float_tensor(w, name, path, &budget);
      }
    }
    // An object this reader does not know could be an input that changes the math (a mask under another name, a
    // newer format): refused, never skipped.
    for (const auto& name : h5::children(f))
      if (name != "weights" && name != "input_ids" && name != "labels" && name != "position_ids" &&
          name != "attention_mask" && name != "expected")
        fail(path, "'/" + name + "' is not part of a case file (known: /weights, /input_ids, /labels, /position_ids, "
                   "/attention_mask, /expected)");
    r.ids = h5::read_int_dataset(f, "input_ids", path, r.ids_shape, &budget);
    r.labels = h5::read_int_dataset(f, "labels", path, r.labels_shape, &budget);
    r.has_pos = h5::exists(f, "position_ids");
    if (r.has_pos) r.pos = h5::read_int_dataset(f, "position_ids", path, r.pos_shape, &budget);
    r.has_mask = h5::exists(f, "attention_mask");
    if (r.has_mask) r.mask = h5::read_int_dataset(f, "attention_mask", path, r.mask_shape, &budget);
    if (h5::exists(f, "expected")) {
      if (f.childObjType("expected") != H5O_TYPE_GROUP) fail(path, "'/expected' is not a group");
      H5::Group e = f.openGroup("expected");
      const int na = e.getNumAttrs();
      for (int i = 0; i < na; ++i) {
        H5::Attribute a = e.openAttribute(unsigned(i));
        if (a.getTypeClass() == H5T_STRING) r.provenance[a.getName()] = h5::read_string_attr(e, a.getName(), path);
        // expected_kind chooses the tolerances (and a torch result's policy): one of another type was skipped like
        // any other attribute, and the default tolerances applied without a word.
        else if (a.getName() == "expected_kind") fail(path, "/expected's attribute 'expected_kind' is not a string");
      }
      for (const auto& combo : h5::children(e)) {
        if (!kCombos.count(combo))
          fail(path, "'/expected/" + combo + "' is not one of none, attn, logits, attn_logits");
        if (e.childObjType(combo) != H5O_TYPE_GROUP) fail(path, "'/expected/" + combo + "' is not a group");
        H5::Group g = e.openGroup(combo);
        // A result under a name this reader does not know (a misspelt `logit`, a gradient outside grads/, a loss
        // stored as an attribute) went unread while the run said "1/1 checks passed" (found by a probe,
        // 2026-12-05): refused, as at the root. So is a combo holding nothing to compare.
        const auto is_result = [](const std::string& n) { return n == "loss" || n == "logits" || n == "grads"; };
        const std::vector<std::string> members = h5::children(g);
        for (const auto& name : members)
          if (!is_result(name))
            fail(path, "'/expected/" + combo + "/" + name + "' is not an expected result (known: loss, logits, grads)");
        // String attributes are provenance (the HF cross-check records its loss dtype there); a result stored as
        // an attribute, or a number, is refused.
        for (int i = 0, na = g.getNumAttrs(); i < na; ++i) {
          H5::Attribute a = g.openAttribute(unsigned(i));
          const std::string an = a.getName();
          if (is_result(an) || a.getTypeClass() != H5T_STRING)
            fail(path, "'/expected/" + combo + "' has attribute '" + an +
                           "': results are datasets (loss, logits, grads/<name>); attributes are provenance strings");
        }
        if (members.empty()) fail(path, "'/expected/" + combo + "' holds no result (loss, logits or grads)");
        RawExpected x;
        if (h5::exists(g, "loss")) x.loss = h5::read_float_tensor(g, "loss", path, &budget);
        if (h5::exists(g, "logits")) x.logits = h5::read_float_tensor(g, "logits", path, &budget);
        if (h5::exists(g, "grads")) {
          if (g.childObjType("grads") != H5O_TYPE_GROUP) fail(path, "'/expected/" + combo + "/grads' is not a group");
          H5::Group gg = g.openGroup("grads");
          if (h5::children(gg).empty()) fail(path, "'/expected/" + combo + "/grads' holds no gradient");
          for (const auto& name : h5::children(gg)) {
            if (gg.childObjType(name) != H5O_TYPE_DATASET)
              fail(path, "'/expected/" + combo + "/grads/" + name + "' is not a dataset");
            x.grads[name] = h5::read_float_tensor(gg, name, path, &budget);
          }
        }
        r.expected[combo] = std::move(x);
      }
    }
    return 0;
  });
  return r;
}

std::string encode(const RawCase& r) {
  WireOut w;
  w.opt_str(r.config_json);
  w.opt_str(r.adapter_json);
  w.u64(r.has_weights);
  w.tensors(r.weights);
  w.shape(r.ids_shape);
  w.ints(r.ids);
  w.shape(r.labels_shape);
  w.ints(r.labels);
  w.u64(r.has_pos);
  w.shape(r.pos_shape);
  w.ints(r.pos);
  w.u64(r.has_mask);
  w.shape(r.mask_shape);
  w.ints(r.mask);
  w.u64(r.provenance.size());
  for (const auto& [k, v] : r.provenance) {
    w.str(k);
    w.str(v);
  }
  w.u64(r.expected.size());
  for (const auto& [combo, x] : r.expected) {
    w.str(combo);
    w.opt_tensor(x.loss);
    w.opt_tensor(x.logits);
    w.tensors(x.grads);
  }
  return w.s;
}

RawCase decode(const std::string& bytes) {
  WireIn in{bytes};
  RawCase r;
  r.config_json = in.opt_str();
  r.adapter_json = in.opt_str();
  r.has_weights = in.u64() != 0;
  r.weights = in.tensors();
  r.ids_shape = in.shape();
  r.ids = in.ints();
  r.labels_shape = in.shape();
  r.labels = in.ints();
  r.has_pos = in.u64() != 0;
  r.pos_shape = in.shape();
  r.pos = in.ints();
  r.has_mask = in.u64() != 0;
  r.mask_shape = in.shape();
  r.mask = in.ints();
  for (uint64_t n = in.u64(); n > 0; --n) {
    std::string k = in.str();
    r.provenance[k] = in.str();
  }
  for (uint64_t n = in.u64(); n > 0; --n) {
    const std::string combo = in.str();
    RawExpected x;
    x.loss = in.opt_tensor();
    x.logits = in.opt_tensor();
    x.grads = in.tensors();
    r.expected[combo] = std::move(x);
  }
  return r;
}

}  // namespace

std::map<std::string, std::string> read_root_attributes(const std::string& path) {
  check_hdf5_signature(path);
  const std::string bytes = in_child(path, [&] {
    H5::H5File f = open_readonly(path);
    WireOut w;
    h5::guard(path, "reading root attributes", [&] {
      std::map<std::string, std::string> r;
      const int n = f.getNumAttrs();
      for (int i = 0; i < n; ++i) {
        H5::Attribute a = f.openAttribute(unsigned(i));
        if (a.getTypeClass() == H5T_STRING) r[a.getName()] = h5::read_string_attr(f, a.getName(), path);
      }
      w.u64(r.size());
      for (const auto& [k, v] : r) {
        w.str(k);
        w.str(v);
      }
      return 0;
    });
    return w.s;
  });
  WireIn in{bytes};
  std::map<std::string, std::string> r;
  for (uint64_t n = in.u64(); n > 0; --n) {
    std::string k = in.str();
    r[k] = in.str();
  }
  return r;
}

bool known_expected_kind(const std::string& kind) {
  return kind == "hf-float64-shipped" || kind == "hf-float64-patched" || kind == "reference-float64" ||
         kind.rfind("torch-", 0) == 0;
}

CaseFile read_case(const std::string& path) {
  check_hdf5_signature(path);
  RawCase raw = decode(in_child(path, [&] { return encode(read_raw(path)); }));

  CaseFile cf;
  if (!raw.config_json) fail(path, "missing root attribute 'config_json'");
  cf.model.config = parse_config_json(*raw.config_json, path + ": config_json", &cf.model.warnings);
  // parse_config_json accepts a bitsandbytes NF4 quantization_config, which a checkpoint's packed weights carry
  // out. A case file's /weights are floats and its /expected values are of those floats: nothing here would
  // quantize them, so the key was read past (the run was the unquantized model's, bit for bit). Refused.
  if (!parse_json(*raw.config_json).value("quantization_config", nlohmann::json()).is_null())
    fail(path + ": config_json", "quantization_config is not implemented for a case file (its /weights are used as "
                                 "stored); quantize the weights into the case, or verify the checkpoint with --config");
  if (raw.adapter_json)
    cf.model.adapter = parse_adapter_config_json(*raw.adapter_json, cf.model.config, path + ": adapter_config_json",
                                                 &cf.model.warnings);
  if (!raw.has_weights) fail(path, "missing group '/weights'");
  cf.model.weights = std::move(raw.weights);

  if (raw.ids_shape.size() != 2) fail(path, "input_ids must be [B, T], has shape " + shape_str(raw.ids_shape));
  if (raw.labels_shape != raw.ids_shape)
    fail(path, "labels shape " + shape_str(raw.labels_shape) + " does not match input_ids shape " +
                   shape_str(raw.ids_shape));
  cf.batch.B = raw.ids_shape[0];
  cf.batch.T = raw.ids_shape[1];
  cf.batch.input_ids = std::move(raw.ids);
  cf.batch.labels = std::move(raw.labels);
  if (raw.has_pos) {
    if (raw.pos_shape != raw.ids_shape)
      fail(path, "position_ids shape " + shape_str(raw.pos_shape) + " does not match input_ids shape " + shape_str(raw.ids_shape));
    cf.batch.position_ids = std::move(raw.pos);
  }
  if (raw.has_mask) {
    if (raw.mask_shape != raw.ids_shape)
      fail(path, "attention_mask shape " + shape_str(raw.mask_shape) + " does not match input_ids shape " +
                     shape_str(raw.ids_shape));
    for (size_t i = 0; i < raw.mask.size(); ++i)
      if (raw.mask[i] != 0 && raw.mask[i] != 1)
        fail(path, "attention_mask[" + std::to_string(i / size_t(cf.batch.T)) + ", " + std::to_string(i % size_t(cf.batch.T)) +
                       "] = " + std::to_string(raw.mask[i]) + " is neither 0 nor 1");
    cf.batch.attention_mask.assign(raw.mask.begin(), raw.mask.end());
  }

  cf.provenance = std::move(raw.provenance);
  // expected_kind picks the tolerances: an unknown one (a typo, a trailing space) got float64's without a word.
  if (auto it = cf.provenance.find("expected_kind"); it != cf.provenance.end() && !known_expected_kind(it->second))
    fail(path, "/expected has expected_kind '" + it->second +
                   "', which picks the tolerances and is not one this reader knows (known: hf-float64-shipped, "
                   "hf-float64-patched, reference-float64, torch-<dtype>)");
  for (auto& [combo, rx] : raw.expected) {
    Expected x;
    if (rx.loss) {
      if (rx.loss->numel() != 1)
        fail(path, "'/expected/" + combo + "/loss' must be a scalar, has shape " + shape_str(rx.loss->shape));
      x.loss = rx.loss->at(0);
    }
    x.logits = std::move(rx.logits);
    x.grads = std::move(rx.grads);
    cf.expected[combo] = std::move(x);
  }

  validate_checkpoint(cf.model, path);
  validate_batch(cf.model.config, cf.batch, path, &cf.model.warnings);
  if (cf.batch.T < 2)
    fail(path, "sequence length T = 1 leaves no target (position t is scored against labels[t + 1])");
  // Kept an error rather than a loss of 0: a mean over no targets is 0/0, and any number reported for it
  // would be compared against some other program's equally arbitrary choice.
  if (cf.batch.count_targets() == 0)
    fail(path, "every label is ignored (-100): the mean loss is undefined (0/0)");

  // Expected results must match what the model can produce, or a comparison would be meaningless.
  const Config& c = cf.model.config;
  std::map<std::string, Shape> trainable;
  if (cf.model.adapter) {
    for (const auto& s : adapter_weight_specs(c, *cf.model.adapter)) trainable[s.name] = s.shape;
  } else {
    for (const auto& s : base_weight_specs(c)) trainable[s.name] = s.shape;
  }
  for (auto& [combo, x] : cf.expected) {
    check_softcap_available(c, {combo == "attn" || combo == "attn_logits", combo == "logits" || combo == "attn_logits"},
                            path + ": /expected/" + combo);
    // A NaN expected value would make its check fail as a numeric mismatch (exit 1) when the file is at fault.
    if (x.loss && !std::isfinite(*x.loss))
      fail(path, "/expected/" + combo + "/loss is " + std::to_string(*x.loss) + ", not a finite number");
    if (x.logits && x.logits->shape != Shape{cf.batch.B, cf.batch.T, c.vocab_size})
      fail(path, "/expected/" + combo + "/logits has shape " + shape_str(x.logits->shape) + ", expected " +
                     shape_str({cf.batch.B, cf.batch.T, c.vocab_size}));
    if (x.logits && first_non_finite(*x.logits) >= 0)
      fail(path, "/expected/" + combo + "/logits has a non-finite value at flat index " +
                     std::to_string(first_non_finite(*x.logits)));
    TensorMap renamed;
    for (auto& [n, t] : x.grads) {
      std::string name = n.rfind("base_model.model.", 0) == 0 ? n.substr(17) : n;
      auto it = trainable.find(name);
      if (it == trainable.end())
        fail(path, "/expected/" + combo + "/grads/" + n + " is not a trainable weight of this case");
      if (t.shape != it->second)
        fail(path, "/expected/" + combo + "/grads/" + n + " has shape " + shape_str(t.shape) + ", expected " +
                       shape_str(it->second));
      if (first_non_finite(t) >= 0)
        fail(path, "/expected/" + combo + "/grads/" + n + " has a non-finite value at flat index " +
                       std::to_string(first_non_finite(t)));
      if (!renamed.emplace(name, t).second)
        fail(path, "/expected/" + combo + "/grads/" + name + " appears twice (with and without the PEFT prefix)");
    }
    x.grads = std::move(renamed);
  }
  return cf;
}

void write_case(const std::string& path, const CaseFile& cf) {
  h5::write_atomically(path, [&](H5::H5File& f) {
    h5::write_string_attr(f, "config_json", to_config_json(cf.model.config));
    if (cf.model.adapter) h5::write_string_attr(f, "adapter_config_json", to_adapter_config_json(*cf.model.adapter));
    H5::Group w = f.createGroup("weights");
    for (const auto& [name, t] : cf.model.weights) h5::write_tensor(w, name, t);
    h5::write_ints(f, "input_ids", {cf.batch.B, cf.batch.T}, cf.batch.input_ids);
    h5::write_ints(f, "labels", {cf.batch.B, cf.batch.T}, cf.batch.labels);
    if (!cf.batch.position_ids.empty()) h5::write_ints(f, "position_ids", {cf.batch.B, cf.batch.T}, cf.batch.position_ids);
    if (!cf.batch.attention_mask.empty())
      h5::write_ints(f, "attention_mask", {cf.batch.B, cf.batch.T},
                     std::vector<int64_t>(cf.batch.attention_mask.begin(), cf.batch.attention_mask.end()));
    if (!cf.expected.empty() || !cf.provenance.empty()) {
      H5::Group e = f.createGroup("expected");
      for (const auto& [k, v] : cf.provenance) h5::write_string_attr(e, k, v);
      for (const auto& [combo, x] : cf.expected) {
        H5::Group g = e.createGroup(combo);
        if (x.loss) h5::write_scalar(g, "loss", *x.loss);
        if (x.logits) h5::write_tensor(g, "logits", *x.logits);
        if (!x.grads.empty()) {
          H5::Group gg = g.createGroup("grads");
          for (const auto& [n, t] : x.grads) h5::write_tensor(gg, n, t);
        }
      }
    }
  });
}

}  // namespace gemma
