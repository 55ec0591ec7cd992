// Fused gated-LSTM step kernels (CPU): gate formation, the c/h update and the prior KL of one
// time step in one pass over memory, forward and backward. See bbservice/fused/__init__.py.
//
// Layout (row-major, contiguous): z (B, K*H) with blocks [gate blocks (NB*H), g (H), o (H)];
// c_prev, h, c, grad_h, grad_c, grad_c_prev (B, H); noise eps/lub (B, NB*H) for the Beta
// families, (B, 2H) for g2; gates (B, 2H) = [i | f]; kl (B, H) summed over the Gammas.
//
// No torch headers: this file compiles in about a second and is called through ctypes.
// Float kernels use vectorisable polynomial exp/log (Cephes, ~1 ulp); double kernels use libm.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#define BB_UNROLL _Pragma("GCC unroll 8")
#define BB_INLINE inline __attribute__((always_inline))

namespace {

enum Family { LSTM = 0, CIFG = 1, G2 = 2, BETA = 3, BBETA3 = 4, BBETA5 = 5 };
enum Mode { MEAN = 0, NOISE_IN = 1, RNG = 2 };

constexpr int MAX_PROPOSALS = 20;  // Marsaglia proposals per entry (acceptance > 95% each)
constexpr uint64_t SLOTS = 64;      // RNG counters per entry and Gamma

struct Params {
  int64_t batch, hidden;
  double alpha_eps, kl_alpha0, g2_tau, g2_prob;
  uint64_t seed, step;
  const void* z;        // (B, K*H)
  const void* c_prev;   // (B, H)
  void* h;              // (B, H) forward out
  void* c;              // (B, H) forward out
  void* eps;            // Beta: (B, NB*H) accepted normals; g2: (B, 2H) noise. in or out
  void* lub;            // Beta: (B, NB*H) log U of the boost. in or out
  void* gates;          // (B, 2H) out or null
  void* kl;             // (B, H) out or null
  const void* grad_h;   // (B, H) or null
  const void* grad_c;   // (B, H) or null
  const void* grad_kl;  // (B, H) or null: gradient of the kl output
  void* grad_z;         // (B, K*H) out
  void* grad_c_prev;    // (B, H) out
  int64_t save_log;     // Beta, RNG mode: the forward leaves log G in eps and d log G/d alpha in
                        // lub (what the backward needs) instead of the noise
};

// ------------------------------------------------------------------------------------------
// elementary functions: vectorisable float versions, libm for double
// ------------------------------------------------------------------------------------------

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, 4);
  return i;
}

BB_INLINE float fexp(float x) {
  float xc = x < -87.0f ? -87.0f : (x > 88.5f ? 88.5f : x);
  float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  float y = p * r * r + r + 1.0f;
  // 2^n in two halves so that n = 128 (x near 88.7) does not overflow the exponent field
  int32_t n1 = static_cast<int32_t>(n) >> 1;
  int32_t n2 = static_cast<int32_t>(n) - n1;
  y = y * bits_to_float((n1 + 127) << 23) * bits_to_float((n2 + 127) << 23);
  y = x < -87.0f ? 0.0f : y;
  y = x > 88.5f ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}

BB_INLINE float flog(float x) {
  int32_t ix = float_to_bits(x);
  int32_t e = ((ix >> 23) & 0xff) - 126;
  float m = bits_to_float((ix & 0x007fffff) | 0x3f000000);  // x = m 2^e, m in [0.5, 1)
  bool small = m < 0.707106781186547524f;
  float mm = small ? (m + m - 1.0f) : (m - 1.0f);
  float fe = static_cast<float>(small ? e - 1 : e);
  float z = mm * mm;
  float y = 7.0376836292E-2f;
  y = y * mm - 1.1514610310E-1f;
  y = y * mm + 1.1676998740E-1f;
  y = y * mm - 1.2420140846E-1f;
  y = y * mm + 1.4249322787E-1f;
  y = y * mm - 1.6668057665E-1f;
  y = y * mm + 2.0000714765E-1f;
  y = y * mm - 2.4999993993E-1f;
  y = y * mm + 3.3333331174E-1f;
  y = y * mm * z;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  float r = mm + y + 0.693359375f * fe;
  // inputs here are positive normal numbers; keep the IEEE answers for the rest
  r = x == 0.0f ? -std::numeric_limits<float>::infinity() : r;
  r = x < 0.0f ? std::numeric_limits<float>::quiet_NaN() : r;
  r = x == std::numeric_limits<float>::infinity() ? x : r;
  return x != x ? x : r;
}

