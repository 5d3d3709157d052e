// Output files that are either whole or absent.
#pragma once
#include <cstddef>
#include <functional>
#include <string>

namespace gemma {

// Appends n bytes to the file being written.
using ByteSink = std::function<void(const void* data, size_t n)>;

// Writes `path` through a temporary file beside it. `body` writes the contents through the sink it is given. The
// file is renamed into place only after every write, fsync and close succeeded; on any failure the temporary file
// is removed, `path` is left as it was, and an InputError names `path` and the system's reason (strerror). A full
// disk used to surface only at the stream's final flush, which nothing checked: a truncated file was renamed into
// place and the run said "saved" (found by a probe, 2026-12-05).
//
// A symbolic link at `path` is written through: the file it names is replaced, the link stays (renaming over the
// link replaced it with a plain file). A device, pipe or other special file at `path` (or where its link points:
// /dev/null, /dev/stdout) is written directly, with no temporary file, since renaming over it would replace the
// device itself (found by a probe run as root, 2026-12-05: --json /dev/null turned /dev/null into a regular file).
void write_file_atomically(const std::string& path, const std::function<void(const ByteSink&)>& body);

// Where an output named `path` is really written: the file a symbolic link at `path` names (followed to the end),
// else `path`. `special` says whether something other than a regular file or nothing is there.
struct OutputTarget {
  std::string path;
  bool special = false;
};
OutputTarget output_target(const std::string& path);

// The same for a text held in memory.
void write_text_file_atomically(const std::string& path, const std::string& text);

}  // namespace gemma
