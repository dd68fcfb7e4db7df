// A standalone run of csrc/cuda's launchers on the CUDA-on-CPU harness, without torch.
//
//   selftest mse  DTYPE R N [SHIFT]   per-row MSE of R rows of N elements (stages 1 and 2)
//   selftest bwd  DTYPE R N [SHIFT]   the backward of R rows of N elements
//   selftest pairs B K                the scalar stage over B pairs and K annotators
//
// DTYPE is f64, f32, bf16 or f16.  Every buffer is malloc'd at its exact size (so a read one
// past the last row is a heap overflow for ASan); SHIFT > 0 moves the target SHIFT elements
// off its 16-byte-aligned start (the buffer still ends exactly).  The results are checked
// against a double-precision loop here; exit status 0 when they agree, 1 when they do not,
// 2 on a harness failure (printed), 3 on bad arguments.  tests/test_cuda_emu.py builds it
// from deliberately broken copies of kernels.cu to show that the harness catches each defect.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "../cuda/kernels.h"

using namespace adpo::cuda;

namespace {

struct Buffer {  // n elements of es bytes, the first `shift` of them skipped
  unsigned char* raw = nullptr;
  void* data = nullptr;
  Buffer(size_t n, size_t es, size_t shift = 0) {
    raw = static_cast<unsigned char*>(std::malloc((n + shift) * es));
    data = raw + shift * es;
  }
  ~Buffer() { std::free(raw); }
};

DType parse_dtype(const std::string& s, size_t* es) {
  if (s == "f64") return *es = 8, DType::F64;
  if (s == "f32") return *es = 4, DType::F32;
  if (s == "bf16") return *es = 2, DType::BF16;
  if (s == "f16") return *es = 2, DType::F16;
  throw std::invalid_argument("DTYPE must be f64, f32, bf16 or f16, got " + s);
}

// Stores v in the dtype; returns the value actually stored.
double put(DType dt, void* base, size_t i, double v) {
  switch (dt) {
    case DType::F64: static_cast<double*>(base)[i] = v; return v;
    case DType::F32: static_cast<float*>(base)[i] = (float)v; return (float)v;
    case DType::BF16: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn((float)v);
      return __bfloat162float(static_cast<__nv_bfloat16*>(base)[i]);
    default: static_cast<__half*>(base)[i] = __float2half_rn((float)v);
      return __half2float(static_cast<__half*>(base)[i]);
  }
}

double get(DType dt, const void* base, size_t i) {
  switch (dt) {
    case DType::F64: return static_cast<const double*>(base)[i];
    case DType::F32: return static_cast<const float*>(base)[i];
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    default: return __half2float(static_cast<const __half*>(base)[i]);
  }
}

int check(const char* what, double got, double want, double rtol, double atol = 1e-30) {
  if (std::fabs(got - want) <= rtol * std::fabs(want) + atol) return 0;
  std::printf("MISMATCH %s: %.17g, expected %.17g\n", what, got, want);
  return 1;
}

int run_rows(bool bwd, DType dt, size_t es, int64_t R, int64_t N, size_t shift) {
  std::mt19937_64 rng(1);
  std::normal_distribution<double> nd;
  Buffer pred(R * N, es), target(R * N, es, shift);
  std::vector<double> p(R * N), t(R * N);
  for (int64_t i = 0; i < R * N; ++i) {
    t[i] = put(dt, target.data, i, nd(rng));
    p[i] = put(dt, pred.data, i, t[i] + 0.1 * nd(rng));
  }
  const bool f64 = dt == DType::F64;
  const size_t acc = f64 ? 8 : 4;
  const double rtol = f64 ? 1e-12 : 1e-4;
  int bad = 0;
  if (!bwd) {
    const int64_t nchunks = num_chunks(dt, N);
    Buffer partials(R * nchunks, acc), out(R, acc);
    const void* preds[1] = {pred.data};
    launch_mse_partials(dt, preds, 1, target.data, R, R, N, partials.data, nullptr);
    launch_mse_combine(f64, partials.data, R, nchunks, N, out.data, nullptr);
    for (int64_t r = 0; r < R; ++r) {
      double s = 0;
      for (int64_t n = 0; n < N; ++n) s += (p[r * N + n] - t[r * N + n]) * (p[r * N + n] - t[r * N + n]);
      const double got = f64 ? static_cast<double*>(out.data)[r] : static_cast<float*>(out.data)[r];
      bad |= check(("mse row " + std::to_string(r)).c_str(), got, s / (double)N, rtol);
      std::printf("%s%.9g", r ? " " : "values: ", got);
    }
    std::printf("\n");
  } else {
    const int64_t B = R / 2;
    Buffer gl(1, acc), gc(B, acc), grad(R * N, es);
    std::vector<double> g(B);
    for (int64_t i = 0; i < B; ++i) g[i] = nd(rng);
    if (f64) {
      static_cast<double*>(gl.data)[0] = 0.75;
      for (int64_t i = 0; i < B; ++i) static_cast<double*>(gc.data)[i] = g[i];
    } else {
      static_cast<float*>(gl.data)[0] = 0.75f;
      for (int64_t i = 0; i < B; ++i) g[i] = static_cast<float*>(gc.data)[i] = (float)g[i];
    }
    launch_pairs_bwd(dt, gl.data, gc.data, pred.data, target.data, R, R, N, grad.data, nullptr);
    const double tol = f64 ? 1e-12 : dt == DType::F32 ? 1e-5 : 1e-2;
    for (int64_t r = 0; r < R && !bad; ++r)
      for (int64_t n = 0; n < N && !bad; ++n) {
        const double want = 0.75 * g[r % B] * (r < B ? -2.0 : 2.0) / (double)N * (p[r * N + n] - t[r * N + n]);
        bad |= check(("grad " + std::to_string(r) + "," + std::to_string(n)).c_str(), get(dt, grad.data, r * N + n),
                     want, tol, dt == DType::F16 ? std::ldexp(1.0, -24) : 1e-30);  // f16 subnormals
      }
  }
  std::printf("%s %lld x %lld: %s\n", bwd ? "bwd" : "mse", (long long)R, (long long)N, bad ? "MISMATCH" : "ok");
  return bad;
}

int run_pairs(int64_t B, int64_t K) {
  const int64_t T = 2 + K;
  std::mt19937_64 rng(2);
  std::uniform_real_distribution<double> ud(0.9, 1.1);
  std::vector<double> mse(T * 2 * B);
  for (double& x : mse) x = ud(rng);
  std::vector<double> ws(pairs_workspace_size(T, B)), vecs(5 * B), scal(2);
  PairsOut out{&scal[0], &vecs[0], &vecs[B], &vecs[2 * B], &vecs[3 * B], &scal[1], &vecs[4 * B]};
  adpo::Params p{};
  p.beta = 500.0, p.rho = 50.0, p.tau = 1.0, p.intercept = 1.0, p.flip_ratio = 0.3;
  p.loss = adpo::LOSS_SIGMOID, p.weight = adpo::WEIGHT_LINEAR, p.margin = adpo::MARGIN_LINEAR;
  p.metric = K > 0 ? adpo::METRIC_ON : adpo::METRIC_OFF, p.std_standardize = 1, p.flip = 1;
  launch_pairs(true, mse.data(), T, B, 0, B, p, ws.data(), out, nullptr);
  int bad = 0;
  double zsum = 0;  // the logits are exact differences of the inputs
  for (int64_t i = 0; i < B; ++i) {
    const double z = (mse[2 * B + i] - mse[3 * B + i]) - (mse[i] - mse[B + i]);
    bad |= check(("logit " + std::to_string(i)).c_str(), vecs[i], z, 1e-12);
    zsum += z;
  }
  bad |= !std::isfinite(scal[0]);
  std::printf("pairs B=%lld K=%lld: loss %.6g, mean logit %.6g: %s\n", (long long)B, (long long)K, scal[0],
              zsum / (double)B, bad ? "MISMATCH" : "ok");
  return bad;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 2) throw std::invalid_argument("usage: selftest mse|bwd DTYPE R N [SHIFT] | selftest pairs B K");
    const std::string what = argv[1];
    if (what == "pairs" && argc == 4) return run_pairs(std::atoll(argv[2]), std::atoll(argv[3]));
    if ((what == "mse" || what == "bwd") && (argc == 5 || argc == 6)) {
      size_t es = 0;
      const DType dt = parse_dtype(argv[2], &es);
      return run_rows(what == "bwd", dt, es, std::atoll(argv[3]), std::atoll(argv[4]), argc == 6 ? std::atoll(argv[5]) : 0);
    }
    throw std::invalid_argument("usage: selftest mse|bwd DTYPE R N [SHIFT] | selftest pairs B K");
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 3;
  } catch (const std::exception& e) {
    std::printf("HARNESS FAILURE: %s\n", e.what());
    return 2;
  }
}
