#include "model/atomic_file.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "model/errors.hpp"

namespace gemma {

namespace {

std::string reason(int err) { return std::strerror(err); }

}  // namespace

OutputTarget output_target(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  OutputTarget t{path, false};
  // Link by link (weakly_canonical stops at a link whose target does not exist yet, the usual case for an output).
  fs::path p = path;
  for (int hops = 0; fs::is_symlink(p, ec); ++hops) {
    if (hops == 40) fail(path, "is a chain of more than 40 symbolic links");
    const fs::path to = fs::read_symlink(p, ec);
    if (ec) fail(path, "is a symbolic link that cannot be read: " + ec.message());
    p = to.is_absolute() ? to : p.parent_path() / to;
  }
  t.path = p.string();
  const fs::file_status st = fs::status(t.path, ec);
  t.special = fs::exists(st) && !fs::is_regular_file(st) && !fs::is_directory(st);
  return t;
}

void write_file_atomically(const std::string& path_given, const std::function<void(const ByteSink&)>& body) {
  namespace fs = std::filesystem;
  // A directory at the path would make rename() fail with a reason that does not say so.
  if (std::error_code ec; fs::is_directory(path_given, ec)) fail(path_given, "is a directory, expected a file name");
  const OutputTarget target = output_target(path_given);
  const std::string& path = target.path;
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());  // unused for a special file
  const int fd = target.special ? ::open(path.c_str(), O_WRONLY | O_CLOEXEC)
                                : ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(path_given, "cannot write: " + reason(errno));
  int err = 0;  // the first failure's errno
  const ByteSink sink = [&](const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0 && err == 0) {
      const ssize_t w = ::write(fd, p, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        err = errno;
      } else {
        p += w;
        n -= size_t(w);
      }
    }
  };
  try {
    body(sink);
  } catch (...) {
    ::close(fd);
    if (!target.special) ::unlink(tmp.c_str());
    throw;
  }
  if (target.special) {  // a device or pipe: no fsync (EINVAL on most) and nothing to rename
    if (::close(fd) != 0 && err == 0) err = errno;
    if (err != 0) fail(path_given, "cannot write: " + reason(err));
    return;
  }
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && err == 0) err = errno;
  if (err == 0 && ::rename(tmp.c_str(), path.c_str()) != 0) err = errno;
  if (err != 0) {
    ::unlink(tmp.c_str());
    fail(path_given, "cannot write: " + reason(err));
  }
}

void write_text_file_atomically(const std::string& path, const std::string& text) {
  write_file_atomically(path, [&](const ByteSink& put) { put(text.data(), text.size()); });
}

}  // namespace gemma