// cos(2 pi u) for u in [0, 1], only for Box-Muller noise (accuracy ~1e-7)
BB_INLINE float fcos2pi(float u) {
  float x = u - std::floor(u + 0.5f);  // [-0.5, 0.5]
  x = x < 0.0f ? -x : x;               // [0, 0.5]
  bool flip = x > 0.25f;
  x = flip ? 0.5f - x : x;             // [0, 0.25]: cos(2 pi x) >= 0
  float t = 6.28318530717958648f * x;
  float t2 = t * t;
  float p = -2.7557319224e-7f;
  p = p * t2 + 2.4801587302e-5f;
  p = p * t2 - 1.3888888889e-3f;
  p = p * t2 + 4.1666666667e-2f;
  p = p * t2 - 0.5f;
  p = p * t2 + 1.0f;
  return flip ? -p : p;
}

template <typename T> inline T vexp(T x);
template <> BB_INLINE float vexp<float>(float x) { return fexp(x); }
template <> BB_INLINE double vexp<double>(double x) { return std::exp(x); }
template <typename T> inline T vlog(T x);
template <> BB_INLINE float vlog<float>(float x) { return flog(x); }
template <> BB_INLINE double vlog<double>(double x) { return std::log(x); }
template <typename T> inline T vlog1p(T x);
template <> BB_INLINE float vlog1p<float>(float x) { return flog(1.0f + x); }
template <> BB_INLINE double vlog1p<double>(double x) { return std::log1p(x); }
template <typename T> inline T vcos2pi(T u);
template <> BB_INLINE float vcos2pi<float>(float u) { return fcos2pi(u); }
template <> BB_INLINE double vcos2pi<double>(double u) { return std::cos(6.283185307179586 * u); }

template <typename T> BB_INLINE T sigmoid(T x) { return T(1) / (T(1) + vexp<T>(-x)); }
template <typename T> BB_INLINE T tanh_(T x) { return T(2) * sigmoid<T>(T(2) * x) - T(1); }
// softplus(z) = relu(z) - log(sigmoid(|z|)), as the eager CPU path
template <typename T> BB_INLINE T softplus(T z) {
  T az = z < T(0) ? -z : z;
  return (z > T(0) ? z : T(0)) + vlog<T>(T(1) + vexp<T>(-az));
}

// ------------------------------------------------------------------------------------------
// counter-based random numbers: SplitMix64 at position (seed, counter)
// ------------------------------------------------------------------------------------------

BB_INLINE uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}
BB_INLINE uint64_t draw64(uint64_t key, uint64_t counter) {
  return mix64(key + (counter + 1) * 0x9E3779B97F4A7C15ULL);
}
// uniform in (0, 1), never 0 or 1
template <typename T> inline T uniform(uint64_t bits);
template <> BB_INLINE float uniform<float>(uint64_t bits) {
  return (static_cast<float>(static_cast<int32_t>(bits >> 40)) + 0.5f) * 5.9604644775390625e-8f;
}
template <> BB_INLINE double uniform<double>(uint64_t bits) {
  return (static_cast<double>(static_cast<int64_t>(bits >> 11)) + 0.5) * 1.1102230246251565e-16;
}

// ------------------------------------------------------------------------------------------
// special functions of the Gamma prior KL (double precision, scalar)
// ------------------------------------------------------------------------------------------

inline double digamma(double x) {
  double r = 0.0;
  while (x < 10.0) {
    r -= 1.0 / x;
    x += 1.0;
  }
  double f = 1.0 / (x * x);
  return r + std::log(x) - 0.5 / x -
         f * (1.0 / 12 - f * (1.0 / 120 - f * (1.0 / 252 - f * (1.0 / 240 - f * (1.0 / 132)))));
}
inline double trigamma(double x) {
  double r = 0.0;
  while (x < 10.0) {
    r += 1.0 / (x * x);
    x += 1.0;
  }
  double f = 1.0 / (x * x);
  return r + 1.0 / x + 0.5 * f + f / x * (1.0 / 6 - f * (1.0 / 30 - f * (1.0 / 42 - f / 30)));
}
inline double lgamma_pos(double x) {
  double shift = 0.0;
  while (x < 10.0) {
    shift -= std::log(x);
    x += 1.0;
  }
  double f = 1.0 / (x * x);
  return shift + (x - 0.5) * std::log(x) - x + 0.91893853320467274 +
         (1.0 / 12 - f * (1.0 / 360 - f * (1.0 / 1260 - f / 1680))) / x;
}
inline double gamma_kl(double a, double a0, double lgamma_a0) {
  return (a - a0) * digamma(a) - lgamma_pos(a) + lgamma_a0;
}

