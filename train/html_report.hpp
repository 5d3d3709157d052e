// A self-contained HTML page of a training run: inline SVG plots of the loss (one curve per run, e.g. per
// backend), the learning rate and the gradient norm against the optimizer step, and the run's settings. No
// script, no external asset: it renders the same offline, in a CI artifact viewer, or in a mail.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace gemma::train {

struct ReportSeries {
  std::string label;     // "reference", "fast", a log file's name
  nlohmann::json steps;  // train's log entries: {"step", "loss", "learning_rate", "grad_norm", ...}
};

// The page as text. Entries without a value for a plot (the fast trainer logs no grad_norm) leave it out of that
// plot; non-finite values are skipped.
std::string html_report(const std::string& title, const std::vector<ReportSeries>& series, const nlohmann::json& settings);
// Writes html_report(...) atomically (temporary name, then rename); InputError naming `path` when it cannot.
void write_html_report(const std::string& path, const std::string& title, const std::vector<ReportSeries>& series,
                       const nlohmann::json& settings);

}  // namespace gemma::train
