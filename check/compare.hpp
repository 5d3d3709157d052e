// Comparing a reference (or fast) run with expected results: the error measures and the tolerances, shared
// by verify and the tests so that the tests check what verify ships.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "model/casefile.hpp"
#include "reference/run.hpp"
#include "check/report.hpp"

namespace gemma::check {

struct Tolerances {
  double loss, grads, logits;
  std::string why;
};

// Tolerances against /expected depend on who computed it (attribute expected_kind on /expected).
Tolerances tolerances_for(const std::map<std::string, std::string>& provenance);

// sqrt(sum (a - b)^2 / sum b^2)
double rel_l2(const std::vector<double>& a, const std::vector<double>& b);
// max |a - b| / max |b|: a relative error that stays meaningful for values near zero.
double max_rel(const std::vector<double>& a, const std::vector<double>& b);

// Adds one check per expected quantity (loss, logits, every gradient), named "<prefix>...". Logits at padding
// positions (the batch's attention_mask 0) are left out: what a query that sees no key computes never reaches the
// loss, and implementations differ there (HF's eager attention spreads it over every key, the reference gives 0).
void compare_expected(Report& r, const std::string& prefix, const ref::Output& out, const Expected& ex,
                      const Tolerances& tol, const Batch& batch);

// The reference's backward against finite differences of its own forward (ref::directional_check), as one check:
// passes when the two agree within max(1e-7, 3 x the estimate's own error) and that error is below 1e-4/3; reports
// "unresolved" when the estimate cannot resolve the derivative (its error above that) and the two agree within it;
// fails otherwise, i.e. whenever the estimate is confident that they differ.
void add_fd_check(Report& r, const std::string& prefix, const ref::DirectionalCheck& fd);

}  // namespace gemma::check