// ------------------------------------------------------------------------------------------
// Marsaglia-Tsang for Gamma(alpha + 1): d = alpha + 2/3, c = 1/sqrt(9 d)
// ------------------------------------------------------------------------------------------

// acceptance of candidate e; log_t = log(1 + c e) (reused by the log-Gamma formula)
template <typename T> BB_INLINE bool accepted(T d, T c, T e, T log_u, T& log_t) {
  T t = T(1) + c * e;
  T tc = t > T(0) ? t : T(1e-30);
  log_t = vlog<T>(tc);
  return (t > T(0)) & (log_u < T(0.5) * e * e + d - d * t * t * t + T(3) * d * log_t);
}

// two uniforms from counter ctr: float takes both from one 64-bit draw, double uses two
template <typename T> BB_INLINE void uniform2(uint64_t key, uint64_t ctr, T& a, T& b);
template <> BB_INLINE void uniform2<float>(uint64_t key, uint64_t ctr, float& a, float& b) {
  uint64_t x = draw64(key, ctr);
  a = uniform<float>(x);
  b = (static_cast<float>(static_cast<int32_t>((x >> 8) & 0xFFFFFF)) + 0.5f) *
      5.9604644775390625e-8f;
}
template <> BB_INLINE void uniform2<double>(uint64_t key, uint64_t ctr, double& a, double& b) {
  a = uniform<double>(draw64(key, 2 * ctr));
  b = uniform<double>(draw64(key, 2 * ctr + 1));
}

// proposal r of an entry: a normal candidate (Box-Muller), log U of its acceptance test, and
// log U of the boost (used from proposal 0 only)
template <typename T> struct Proposal {
  T eps, log_u_accept, log_u_boost;
};
template <typename T> BB_INLINE Proposal<T> proposal(uint64_t key, uint64_t base, int r) {
  uint64_t slot = base + 2 * static_cast<uint64_t>(r);
  T u1, u2, ua, ub;
  uniform2<T>(key, slot, u1, u2);
  uniform2<T>(key, slot + 1, ua, ub);
  return {std::sqrt(T(-2) * vlog<T>(u1)) * vcos2pi<T>(u2), vlog<T>(ua), vlog<T>(ub)};
}

template <int FAM> constexpr int gate_blocks() {
  return FAM == CIFG ? 1 : FAM == BETA ? 4 : FAM == BBETA3 ? 3 : FAM == BBETA5 ? 5 : 2;
}
constexpr bool is_beta(int fam) { return fam >= BETA; }

