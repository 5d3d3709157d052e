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

void write_file_atomically(const std::string& path, const std::function<void(const ByteSink&)>& body) {
  namespace fs = std::filesystem;
  // A directory at the path would make rename() fail with a reason that does not say so.
  if (std::error_code ec; fs::is_directory(path, ec)) fail(path, "is a directory, expected a file name");
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(path, "cannot write: " + reason(errno));
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
    ::unlink(tmp.c_str());
    throw;
  }
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && err == 0) err = errno;
  if (err == 0 && ::rename(tmp.c_str(), path.c_str()) != 0) err = errno;
  if (err != 0) {
    ::unlink(tmp.c_str());
    fail(path, "cannot write: " + reason(err));
  }
}

void write_text_file_atomically(const std::string& path, const std::string& text) {
  write_file_atomically(path, [&](const ByteSink& put) { put(text.data(), text.size()); });
}

}  // namespace gemma
