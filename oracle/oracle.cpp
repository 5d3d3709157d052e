#include "oracle/oracle.hpp"

#include <cfloat>
#include <cmath>
#include <limits>

namespace gemma::oracle {

double ulp_of(double y) {
  y = std::fabs(y);
  if (std::isinf(y)) return std::numeric_limits<double>::infinity();
  if (!(y >= DBL_MIN)) return 0x1p-1074;
  int e = 0;
  std::frexp(y, &e);  // y = m 2^e, m in [0.5, 1): the last of 53 bits is worth 2^(e - 53)
  return std::ldexp(1.0, e - 53);
}

double ulp_error(double got, const Mp& exact) {
  const double rounded = static_cast<double>(exact);
  const bool nan_got = std::isnan(got), nan_exact = boost::multiprecision::isnan(exact);
  if (nan_got || nan_exact) return nan_got && nan_exact ? 0.0 : std::numeric_limits<double>::quiet_NaN();
  if (std::isinf(got) || std::isinf(rounded)) return got == rounded ? 0.0 : std::numeric_limits<double>::quiet_NaN();
  return static_cast<double>(abs(Mp(got) - exact) / Mp(ulp_of(rounded)));
}

}  // namespace gemma::oracle

namespace gemma::ref {
template Model<oracle::Mp> make_model<oracle::Mp>(const Checkpoint&, const Policy&);
template Grads<oracle::Mp> zero_grads<oracle::Mp>(const Model<oracle::Mp>&);
template Result<oracle::Mp> forward_backward<oracle::Mp>(const Model<oracle::Mp>&, const Batch&, const RunOptions&,
                                                         const oracle::Mp&, Grads<oracle::Mp>*, Trace<oracle::Mp>*);
template oracle::Mp step_loss_and_grads<oracle::Mp>(const Model<oracle::Mp>&, const std::vector<Batch>&, const RunOptions&,
                                                    Grads<oracle::Mp>&, std::vector<Result<oracle::Mp>>*);
}  // namespace gemma::ref