// Gates (i, f) of the Beta families. Per-block values are read as v[k * H + j] (no local arrays,
// so that the loops over j vectorise).
template <typename T, int FAM> struct BetaGates {
  // mean gates from alphas
  static BB_INLINE void from_alpha(const T* a, int64_t H, int64_t j, T& i, T& f) {
    if (FAM == BETA) {
      T a0 = a[j], a1 = a[H + j], a2 = a[2 * H + j], a3 = a[3 * H + j];
      i = a0 / (a0 + a1);
      f = a2 / (a2 + a3);
    } else if (FAM == BBETA3) {
      T a0 = a[j], a1 = a[H + j], a2 = a[2 * H + j];
      i = a0 / (a0 + a2);
      f = a1 / (a1 + a2);
    } else {
      T a0 = a[j], a1 = a[H + j], a2 = a[2 * H + j], a3 = a[3 * H + j], a4 = a[4 * H + j];
      T a13 = a0 + a2, a45 = a3 + a4, a24 = a1 + a3, a35 = a2 + a4;
      i = a13 / (a13 + a45);
      f = a24 / (a24 + a35);
    }
  }
  // (gi, gf) contracted with d(i, f)/d alpha, written to g[k * H + j]
  static BB_INLINE void from_alpha_grad(const T* a, int64_t H, int64_t j, T gi, T gf, T* g) {
    if (FAM == BETA) {
      T a0 = a[j], a1 = a[H + j], a2 = a[2 * H + j], a3 = a[3 * H + j];
      T si = a0 + a1, sf = a2 + a3;
      T qi = gi / (si * si), qf = gf / (sf * sf);
      g[j] = qi * a1;
      g[H + j] = -qi * a0;
      g[2 * H + j] = qf * a3;
      g[3 * H + j] = -qf * a2;
    } else if (FAM == BBETA3) {
      T a0 = a[j], a1 = a[H + j], a2 = a[2 * H + j];
      T si = a0 + a2, sf = a1 + a2;
      T qi = gi / (si * si), qf = gf / (sf * sf);
      g[j] = qi * a2;
      g[H + j] = qf * a2;
      g[2 * H + j] = -qi * a0 - qf * a1;
    } else {
      T a0 = a[j], a1 = a[H + j], a2 = a[2 * H + j], a3 = a[3 * H + j], a4 = a[4 * H + j];
      T ni = a0 + a2, di = a3 + a4, nf = a1 + a3, df = a2 + a4;
      T si = ni + di, sf = nf + df;
      T qi = gi / (si * si), qf = gf / (sf * sf);
      T pi = qi * di, mi = -qi * ni, pf = qf * df, mf = -qf * nf;
      g[j] = pi;
      g[H + j] = pf;
      g[2 * H + j] = pi + mf;
      g[3 * H + j] = mi + pf;
      g[4 * H + j] = mi + mf;
    }
  }
  // sampled gates from log-Gammas l[k * H + j]
  static BB_INLINE void from_log(const T* l, int64_t H, int64_t j, T& i, T& f) {
    if (FAM == BETA) {
      i = sigmoid<T>(l[j] - l[H + j]);
      f = sigmoid<T>(l[2 * H + j] - l[3 * H + j]);
    } else if (FAM == BBETA3) {
      i = sigmoid<T>(l[j] - l[2 * H + j]);
      f = sigmoid<T>(l[H + j] - l[2 * H + j]);
    } else {
      T l0 = l[j], l1 = l[H + j], l2 = l[2 * H + j], l3 = l[3 * H + j], l4 = l[4 * H + j];
      T m02 = l0 > l2 ? l0 : l2, m34 = l3 > l4 ? l3 : l4, m13 = l1 > l3 ? l1 : l3;
      T m24 = l2 > l4 ? l2 : l4;
      T mi = m02 > m34 ? m02 : m34, mf = m13 > m24 ? m13 : m24;
      T ti = vexp<T>(l0 - mi) + vexp<T>(l2 - mi);
      i = ti / (ti + (vexp<T>(l3 - mi) + vexp<T>(l4 - mi)));
      T tf = vexp<T>(l1 - mf) + vexp<T>(l3 - mf);
      f = tf / (tf + (vexp<T>(l2 - mf) + vexp<T>(l4 - mf)));
    }
  }
  // sampled gates, then tail(j, i, f, gi, gf) for their gradients, then (gi, gf) contracted
  // with d(i, f)/d log G times dl[k * H + j] (d log G / d alpha), written to g[k * H + j]
  template <typename F>
  static BB_INLINE void from_log_grad(const T* l, const T* dl, int64_t H, int64_t j, F tail,
                                      T* g) {
    T gi, gf;
    if (FAM == BETA) {
      T i = sigmoid<T>(l[j] - l[H + j]), f = sigmoid<T>(l[2 * H + j] - l[3 * H + j]);
      tail(j, i, f, gi, gf);
      T di = gi * i * (T(1) - i), df = gf * f * (T(1) - f);
      g[j] = di * dl[j];
      g[H + j] = -di * dl[H + j];
      g[2 * H + j] = df * dl[2 * H + j];
      g[3 * H + j] = -df * dl[3 * H + j];
    } else if (FAM == BBETA3) {
      T i = sigmoid<T>(l[j] - l[2 * H + j]), f = sigmoid<T>(l[H + j] - l[2 * H + j]);
      tail(j, i, f, gi, gf);
      T di = gi * i * (T(1) - i), df = gf * f * (T(1) - f);
      g[j] = di * dl[j];
      g[H + j] = df * dl[H + j];
      g[2 * H + j] = (-di - df) * dl[2 * H + j];
    } else {
      T l0 = l[j], l1 = l[H + j], l2 = l[2 * H + j], l3 = l[3 * H + j], l4 = l[4 * H + j];
      T m02 = l0 > l2 ? l0 : l2, m34 = l3 > l4 ? l3 : l4, m13 = l1 > l3 ? l1 : l3;
      T m24 = l2 > l4 ? l2 : l4;
      T mi = m02 > m34 ? m02 : m34, mf = m13 > m24 ? m13 : m24;
      T w0 = vexp<T>(l0 - mi), w2 = vexp<T>(l2 - mi), w3 = vexp<T>(l3 - mi);
      T w4 = vexp<T>(l4 - mi);
      T v1 = vexp<T>(l1 - mf), v2 = vexp<T>(l2 - mf), v3 = vexp<T>(l3 - mf);
      T v4 = vexp<T>(l4 - mf);
      T ti = w0 + w2, bi = w3 + w4, si = ti + bi;
      T tf = v1 + v3, bf = v2 + v4, sf = tf + bf;
      tail(j, ti / si, tf / sf, gi, gf);
      T qi = gi / (si * si), qf = gf / (sf * sf);
      T pi = qi * bi, mni = -qi * ti, pf = qf * bf, mnf = -qf * tf;
      g[j] = pi * w0 * dl[j];
      g[H + j] = pf * v1 * dl[H + j];
      g[2 * H + j] = (pi * w2 + mnf * v2) * dl[2 * H + j];
      g[3 * H + j] = (mni * w3 + pf * v3) * dl[3 * H + j];
      g[4 * H + j] = (mni * w4 + mnf * v4) * dl[4 * H + j];
    }
  }
};

