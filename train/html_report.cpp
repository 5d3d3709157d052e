#include "train/html_report.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "check/report.hpp"
#include "model/atomic_file.hpp"
#include "train/save.hpp"

namespace gemma::train {

using nlohmann::json;

namespace {


std::string num(double v, const char* fmt = "%.4g") {
  char b[40];
  std::snprintf(b, sizeof b, fmt, v);
  return b;
}

// Colour-blind-safe (Okabe-Ito) colours, one per series.
const char* kColors[] = {"#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9"};

struct Curve {
  std::string label;
  std::vector<std::pair<double, double>> pts;
};

// "Nice" tick values covering [lo, hi]: 1, 2 or 5 times a power of ten apart.
std::vector<double> ticks(double lo, double hi, int target = 5) {
  const double span = hi - lo;
  if (!(span > 0)) return {lo};
  const double raw = span / target, p = std::pow(10.0, std::floor(std::log10(raw)));
  const double step = raw / p < 1.5 ? p : raw / p < 3.5 ? 2 * p : raw / p < 7.5 ? 5 * p : 10 * p;
  std::vector<double> t;
  for (double v = std::ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) t.push_back(std::fabs(v) < step * 1e-9 ? 0.0 : v);
  return t;
}

std::string plot(const std::string& title, const std::string& ylabel, const std::vector<Curve>& curves) {
  const double W = 640, H = 300, L = 70, R = 20, Tm = 30, Bm = 45;
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  size_t n = 0;
  for (const Curve& c : curves)
    for (auto [x, y] : c.pts) {
      x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
      ++n;
    }
  std::string s = "<figure><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + num(W) + "\" height=\"" + num(H) +
                  "\" viewBox=\"0 0 " + num(W) + " " + num(H) + "\" role=\"img\" aria-label=\"" + check::xml_escape(title) + "\">";
  s += "<rect x=\"0\" y=\"0\" width=\"" + num(W) + "\" height=\"" + num(H) + "\" fill=\"white\"/>";
  s += "<text x=\"" + num(W / 2) + "\" y=\"18\" text-anchor=\"middle\" font-size=\"14\" font-weight=\"bold\">" + check::xml_escape(title) + "</text>";
  if (n == 0) {
    s += "<text x=\"" + num(W / 2) + "\" y=\"" + num(H / 2) + "\" text-anchor=\"middle\" fill=\"#666\">no values</text></svg></figure>";
    return s;
  }
  if (x1 == x0) x0 -= 1, x1 += 1;
  if (y1 == y0) {
    const double d = y0 == 0 ? 1 : std::fabs(y0) * 0.05;
    y0 -= d, y1 += d;
  } else {
    const double pad = (y1 - y0) * 0.05;
    y0 -= pad, y1 += pad;
  }
  auto X = [&](double x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
  auto Y = [&](double y) { return H - Bm - (y - y0) / (y1 - y0) * (H - Tm - Bm); };
  s += "<g font-size=\"11\" fill=\"#333\">";
  for (double t : ticks(y0, y1)) {
    s += "<line x1=\"" + num(L) + "\" x2=\"" + num(W - R) + "\" y1=\"" + num(Y(t)) + "\" y2=\"" + num(Y(t)) +
         "\" stroke=\"#ddd\"/><text x=\"" + num(L - 6) + "\" y=\"" + num(Y(t) + 4) + "\" text-anchor=\"end\">" + num(t, "%.3g") +
         "</text>";
  }
  for (double t : ticks(x0, x1)) {
    if (t != std::floor(t)) continue;  // steps are whole numbers
    s += "<line x1=\"" + num(X(t)) + "\" x2=\"" + num(X(t)) + "\" y1=\"" + num(H - Bm) + "\" y2=\"" + num(H - Bm + 4) +
         "\" stroke=\"#333\"/><text x=\"" + num(X(t)) + "\" y=\"" + num(H - Bm + 16) + "\" text-anchor=\"middle\">" +
         num(t, "%.0f") + "</text>";
  }
  s += "</g>";
  s += "<line x1=\"" + num(L) + "\" x2=\"" + num(W - R) + "\" y1=\"" + num(H - Bm) + "\" y2=\"" + num(H - Bm) + "\" stroke=\"#333\"/>";
  s += "<line x1=\"" + num(L) + "\" x2=\"" + num(L) + "\" y1=\"" + num(Tm) + "\" y2=\"" + num(H - Bm) + "\" stroke=\"#333\"/>";
  s += "<text x=\"" + num((L + W - R) / 2) + "\" y=\"" + num(H - 8) + "\" text-anchor=\"middle\" font-size=\"12\">optimizer step</text>";
  s += "<text transform=\"translate(16," + num((Tm + H - Bm) / 2) + ") rotate(-90)\" text-anchor=\"middle\" font-size=\"12\">" +
       check::xml_escape(ylabel) + "</text>";
  for (size_t k = 0; k < curves.size(); ++k) {
    const Curve& c = curves[k];
    if (c.pts.empty()) continue;
    const char* col = kColors[k % 6];
    std::string d;
    for (size_t i = 0; i < c.pts.size(); ++i) d += (i ? " L" : "M") + num(X(c.pts[i].first), "%.2f") + "," + num(Y(c.pts[i].second), "%.2f");
    s += "<path d=\"" + d + "\" fill=\"none\" stroke=\"" + col + "\" stroke-width=\"2\"/>";
    if (c.pts.size() <= 60)
      for (auto [x, y] : c.pts)
        s += "<circle cx=\"" + num(X(x), "%.2f") + "\" cy=\"" + num(Y(y), "%.2f") + "\" r=\"2.5\" fill=\"" + col + "\"/>";
    // Legend, top right, one row per curve.
    const double ly = Tm + 8 + 16 * double(k);
    s += "<line x1=\"" + num(W - R - 150) + "\" x2=\"" + num(W - R - 130) + "\" y1=\"" + num(ly) + "\" y2=\"" + num(ly) +
         "\" stroke=\"" + col + "\" stroke-width=\"2\"/><text x=\"" + num(W - R - 125) + "\" y=\"" + num(ly + 4) +
         "\" font-size=\"11\">" + check::xml_escape(c.label) + "</text>";
  }
  s += "</svg></figure>\n";
  return s;
}

std::vector<Curve> curves(const std::vector<ReportSeries>& series, const char* key) {
  std::vector<Curve> out;
  for (const ReportSeries& r : series) {
    Curve c{r.label, {}};
    if (r.steps.is_array())
      for (const json& e : r.steps)
        if (e.is_object() && e.contains("step") && e.contains(key) && e[key].is_number() && e["step"].is_number()) {
          const double y = e[key].get<double>();
          if (std::isfinite(y)) c.pts.push_back({e["step"].get<double>(), y});
        }
    out.push_back(std::move(c));
  }
  return out;
}

}  // namespace

std::string html_report(const std::string& title, const std::vector<ReportSeries>& series, const json& settings) {
  std::string h = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>" + check::xml_escape(title) +
                  "</title>\n<style>body{font-family:sans-serif;margin:24px;color:#222}figure{margin:12px 0}"
                  "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
                  "code{font-size:12px}</style></head><body>\n<h1 style=\"font-size:20px\">" + check::xml_escape(title) + "</h1>\n";
  h += "<table><tr><th>run</th><th>steps</th><th>first loss</th><th>last loss</th></tr>";
  for (const ReportSeries& r : series) {
    const std::vector<Curve> c = curves({r}, "loss");
    const auto& p = c[0].pts;
    h += "<tr><td>" + check::xml_escape(r.label) + "</td><td>" + std::to_string(p.size()) + "</td><td>" +
         (p.empty() ? "" : num(p.front().second, "%.6f")) + "</td><td>" + (p.empty() ? "" : num(p.back().second, "%.6f")) +
         "</td></tr>";
  }
  h += "</table>\n";
  h += plot("Training loss (mean over the step's scored targets)", "loss", curves(series, "loss"));
  h += plot("Learning rate", "learning rate", curves(series, "learning_rate"));
  h += plot("Gradient norm before clipping", "global L2 norm", curves(series, "grad_norm"));
  h += "<h2 style=\"font-size:16px\">Settings</h2><pre><code>" + check::xml_escape(settings.dump(2)) + "</code></pre>\n</body></html>\n";
  return h;
}

void write_html_report(const std::string& path, const std::string& title, const std::vector<ReportSeries>& series,
                       const json& settings) {
  write_text_file_atomically(path, html_report(title, series, settings));
}

}  // namespace gemma::train
