// Helpers of the bad-input catalogue: a scratch directory per test, files written by the model's own
// writers and then damaged, and runs of the real tools with their exit status and stderr captured.
#pragma once
#include <fcntl.h>
#include <gtest/gtest.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <typeinfo>
#include <vector>

#include "model/errors.hpp"
#include "model/h5util.hpp"

extern char** environ;

namespace gemma::test {

namespace fs = std::filesystem;

// A fresh directory under $TMPDIR (or /tmp), removed with everything in it when the test ends.
struct TempDir {
  fs::path dir;
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/gemma-badinput-XXXXXX";
    if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    dir = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  std::string operator/(const std::string& name) const { return (dir / name).string(); }
};

inline std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline void spit(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// Overwrites `bytes` at `offset` of a file in place.
inline void patch(const std::string& path, size_t offset, const std::string& bytes) {
  std::string s = slurp(path);
  s.replace(offset, bytes.size(), bytes);
  spit(path, s);
}

// Opens an HDF5 file for a surgical edit that the model's writers would refuse to make.
inline void edit_h5(const std::string& path, const std::function<void(H5::H5File&)>& edit) {
  h5::quiet();
  H5::H5File f(path, H5F_ACC_RDWR);
  edit(f);
}

struct ToolRun {
  bool exited = false;  // false: killed by a signal
  int status = -1;      // exit status when exited, else the signal
  std::string out, err;
  std::vector<std::string> err_lines() const {
    std::vector<std::string> r;
    std::istringstream in(err);
    for (std::string l; std::getline(in, l);) r.push_back(l);
    return r;
  }
};

// Starts a built tool with `args`, stdout and stderr captured in files of `dir`; extra environment
// variables in `env` ("NAME=value"). Returns its pid, or -1.
inline pid_t start_tool(const std::string& bin, const std::vector<std::string>& args, const TempDir& dir,
                        const std::vector<std::string>& env = {}) {
  const std::string out = dir / "tool.stdout", err = dir / "tool.stderr";
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<std::string> argv_s = {bin};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_s;
  for (char** e = environ; *e; ++e) env_s.push_back(*e);
  env_s.insert(env_s.end(), env.begin(), env.end());
  std::vector<char*> envp;
  for (auto& e : env_s) envp.push_back(e.data());
  envp.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, bin.c_str(), &fa, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) errno = rc;  // posix_spawn reports its error by value, not in errno
  return rc == 0 ? pid : -1;
}

// Waits for a tool start_tool started and collects its status and output.
inline ToolRun wait_tool(pid_t pid, const TempDir& dir) {
  ToolRun r;
  int st = 0;
  while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  r.exited = WIFEXITED(st);
  r.status = r.exited ? WEXITSTATUS(st) : WTERMSIG(st);
  r.out = slurp(dir / "tool.stdout");
  r.err = slurp(dir / "tool.stderr");
  return r;
}

inline ToolRun run_tool(const std::string& bin, const std::vector<std::string>& args, const TempDir& dir,
                        const std::vector<std::string>& env = {}) {
  const pid_t pid = start_tool(bin, args, dir, env);
  if (pid < 0) {
    // A tool that cannot start (a bundle copied without it, a build path that did not travel) fails the test here
    // with the path, rather than as a bare "exited: false" at the caller's assertion.
    const int e = errno;
    ToolRun r;
    r.err = "cannot start " + bin + ": " + std::strerror(e);
    ADD_FAILURE() << r.err << " (the test runs the built tool at this path)";
    return r;
  }
  return wait_tool(pid, dir);
}

// The contract for bad input: exit status 2, no signal, and exactly one line on stderr that starts with
// the tool's name and contains every needle (the file, tensor or flag, and the problem).
inline void expect_rejected(const ToolRun& r, const std::string& tool, const std::vector<std::string>& needles) {
  ASSERT_TRUE(r.exited) << tool << " was killed by signal " << r.status << "; stderr:\n" << r.err;
  EXPECT_EQ(r.status, 2) << "stderr:\n" << r.err << "stdout:\n" << r.out;
  const auto lines = r.err_lines();
  ASSERT_EQ(lines.size(), 1u) << "stderr must be one line, was:\n" << r.err;
  EXPECT_EQ(lines[0].rfind(tool + ": ", 0), 0u) << lines[0];
  for (const auto& n : needles) EXPECT_NE(lines[0].find(n), std::string::npos) << "'" << n << "' not in: " << lines[0];
  std::printf("  %s exit %d: %s\n", tool.c_str(), r.status, lines[0].c_str());
}

// The same contract at the API: `f` throws InputError (nothing else), one line, every needle in it.
inline void expect_input_error(const std::function<void()>& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing '" << (needles.empty() ? "" : needles[0]) << "'";
  } catch (const InputError& e) {
    const std::string m = e.what();
    EXPECT_EQ(m.find('\n'), std::string::npos) << "message spans lines: " << m;
    for (const auto& n : needles) EXPECT_NE(m.find(n), std::string::npos) << "'" << n << "' not in: " << m;
    std::printf("  InputError: %s\n", m.c_str());
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a " << typeid(e).name() << " instead of InputError: " << e.what();
  }
}

}  // namespace gemma::test