// ------------------------------------------------------------------------------------------
// forward of one row
// ------------------------------------------------------------------------------------------

template <typename T, int FAM, int MODE>
int forward_row(const Params& p, int64_t b, std::vector<T>& buf, std::vector<unsigned char>& rej) {
  constexpr int NB = gate_blocks<FAM>();
  const int64_t H = p.hidden, K = NB + 2;
  const T* z = static_cast<const T*>(p.z) + b * K * H;
  const T* cp = static_cast<const T*>(p.c_prev) + b * H;
  T* hout = static_cast<T*>(p.h) + b * H;
  T* cout = static_cast<T*>(p.c) + b * H;
  T* gates = p.gates ? static_cast<T*>(p.gates) + b * 2 * H : nullptr;
  const T* zg = z + NB * H;
  const T* zo = z + (NB + 1) * H;
  const T aeps = T(p.alpha_eps);

  if constexpr (!is_beta(FAM)) {
    T* noise = (FAM == G2 && MODE != MEAN) ? static_cast<T*>(p.eps) + b * 2 * H : nullptr;
    const T inv_tau = T(1.0 / p.g2_tau);
    if (FAM == G2 && MODE == RNG) {
      const uint64_t key = mix64(p.seed ^ 0xD1B54A32D192ED03ULL);
      const uint64_t base = (p.step * uint64_t(p.batch) + uint64_t(b)) * uint64_t(2 * H);
      const T prob = T(p.g2_prob);
      #pragma omp simd
      for (int64_t j = 0; j < 2 * H; ++j) {
        T u, keep;
        uniform2<T>(key, base + j, u, keep);
        u = u < T(1e-6) ? T(1e-6) : (u > T(1) - T(1e-6) ? T(1) - T(1e-6) : u);
        T logistic = vlog<T>(u) - vlog1p<T>(-u);
        noise[j] = (prob >= T(1) || keep < prob) ? logistic : T(0);
      }
    }
    #pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      T i, f;
      if (FAM == CIFG) {
        i = sigmoid<T>(z[j]);
        f = T(1) - i;
      } else if (FAM == G2) {
        T n0 = MODE == MEAN ? T(0) : noise[j];
        T n1 = MODE == MEAN ? T(0) : noise[H + j];
        i = sigmoid<T>((z[j] + n0) * inv_tau);
        f = sigmoid<T>((z[H + j] + n1) * inv_tau);
      } else {
        i = sigmoid<T>(z[j]);
        f = sigmoid<T>(z[H + j]);
      }
      T g = tanh_<T>(zg[j]);
      T c = f * cp[j] + i * g;
      cout[j] = c;
      hout[j] = sigmoid<T>(zo[j]) * tanh_<T>(c);
      if (gates) {
        gates[j] = i;
        gates[H + j] = f;
      }
    }
    return 0;
  } else {
    const int64_t NH = NB * H;
    T* alpha = buf.data();        // NH
    T* logg = buf.data() + NH;    // NH
    T* eps = MODE == MEAN ? nullptr : static_cast<T*>(p.eps) + b * NH;
    T* lub = MODE == MEAN ? nullptr : static_cast<T*>(p.lub) + b * NH;
    int bad = 0;
    #pragma omp simd
    for (int64_t k = 0; k < NH; ++k) {
      T a = softplus<T>(z[k]) + aeps;
      alpha[k] = a;
      bad |= !(a < std::numeric_limits<T>::infinity());
    }
    if (bad) return 1;
    if (MODE == RNG) {
      const uint64_t key = mix64(p.seed);
      const uint64_t row = (p.step * uint64_t(p.batch) + uint64_t(b)) * uint64_t(NH);
      #pragma omp simd
      for (int64_t k = 0; k < NH; ++k) {
        const uint64_t base = (row + k) * SLOTS;
        T a = alpha[k];
        T d = a + T(2.0 / 3.0);
        T c = T(1) / std::sqrt(T(9) * d);
        Proposal<T> pr = proposal<T>(key, base, 0);
        lub[k] = pr.log_u_boost;
        eps[k] = pr.eps;
        T log_t;
        rej[k] = !accepted<T>(d, c, pr.eps, pr.log_u_accept, log_t);
        logg[k] = vlog<T>(d) + T(3) * log_t + pr.log_u_boost / a;
      }
      for (int64_t k = 0; k < NH; ++k) {  // the few rejected entries: further proposals
        if (!rej[k]) continue;
        const uint64_t base = (row + k) * SLOTS;
        T d = alpha[k] + T(2.0 / 3.0);
        T c = T(1) / std::sqrt(T(9) * d);
        int r = 1;
        for (; r < MAX_PROPOSALS; ++r) {
          Proposal<T> pr = proposal<T>(key, base, r);
          T log_t;
          if (accepted<T>(d, c, pr.eps, pr.log_u_accept, log_t)) {
            eps[k] = pr.eps;
            logg[k] = vlog<T>(d) + T(3) * log_t + lub[k] / alpha[k];
            break;
          }
        }
        if (r == MAX_PROPOSALS) return 2;
      }
    }
    if (MODE == NOISE_IN) {
      #pragma omp simd
      for (int64_t k = 0; k < NH; ++k) {
        T a = alpha[k];
        T d = a + T(2.0 / 3.0);
        T c = T(1) / std::sqrt(T(9) * d);
        logg[k] = vlog<T>(d) + T(3) * vlog1p<T>(c * eps[k]) + lub[k] / a;
      }
    }
    if (MODE == RNG && p.save_log) {
      #pragma omp simd
      for (int64_t k = 0; k < NH; ++k) {
        T a = alpha[k];
        T d = a + T(2.0 / 3.0);
        T c = T(1) / std::sqrt(T(9) * d);
        T ce = c * eps[k];
        T dlda = T(1) / d - T(1.5) * ce / (d * (T(1) + ce)) - lub[k] / (a * a);
        eps[k] = logg[k];
        lub[k] = dlda;
      }
    }
    #pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      T i, f;
      if (MODE == MEAN) {
        BetaGates<T, FAM>::from_alpha(alpha, H, j, i, f);
      } else {
        BetaGates<T, FAM>::from_log(logg, H, j, i, f);
      }
      T g = tanh_<T>(zg[j]);
      T c = f * cp[j] + i * g;
      cout[j] = c;
      hout[j] = sigmoid<T>(zo[j]) * tanh_<T>(c);
      if (gates) {
        gates[j] = i;
        gates[H + j] = f;
      }
    }
    if (p.kl) {
      T* kl = static_cast<T*>(p.kl) + b * H;
      const double a0 = p.kl_alpha0, lg0 = lgamma_pos(a0);
      for (int64_t j = 0; j < H; ++j) {
        double s = 0.0;
        BB_UNROLL for (int k = 0; k < NB; ++k) s += gamma_kl(double(alpha[k * H + j]), a0, lg0);
        kl[j] = T(s);
      }
    }
    return 0;
  }
}

// ------------------------------------------------------------------------------------------
// backward of one row (recomputes the forward from z, c_prev and the noise)
// ------------------------------------------------------------------------------------------

template <typename T, int FAM, int MODE>
int backward_row(const Params& p, int64_t b, std::vector<T>& buf) {
  constexpr int NB = gate_blocks<FAM>();
  const int64_t H = p.hidden, K = NB + 2;
  const T* z = static_cast<const T*>(p.z) + b * K * H;
  const T* cp = static_cast<const T*>(p.c_prev) + b * H;
  const T* gh = p.grad_h ? static_cast<const T*>(p.grad_h) + b * H : nullptr;
  const T* gcn = p.grad_c ? static_cast<const T*>(p.grad_c) + b * H : nullptr;
  T* gz = static_cast<T*>(p.grad_z) + b * K * H;
  T* gcp = static_cast<T*>(p.grad_c_prev) + b * H;
  const T* zg = z + NB * H;
  const T* zo = z + (NB + 1) * H;
  T* gzg = gz + NB * H;
  T* gzo = gz + (NB + 1) * H;
  const T aeps = T(p.alpha_eps);

  // shared tail: from (i, f) and the rest, the gradients of z_g, z_o, c_prev, i, f
  auto tail = [&](int64_t j, T i, T f, T& gi, T& gf) {
    T g = tanh_<T>(zg[j]);
    T o = sigmoid<T>(zo[j]);
    T c = f * cp[j] + i * g;
    T tc = tanh_<T>(c);
    T dh = gh ? gh[j] : T(0);
    T dc = (gcn ? gcn[j] : T(0)) + dh * o * (T(1) - tc * tc);
    gzo[j] = dh * tc * o * (T(1) - o);
    gzg[j] = dc * i * (T(1) - g * g);
    gcp[j] = dc * f;
    gi = dc * g;
    gf = dc * cp[j];
  };

  if constexpr (!is_beta(FAM)) {
    const T* noise = (FAM == G2 && MODE != MEAN) ? static_cast<const T*>(p.eps) + b * 2 * H
                                                 : nullptr;
    const T inv_tau = T(1.0 / p.g2_tau);
    #pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      T i, f, gi, gf;
      if (FAM == CIFG) {
        i = sigmoid<T>(z[j]);
        f = T(1) - i;
        tail(j, i, f, gi, gf);
        gz[j] = (gi - gf) * i * (T(1) - i);
      } else if (FAM == G2) {
        T n0 = MODE == MEAN ? T(0) : noise[j];
        T n1 = MODE == MEAN ? T(0) : noise[H + j];
        i = sigmoid<T>((z[j] + n0) * inv_tau);
        f = sigmoid<T>((z[H + j] + n1) * inv_tau);
        tail(j, i, f, gi, gf);
        gz[j] = gi * i * (T(1) - i) * inv_tau;
        gz[H + j] = gf * f * (T(1) - f) * inv_tau;
      } else {
        i = sigmoid<T>(z[j]);
        f = sigmoid<T>(z[H + j]);
        tail(j, i, f, gi, gf);
        gz[j] = gi * i * (T(1) - i);
        gz[H + j] = gf * f * (T(1) - f);
      }
    }
    return 0;
  } else {
    const int64_t NH = NB * H;
    T* alpha = buf.data();
    T* logg = buf.data() + NH;
    T* dldA = buf.data() + 2 * NH;  // d log G / d alpha
    const T* eps = MODE == MEAN ? nullptr : static_cast<const T*>(p.eps) + b * NH;
    const T* lub = MODE == MEAN ? nullptr : static_cast<const T*>(p.lub) + b * NH;
    if (MODE == MEAN || p.save_log) {
      #pragma omp simd
      for (int64_t k = 0; k < NH; ++k) alpha[k] = softplus<T>(z[k]) + aeps;
      if (p.save_log) {  // saved by the forward
        logg = const_cast<T*>(eps);
        dldA = const_cast<T*>(lub);
      }
    } else {
      #pragma omp simd
      for (int64_t k = 0; k < NH; ++k) {
        T a = softplus<T>(z[k]) + aeps;
        alpha[k] = a;
        T d = a + T(2.0 / 3.0);
        T c = T(1) / std::sqrt(T(9) * d);
        T ce = c * eps[k];
        logg[k] = vlog<T>(d) + T(3) * vlog1p<T>(ce) + lub[k] / a;
        dldA[k] = T(1) / d - T(1.5) * ce / (d * (T(1) + ce)) - lub[k] / (a * a);
      }
    }
    #pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      if (MODE == MEAN) {  // d/d alpha for now
        T i, f, gi, gf;
        BetaGates<T, FAM>::from_alpha(alpha, H, j, i, f);
        tail(j, i, f, gi, gf);
        BetaGates<T, FAM>::from_alpha_grad(alpha, H, j, gi, gf, gz);
      } else {
        BetaGates<T, FAM>::from_log_grad(logg, dldA, H, j, tail, gz);
      }
    }
    if (p.grad_kl) {
      const T* gkl = static_cast<const T*>(p.grad_kl) + b * H;
      const double a0 = p.kl_alpha0;
      for (int64_t k = 0; k < NH; ++k) {
        double w = double(gkl[k % H]);
        if (w != 0.0) {
          double a = double(alpha[k]);
          gz[k] += T(w * (a - a0) * trigamma(a));
        }
      }
    }
    #pragma omp simd
    for (int64_t k = 0; k < NH; ++k) gz[k] *= sigmoid<T>(z[k]);  // d alpha / d z
    return 0;
  }
}

// ------------------------------------------------------------------------------------------
// dispatch over rows (OpenMP when the batch is large enough to pay for it)
// ------------------------------------------------------------------------------------------

template <typename T, int FAM, int MODE> int forward_all(const Params& p) {
  constexpr int NB = gate_blocks<FAM>();
  const int64_t NH = NB * p.hidden;
  int status = 0;
  // Threads only for large steps: a parallel region whose thread is descheduled on a busy CPU
  // stalls the whole step, which costs more than it saves on small batches.
  const bool parallel = p.batch * NH * (MODE == RNG ? 8 : 4) >= 131072;
#pragma omp parallel if (parallel) reduction(max : status)
  {
    std::vector<T> buf(2 * NH);
    std::vector<unsigned char> rej(MODE == RNG ? NH : 0);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < p.batch; ++b) {
      int s = forward_row<T, FAM, MODE>(p, b, buf, rej);
      status = s > status ? s : status;
    }
  }
  return status;
}

template <typename T, int FAM, int MODE> int backward_all(const Params& p) {
  constexpr int NB = gate_blocks<FAM>();
  const int64_t NH = NB * p.hidden;
  const bool parallel = p.batch * NH * 4 >= 131072;
#pragma omp parallel if (parallel)
  {
    std::vector<T> buf(3 * NH);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < p.batch; ++b) backward_row<T, FAM, MODE>(p, b, buf);
  }
  return 0;
}

template <typename T, int MODE> int forward_family(int family, const Params& p) {
  switch (family) {
    case LSTM: return forward_all<T, LSTM, MODE>(p);
    case CIFG: return forward_all<T, CIFG, MODE>(p);
    case G2: return forward_all<T, G2, MODE>(p);
    case BETA: return forward_all<T, BETA, MODE>(p);
    case BBETA3: return forward_all<T, BBETA3, MODE>(p);
    case BBETA5: return forward_all<T, BBETA5, MODE>(p);
  }
  return -1;
}
template <typename T, int MODE> int backward_family(int family, const Params& p) {
  switch (family) {
    case LSTM: return backward_all<T, LSTM, MODE>(p);
    case CIFG: return backward_all<T, CIFG, MODE>(p);
    case G2: return backward_all<T, G2, MODE>(p);
    case BETA: return backward_all<T, BETA, MODE>(p);
    case BBETA3: return backward_all<T, BBETA3, MODE>(p);
    case BBETA5: return backward_all<T, BBETA5, MODE>(p);
  }
  return -1;
}

template <typename T> int forward(int family, int mode, const Params& p) {
  switch (mode) {
    case MEAN: return forward_family<T, MEAN>(family, p);
    case NOISE_IN: return forward_family<T, NOISE_IN>(family, p);
    case RNG: return forward_family<T, RNG>(family, p);
  }
  return -1;
}
// backward: the noise is always an input (saved by the forward)
template <typename T> int backward(int family, int mode, const Params& p) {
  return mode == MEAN ? backward_family<T, MEAN>(family, p)
                      : backward_family<T, NOISE_IN>(family, p);
}

}  // namespace

extern "C" {
// Returns 0 on success, 1 on a non-finite Gamma concentration, 2 when every Marsaglia proposal
// of an entry was rejected, -1 on a bad family or mode.
int bb_fused_forward_f32(int family, int mode, const Params* p) {
  return forward<float>(family, mode, *p);
}
int bb_fused_forward_f64(int family, int mode, const Params* p) {
  return forward<double>(family, mode, *p);
}
int bb_fused_backward_f32(int family, int mode, const Params* p) {
  return backward<float>(family, mode, *p);
}
int bb_fused_backward_f64(int family, int mode, const Params* p) {
  return backward<double>(family, mode, *p);
}
int bb_fused_num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
}
