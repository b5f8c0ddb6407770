// CPU kernels of the `cpp` backend: cross entropy straight from the logits, segment sums, and the
// group softmax / SteerLM 2.0 weights of the baseline phase.
//
// Vectorisation: ATen's at::vec::Vectorized<float> (16 lanes under AVX-512, 8 under AVX2, a
// scalar fallback otherwise; setup.py picks the flags and defines CPU_CAPABILITY_*), with an
// inlined ~1-ulp exp (vexp below). bf16/fp16 logits are read once and widened to
// float32 in registers; every sum is accumulated in float32.
//
// Threading: OpenMP over rows. A row is computed start to finish by one thread in a fixed
// order, so results are bit-identical for every thread count and schedule. Row offsets are
// int64_t (row * stride), so N*V beyond 2**31 is fine.
#include "cpu_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace steerlm {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();  // float lanes per vector
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Forward: a row is streamed in chunks of kChunk elements through a per-thread float32 buffer
// (8 KiB, stays in L1). Pass 1 over the chunk widens it into the buffer and takes its max;
// pass 2 (from L1) adds exp(x - m). The logits themselves are read from memory once.
constexpr int64_t kChunk = 2048;

// Work per OpenMP task (elements); smaller problems run on the calling thread alone.
constexpr int64_t kGrainElems = 1 << 16;
constexpr int64_t kSerialElems = 1 << 15;

// ---- widening loads / narrowing stores of one or two float vectors ----------------------------

template <typename T>
inline Vec load_f32(const T* p);
template <>
inline Vec load_f32<float>(const float* p) {
  return Vec::loadu(p);
}
template <>
inline Vec load_f32<c10::BFloat16>(const c10::BFloat16* p) {
  Vec v;
  at::vec::load_to_float<c10::BFloat16>(p, v);  // kW bf16 -> kW floats (a shift per lane)
  return v;
}
template <>
inline Vec load_f32<c10::Half>(const c10::Half* p) {
  Vec v;
  at::vec::load_to_float<c10::Half>(p, v);  // kW fp16 -> kW floats (vcvtph2ps)
  return v;
}

// Store 2*kW values: float directly, bf16/fp16 rounded to nearest even (as Tensor.to does).
template <typename T>
inline void store_2x(T* p, const Vec& a, const Vec& b) {
  at::vec::convert_from_float<T>(a, b).store(p);
}
template <>
inline void store_2x<float>(float* p, const Vec& a, const Vec& b) {
  a.store(p);
  b.store(p + kW);
}

// exp(x) lane-wise, inlined (no call per vector, unlike Sleef's expf): Cephes' expf scheme,
// ~1 ulp. x = n*ln2 + r with |r| <= ln2/2 (ln2 split in two so the reduction is exact), a
// degree-7 Horner polynomial for exp(r), and 2^n written into the exponent bits: adding
// 1.5 * 2^23 to x*log2(e) rounds it to the integer n and leaves n in the low mantissa bits, so
// ((bits + 127) << 23) is the float 2^n. x is clamped to [-88, 88.376] first (n in [-127, 127]):
// below, 2^n is 0 (exp(-inf) = 0; denormal results flush to 0, harmless next to a sum >= 1);
// above it saturates at exp(88.376) (our arguments are x - max or x - lse, never > ~0).
// NaN in gives NaN out. AVX-512 / AVX2 intrinsics (about 20 instructions); ATen's exp otherwise.
constexpr float kExpLo = -88.f, kExpHi = 88.3762626647949f, kLog2e = 1.44269504088896341f;
constexpr float kMagic = 12582912.f;  // 1.5 * 2^23
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f;
constexpr float kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

#if defined(CPU_CAPABILITY_AVX512)
inline Vec vexp(const Vec& xv) {
  const __m512 x = xv;
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kExpLo)), _mm512_set1_ps(kExpHi));
  const __m512 t = _mm512_fmadd_ps(xc, _mm512_set1_ps(kLog2e), _mm512_set1_ps(kMagic));
  const __m512 n = _mm512_sub_ps(t, _mm512_set1_ps(kMagic));
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kP0), r, _mm512_set1_ps(kP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP5));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127)), 23);
  const __m512 y = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
  return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline Vec vexp(const Vec& xv) {
  const __m256 x = xv;
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpLo)), _mm256_set1_ps(kExpHi));
  const __m256 t = _mm256_fmadd_ps(xc, _mm256_set1_ps(kLog2e), _mm256_set1_ps(kMagic));
  const __m256 n = _mm256_sub_ps(t, _mm256_set1_ps(kMagic));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kP0), r, _mm256_set1_ps(kP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP5));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
#else
inline Vec vexp(const Vec& x) { return x.exp(); }
#endif

// Lane-wise max without ATen's NaN bookkeeping (a plain vmaxps): the forward does not need the
// max to see NaN, because exp(NaN - m) is NaN and poisons the row's sum anyway.
inline Vec fast_max(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}

// Horizontal reductions in a fixed lane order (deterministic).
inline float hsum(const Vec& v) {
  alignas(64) float lanes[kW];
  v.store(lanes);
  float s = 0.f;
  for (int64_t i = 0; i < kW; ++i) s += lanes[i];
  return s;
}
inline float hmax(const Vec& v) {
  alignas(64) float lanes[kW];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t i = 1; i < kW; ++i) m = (std::isnan(lanes[i]) || lanes[i] > m) ? lanes[i] : m;  // NaN sticks
  return m;
}

// ---- the logit transform (softcap / logit_scale) -----------------------------------------------
//
// z' = cap * tanh(pre * x) (K = 2: a softcap, pre = scale / cap) or pre * x (K = 1: a scale
// only, pre = scale), dz'/dx = scale * sech^2(pre * x) or pre. K is a template parameter: the
// plain kernels (K = 0) compile exactly as before.
struct Xform {
  float pre = 1.f;    // the factor inside
  float cap = 0.f;    // the softcap (K = 2)
  float scale = 1.f;  // the slope's factor (K = 2)
};

// (tanh y, sech^2 y) lane-wise, as the Triton kernels compute them: e = exp(-2|y|) (never
// overflows), tanh|y| = (1 - e) / (1 + e), sech^2 = 4e / (1 + e)^2 (no cancellation as tanh
// saturates); below |y| = 0.2 the odd Taylor series to y^7 (1 - e cancels there). NaN gives NaN.
inline void vtanh_sech2(const Vec& y, Vec& t, Vec& s2) {
  const Vec a = y.abs();
  const Vec e = vexp(a * Vec(-2.f));
  const Vec one_e = Vec(1.f) + e;
  const Vec a2 = a * a;
  const Vec series = a + a * a2 * (Vec(-0.333333333333f) + a2 * (Vec(0.133333333333f) + a2 * Vec(-0.0539682539683f)));
  Vec ta = Vec::blendv((Vec(1.f) - e) / one_e, series, a < Vec(0.2f));
  t = Vec::blendv(ta, ta.neg(), y < Vec(0.f));
  s2 = (Vec(4.f) * e) / (one_e * one_e);
}

// z' of x, and (with `slope`) dz'/dx, lane-wise.
template <int K>
inline Vec vtransform(const Vec& x, const Xform& f, Vec* slope = nullptr) {
  if constexpr (K == 0) {
    return x;
  } else if constexpr (K == 1) {
    if (slope) *slope = Vec(f.pre);
    return x * Vec(f.pre);
  } else {
    Vec t, s2;
    vtanh_sech2(x * Vec(f.pre), t, s2);
    if (slope) *slope = s2 * Vec(f.scale);
    return t * Vec(f.cap);
  }
}

// The same for one value (the lane-wise code on a broadcast: every element, vector or tail,
// goes through the same arithmetic).
template <int K>
inline float transform1(float x, const Xform& f, float* slope = nullptr) {
  if constexpr (K == 0) {
    return x;
  } else {
    Vec sv;
    const Vec z = vtransform<K>(Vec(x), f, &sv);
    alignas(64) float lanes[kW];
    if (slope) {
      sv.store(lanes);
      *slope = lanes[0];
    }
    z.store(lanes);
    return lanes[0];
  }
}

// ---- per-row kernels --------------------------------------------------------------------------

// The statistics of one row, relative to its max: m = max(x) (0 for a row of -inf only) and
// lse = log(sum(exp(x - m))), never added together (m + lse would round lse away when |m| is
// large: at m = 1e8 a float32 ulp is 8). Single pass over memory (see kChunk). `buf` holds
// kChunk + kW floats. The running max m is a scalar per row; the running sum is a vector of
// per-lane partial sums, rescaled by exp(m_old - m_new) only when a chunk raises the max.
// NaN anywhere gives lse NaN; a row of -inf gives m = 0, lse = -inf; +inf gives lse NaN
// (inf - inf), as the Triton kernel does (and as F.cross_entropy's loss does).
struct RowStats {
  float m;
  float lse;
};

template <int K, typename T>
RowStats row_stats(const T* x, int64_t V, float* buf, const Xform& f) {
  float m = kNegInf;
  Vec acc(0.f);
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t len = std::min(kChunk, V - c0);
    int64_t nv = len / kW * kW;
    Vec vmax(kNegInf);
    for (int64_t j = 0; j < nv; j += kW) {
      Vec v = vtransform<K>(load_f32(x + c0 + j), f);
      v.store(buf + j);
      vmax = fast_max(vmax, v);
    }
    if (nv < len) {  // tail: widen scalar-wise, pad the last vector with -inf (exp -> 0)
      for (int64_t j = nv; j < len; ++j) buf[j] = static_cast<float>(x[c0 + j]);
      if constexpr (K != 0) {  // transform the tail's lanes as whole vectors, then pad (softcap(-inf) = -cap)
        for (int64_t j = len; j < nv + kW; ++j) buf[j] = 0.f;
        vtransform<K>(Vec::loadu(buf + nv), f).store(buf + nv);
      }
      for (int64_t j = len; j < nv + kW; ++j) buf[j] = kNegInf;
      vmax = fast_max(vmax, Vec::loadu(buf + nv));
      nv += kW;
    }
    const float cm = hmax(vmax);
    // +inf (inf - inf; or a NaN the max happened to keep): the row's lse is NaN, as in PyTorch,
    // and the rest need not be read. Other NaNs reach the sum through exp.
    if (std::isnan(cm) || cm == -kNegInf) return {cm, std::numeric_limits<float>::quiet_NaN()};
    const float m_new = std::max(m, cm);
    if (m_new == kNegInf) continue;  // everything so far is -inf: nothing to add
    if (m_new > m) {
      acc = acc * Vec(std::exp(m - m_new));  // m == -inf -> factor 0
      m = m_new;
    }
    const Vec mv(m);
    Vec acc2(0.f);  // two accumulators: shorter add dependency chains
    int64_t j = 0;
    for (; j + 2 * kW <= nv; j += 2 * kW) {
      acc = acc + vexp(Vec::loadu(buf + j) - mv);
      acc2 = acc2 + vexp(Vec::loadu(buf + j + kW) - mv);
    }
    if (j < nv) acc = acc + vexp(Vec::loadu(buf + j) - mv);
    acc = acc + acc2;
  }
  if (m == kNegInf) return {0.f, kNegInf};  // a row of -inf only: s = 0
  return {m, std::log(hsum(acc))};
}

// One row of the gradient: out = exp((x - m) - lse) * c, then
// out[local] = (exp((x[local] - m) - lse) - 1) * c (local < 0: the label is not in this shard).
// x - m is exact for every logit that matters (Sterbenz), so a large common offset costs nothing.
// x[local] is read before the row is written, and every vector is read before it is stored, so
// out == x (in place) is safe.
// With a transform (K != 0): z' = transform(x) replaces x, and each element is multiplied by its
// slope dz'/dx, in float32 before the single rounding.
template <int K, typename T>
void row_grad(const T* x, T* out, int64_t V, float m, float lse, float c, int64_t local, const Xform& f) {
  float slope_local = 1.f;
  const float x_local = local >= 0 ? transform1<K>(static_cast<float>(x[local]), f, &slope_local) : 0.f;
  const Vec mv(m), lv(lse), cv(c);
  int64_t j = 0;
  for (; j + 2 * kW <= V; j += 2 * kW) {
    if constexpr (K == 0) {
      const Vec a = vexp((load_f32(x + j) - mv) - lv) * cv;
      const Vec b = vexp((load_f32(x + j + kW) - mv) - lv) * cv;
      store_2x(out + j, a, b);
    } else {
      Vec sa, sb;
      const Vec za = vtransform<K>(load_f32(x + j), f, &sa);
      const Vec zb = vtransform<K>(load_f32(x + j + kW), f, &sb);
      store_2x(out + j, vexp((za - mv) - lv) * cv * sa, vexp((zb - mv) - lv) * cv * sb);
    }
  }
  for (; j < V; ++j) {
    float sj = 1.f;
    const float zj = transform1<K>(static_cast<float>(x[j]), f, &sj);
    out[j] = static_cast<T>(std::exp((zj - m) - lse) * c * sj);
  }
  if (local >= 0) out[local] = static_cast<T>((std::exp((x_local - m) - lse) - 1.f) * c * slope_local);
}

// Label of row i as int64 (labels are int32 or int64, contiguous).
struct Labels {
  const int32_t* i32 = nullptr;
  const int64_t* i64 = nullptr;
  explicit Labels(const at::Tensor& t) {
    if (t.scalar_type() == at::kLong) i64 = t.data_ptr<int64_t>();
    else i32 = t.data_ptr<int32_t>();
  }
  int64_t operator[](int64_t i) const { return i64 ? i64[i] : static_cast<int64_t>(i32[i]); }
};

// The transform's kernel parameters from the contract's (softcap, scale): softcap 0 = none,
// scale 1 = none (pre = scale / softcap rounded once to float32, as the Triton launchers do).
Xform make_xform(double softcap, double scale, int& kind) {
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), "softcap must be finite and >= 0 (0: none), got ", softcap);
  TORCH_CHECK(scale > 0.0 && std::isfinite(scale), "scale must be finite and > 0, got ", scale);
  Xform f;
  if (softcap > 0.0) {
    kind = 2;
    f.pre = static_cast<float>(scale / softcap);
    f.cap = static_cast<float>(softcap);
    f.scale = static_cast<float>(scale);
  } else if (scale != 1.0) {
    kind = 1;
    f.pre = static_cast<float>(scale);
  } else {
    kind = 0;
  }
  return f;
}

// Threads for `elems` units of work: 1 for small problems (no fork/join cost), else torch's
// intra-op thread count (torch.set_num_threads is honoured).
int n_threads(int64_t elems) {
  return elems < kSerialElems ? 1 : std::max(1, at::get_num_threads());
}

void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(logits.dim() == 2, name, " must be 2-D [N, V], got ", logits.dim(), "-D");
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, name, " must have unit column stride");
}

at::Tensor check_rows(const at::Tensor& t, int64_t n, const char* name, bool is_label) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ", t.sizes());
  if (is_label) {
    TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name,
                " must be int32 or int64, got ", t.scalar_type());
    return t.contiguous();
  }
  return t.to(at::kFloat).contiguous();  // no copy when already contiguous float32
}

// All rows of the forward: (m, lse, target) per row, ignored rows skipped (0/0/0, never read).
template <int K, typename T>
void forward_rows(const T* base, int64_t N, int64_t V, int64_t stride, Labels lab, int64_t vocab_start,
                  int64_t ignore_index, float* max_p, float* lse_p, float* tgt_p, const Xform& f) {
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(V, 1));
#pragma omp parallel num_threads(n_threads(N * V))
  {
    alignas(64) float buf[kChunk + kW];  // per-thread widening buffer (see kChunk)
#pragma omp for schedule(dynamic, grain)
    for (int64_t i = 0; i < N; ++i) {
      const int64_t label = lab[i];
      if (label == ignore_index) {
        max_p[i] = 0.f;
        lse_p[i] = 0.f;
        tgt_p[i] = 0.f;
        continue;
      }
      const T* row = base + i * stride;  // int64 offset
      const RowStats st = row_stats<K>(row, V, buf, f);
      max_p[i] = st.m;
      lse_p[i] = st.lse;
      const int64_t local = label - vocab_start;
      tgt_p[i] = (local >= 0 && local < V) ? transform1<K>(static_cast<float>(row[local]), f) : 0.f;
    }
  }
}

// All rows of the backward. Rows with coef == 0 (after forcing ignored labels to 0) are zeroed
// with memset (+0.0 is all-zero bits in every dtype) and their logits are not read.
template <int K, typename T>
void backward_rows(const T* base, T* obase, int64_t N, int64_t V, int64_t stride, int64_t out_stride,
                   Labels lab, const float* max_p, const float* lse_p, const float* coef_p, int64_t vocab_start,
                   int64_t ignore_index, const Xform& f) {
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(V, 1));
#pragma omp parallel for num_threads(n_threads(N * V)) schedule(dynamic, grain)
  for (int64_t i = 0; i < N; ++i) {
    const int64_t label = lab[i];
    const float c = label == ignore_index ? 0.f : coef_p[i];
    T* orow = obase + i * out_stride;
    if (c == 0.f) {
      std::memset(static_cast<void*>(orow), 0, sizeof(T) * V);
      continue;
    }
    const int64_t local = label - vocab_start;
    row_grad<K>(base + i * stride, orow, V, max_p[i], lse_p[i], c, (local >= 0 && local < V) ? local : -1, f);
  }
}

// Advise transparent huge pages for a large output buffer that is about to be written for the
// first time (a fresh gradient from torch.empty): the first touch then costs one page fault per
// 2 MiB instead of one per 4 KiB, which is a large share of the backward on small machines.
// Advice only: a no-op where THP is disabled or the pages already exist.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// ---- group ops (SteerLM 2.0) ------------------------------------------------------------------

constexpr float kGroupEps = 1e-8f;  // NeMo's epsilon, rounded to float32 as `ws + 1e-8` does

// A 1-D floating vector (of n elements when n >= 0) as contiguous float32 (no copy when it
// already is one; float64 / bf16 / fp16 are rounded to float32 first, as the torch reference's
// .float() does).
at::Tensor check_vector(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(n < 0 || t.size(0) == n, name, " must have ", n, " elements, got ", t.size(0));
  return t.to(at::kFloat).contiguous();
}

// Group offsets as int64: 1-D int32/int64 [G+1], cu[0] == 0, non-decreasing, cu[G] == B.
// Checked in full (O(G), serial) so that the kernels never read or write out of bounds.
at::Tensor check_groups(const at::Tensor& cu_in, int64_t B) {
  TORCH_CHECK(cu_in.device().is_cpu(), "cu_groups must be a CPU tensor");
  TORCH_CHECK(cu_in.dim() == 1 && cu_in.size(0) >= 1, "cu_groups must be 1-D with at least one entry");
  TORCH_CHECK(cu_in.scalar_type() == at::kLong || cu_in.scalar_type() == at::kInt,
              "cu_groups must be int32 or int64, got ", cu_in.scalar_type());
  const at::Tensor cu = cu_in.to(at::kLong).contiguous();
  const int64_t* c = cu.data_ptr<int64_t>();
  const int64_t G = cu.size(0) - 1;
  TORCH_CHECK(c[0] == 0 && c[G] == B, "cu_groups must run from 0 to ", B, ", got ", c[0], " .. ", c[G]);
  bool sorted = true;
  for (int64_t g = 0; g < G; ++g) sorted &= c[g] <= c[g + 1];
  TORCH_CHECK(sorted, "cu_groups must be non-decreasing");
  return cu;
}

// f(i, count) for i = 0, kW, 2*kW, ... < n: count = kW, except a shorter tail. Vector code reads
// and writes [i, i + count) with Vec::loadu(p + i, count) / store(p + i, count), so every element
// goes through the same lane-wise code and no result depends on where an element falls.
template <typename F>
inline void for_vectors(int64_t n, F f) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) f(i, kW);
  if (i < n) f(i, n - i);
}

// Items per block of consecutive groups: the few passes over a block stay in L1.
constexpr int64_t kGroupBlockItems = 1024;

// Call block(ga, gb, scratch) for consecutive runs of groups [ga, gb) covering [0, G), in
// parallel: each thread takes the groups that start in its 1/T of the items (balanced by items,
// not groups), cut into blocks of about kGroupBlockItems items (a larger group is a block of its
// own); `scratch` is the thread's own buffer, for block() to size and use. Every group is
// handled by exactly one call, and no result depends on the partition.
template <typename Block>
void for_group_blocks(const int64_t* c, int64_t G, int64_t B, Block block) {
#pragma omp parallel num_threads(n_threads(B))
  {
    std::vector<float> scratch;
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
#else
    const int64_t t = 0, T = 1;
#endif
    // First group starting at or after item i (c[0:G] are the starts, non-decreasing).
    const auto first_at = [&](int64_t i) { return static_cast<int64_t>(std::lower_bound(c, c + G, i) - c); };
    const auto split = [&](int64_t k) { return B / T * k + B % T * k / T; };  // floor(B * k / T)
    int64_t g = t == 0 ? 0 : first_at(split(t));
    const int64_t g_end = t + 1 == T ? G : first_at(split(t + 1));
    while (g < g_end) {
      int64_t ge = g + 1;
      while (ge < g_end && c[ge + 1] - c[g] <= kGroupBlockItems) ++ge;
      block(g, ge, scratch);
      g = ge;
    }
  }
}

// Scratch of a block of n items: two float arrays of n + kW (the kW slack lets a group of at
// most kW items be read and written as one whole vector), the slack zeroed.
struct GroupScratch {
  float* x;    // [n + kW] the block's logits in, exp(x - group max) out; then free
  float* tmp;  // [n + kW] each item's group max, then group sum
  GroupScratch(std::vector<float>& buf, int64_t n) {
    if (static_cast<int64_t>(buf.size()) < 2 * (n + kW)) buf.resize(2 * (n + kW));
    x = buf.data();
    tmp = x + n + kW;
    std::fill(x + n, x + n + kW, 0.f);
    std::fill(tmp + n, tmp + n + kW, 0.f);
  }
};

// Reduce one group's items v[0:L] (L >= 1, v[L:kW] readable) with op, lanes past the group
// filled with `fill`: a group of at most kW items as one masked vector (no data-dependent branch:
// groups are mostly a few items of varying size, where scalar loops mispredict at every group),
// a larger one with one vector accumulator and a masked tail. Then a fixed tree over the lanes:
// the order depends only on L (and the build's vector width), never on threads or blocks.
template <typename Op>
inline float group_reduce(const float* v, int64_t L, float fill, Op op) {
  const Vec fv(fill);
  if (L <= kW) {
    const Vec lane_in = Vec::arange(0.f, 1.f) < Vec(static_cast<float>(L));
    return at::vec::vec_reduce_all<float>(op, Vec::blendv(fv, Vec::loadu(v), lane_in));
  }
  Vec acc = Vec::loadu(v);
  int64_t i = kW;
  for (; i + kW <= L; i += kW) acc = op(acc, Vec::loadu(v + i));
  acc = op(acc, Vec::blendv(fv, Vec::loadu(v + i, L - i), Vec::arange(0.f, 1.f) < Vec(static_cast<float>(L - i))));
  return at::vec::vec_reduce_all<float>(op, acc);
}

// dst[0:L] = value, as whole vectors (dst has kW slack; later groups overwrite the spill, since
// groups are handled in order).
inline void group_fill(float* dst, int64_t L, float value) {
  const Vec v(value);
  for (int64_t i = 0; i < L; i += kW) v.store(dst + i);
}

// The group softmax numerators and denominators of a block [c[ga], c[gb]) held in sc.x: on
// return sc.x[i] = exp(x_i - m_g) and sc.tmp[i] = sum over the group of those (the caller
// divides). Same formula as the torch reference (max-subtracted exp, then e / sum(e)).
// exp is vexp: results below ~1e-38 flush to 0 (no denormals, which cost ~100 cycles each and
// are common here: logits spread over hundreds of nats). The max is a plain max, which may drop
// a NaN; such a group still comes out all NaN, through exp and the sum. A +inf item, or a group
// of -inf only, gives inf - inf = NaN, as in torch.
void group_exp_block(const int64_t* c, int64_t ga, int64_t gb, const GroupScratch& sc) {
  const int64_t s = c[ga], n = c[gb] - s;
  const auto vmax = [](const Vec& a, const Vec& b) { return fast_max(a, b); };
  const auto vadd = [](const Vec& a, const Vec& b) { return a + b; };
  for (int64_t g = ga; g < gb; ++g) {
    const int64_t o = c[g] - s, L = c[g + 1] - c[g];
    if (L > 0) group_fill(sc.tmp + o, L, group_reduce(sc.x + o, L, kNegInf, vmax));
  }
  for_vectors(n, [&](int64_t i, int64_t k) {
    vexp(Vec::loadu(sc.x + i, k) - Vec::loadu(sc.tmp + i, k)).store(sc.x + i, k);
  });
  for (int64_t g = ga; g < gb; ++g) {
    const int64_t o = c[g] - s, L = c[g + 1] - c[g];
    if (L > 0) group_fill(sc.tmp + o, L, group_reduce(sc.x + o, L, 0.f, vadd));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_forward_cpu(
    const at::Tensor& logits, const at::Tensor& labels_in, int64_t vocab_start, int64_t ignore_index, double softcap,
    double scale) {
  check_logits(logits, "logits");
  const int64_t N = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  const at::Tensor labels = check_rows(labels_in, N, "labels", true);
  int kind = 0;
  const Xform f = make_xform(softcap, scale, kind);
  at::Tensor row_max = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor target = at::empty({N}, logits.options().dtype(at::kFloat));
  float* max_p = row_max.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  float* tgt_p = target.data_ptr<float>();
  const Labels lab(labels);
  const void* in = logits.const_data_ptr();
  const auto run = [&](auto type_tag) {
    using T = decltype(type_tag);
    const T* x = static_cast<const T*>(in);
    if (kind == 0) forward_rows<0>(x, N, V, stride, lab, vocab_start, ignore_index, max_p, lse_p, tgt_p, f);
    else if (kind == 1) forward_rows<1>(x, N, V, stride, lab, vocab_start, ignore_index, max_p, lse_p, tgt_p, f);
    else forward_rows<2>(x, N, V, stride, lab, vocab_start, ignore_index, max_p, lse_p, tgt_p, f);
  };
  switch (logits.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    default: run(c10::Half{});  // kHalf (check_logits allows nothing else)
  }
  return {row_max, lse, target};
}

void ce_backward_cpu(
    const at::Tensor& logits, const at::Tensor& labels_in, const at::Tensor& max_in, const at::Tensor& lse_in,
    const at::Tensor& coef_in, int64_t vocab_start, int64_t ignore_index, const at::Tensor& out, double softcap,
    double scale) {
  check_logits(logits, "logits");
  check_logits(out, "out");
  TORCH_CHECK(out.sizes() == logits.sizes(), "out must have the shape of logits ", logits.sizes(),
              ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == logits.scalar_type(), "out must have the dtype of logits");
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t stride = logits.stride(0), out_stride = out.stride(0);
  const at::Tensor labels = check_rows(labels_in, N, "labels", true);
  const at::Tensor row_max = check_rows(max_in, N, "m", false);
  const at::Tensor lse = check_rows(lse_in, N, "lse", false);
  const at::Tensor coef = check_rows(coef_in, N, "coef", false);
  int kind = 0;
  const Xform f = make_xform(softcap, scale, kind);
  const float* max_p = row_max.data_ptr<float>();
  const float* lse_p = lse.data_ptr<float>();
  const float* coef_p = coef.data_ptr<float>();
  // Raw pointers: `out` may alias `logits`, so no const view of the same storage is used.
  void* in = logits.data_ptr();
  void* o = out.data_ptr();
  if (o != in && N > 0) advise_huge_pages(o, ((N - 1) * out_stride + V) * out.element_size());
  const Labels lab(labels);
  const auto run = [&](auto type_tag) {
    using T = decltype(type_tag);
    const T* x = static_cast<const T*>(in);
    T* y = static_cast<T*>(o);
    if (kind == 0) {
      backward_rows<0>(x, y, N, V, stride, out_stride, lab, max_p, lse_p, coef_p, vocab_start, ignore_index, f);
    } else if (kind == 1) {
      backward_rows<1>(x, y, N, V, stride, out_stride, lab, max_p, lse_p, coef_p, vocab_start, ignore_index, f);
    } else {
      backward_rows<2>(x, y, N, V, stride, out_stride, lab, max_p, lse_p, coef_p, vocab_start, ignore_index, f);
    }
  };
  switch (logits.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    default: run(c10::Half{});  // kHalf
  }
}

at::Tensor segment_sum_cpu(const at::Tensor& x_in, const at::Tensor& cu_in) {
  TORCH_CHECK(x_in.device().is_cpu() && cu_in.device().is_cpu(), "segment_sum takes CPU tensors");
  TORCH_CHECK(x_in.dim() == 1, "x must be 1-D, got ", x_in.dim(), "-D");
  TORCH_CHECK(cu_in.dim() == 1 && cu_in.size(0) >= 1, "cu_seqlens must be 1-D with at least one entry");
  TORCH_CHECK(cu_in.scalar_type() == at::kLong || cu_in.scalar_type() == at::kInt,
              "cu_seqlens must be int32 or int64, got ", cu_in.scalar_type());
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor cu = cu_in.contiguous();
  const int64_t T = x.size(0), B = cu.size(0) - 1;
  at::Tensor y = at::empty({B}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const Labels bounds(cu);  // same int32/int64 reader
#pragma omp parallel for num_threads(n_threads(T)) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t start = std::clamp<int64_t>(bounds[b], 0, T);
    const int64_t end = std::clamp<int64_t>(bounds[b + 1], start, T);
    float s = 0.f;  // sequential: one fixed order, the segment's tokens in index order
    for (int64_t t = start; t < end; ++t) s += xp[t];
    yp[b] = s;
  }
  return y;
}

at::Tensor group_softmax_cpu(const at::Tensor& x_in, const at::Tensor& cu_in) {
  const at::Tensor x = check_vector(x_in, -1, "x");
  const int64_t B = x.size(0);
  const at::Tensor cu = check_groups(cu_in, B);
  const int64_t G = cu.size(0) - 1;
  at::Tensor y = at::empty({B}, x.options());
  const float* xp = x.data_ptr<float>();
  const int64_t* c = cu.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();
  for_group_blocks(c, G, B, [&](int64_t ga, int64_t gb, std::vector<float>& buf) {
    const int64_t s = c[ga], n = c[gb] - s;
    const GroupScratch sc(buf, n);
    std::memcpy(sc.x, xp + s, sizeof(float) * n);
    group_exp_block(c, ga, gb, sc);
    for_vectors(n, [&](int64_t i, int64_t k) {
      (Vec::loadu(sc.x + i, k) / Vec::loadu(sc.tmp + i, k)).store(yp + s + i, k);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> steerlm2_weights_cpu(
    const at::Tensor& nll_in, const at::Tensor& log_q_in, const at::Tensor& ws_in, const at::Tensor& cu_in) {
  const at::Tensor nll = check_vector(nll_in, -1, "seq_nll");
  const int64_t B = nll.size(0);
  const at::Tensor log_q = check_vector(log_q_in, B, "log_q");
  const at::Tensor ws = check_vector(ws_in, B, "ws");
  const at::Tensor cu = check_groups(cu_in, B);
  const int64_t G = cu.size(0) - 1;
  at::Tensor weight = at::empty({B}, nll.options());
  at::Tensor baseline = at::empty({B}, nll.options());
  at::Tensor kl = at::empty({G}, nll.options());
  const float* np = nll.data_ptr<float>();
  const float* qp = log_q.data_ptr<float>();
  const float* wsp = ws.data_ptr<float>();
  const int64_t* c = cu.data_ptr<int64_t>();
  float* wp = weight.data_ptr<float>();
  float* bp = baseline.data_ptr<float>();
  float* klp = kl.data_ptr<float>();
  const Vec eps(kGroupEps);
  const auto vadd = [](const Vec& a, const Vec& b) { return a + b; };
  for_group_blocks(c, G, B, [&](int64_t ga, int64_t gb, std::vector<float>& buf) {
    const int64_t s = c[ga], n = c[gb] - s;
    const GroupScratch sc(buf, n);
    // baseline logits -seq_nll - log_q, and their group softmax
    for_vectors(n, [&](int64_t i, int64_t k) {
      (Vec::loadu(np + s + i, k).neg() - Vec::loadu(qp + s + i, k)).store(sc.x + i, k);
    });
    group_exp_block(c, ga, gb, sc);
    // baseline, weight = ws - baseline, and the KL terms (ws + eps) log((ws + eps) / (baseline + eps))
    for_vectors(n, [&](int64_t i, int64_t k) {
      const Vec b = Vec::loadu(sc.x + i, k) / Vec::loadu(sc.tmp + i, k);
      const Vec w = Vec::loadu(wsp + s + i, k);
      const Vec p = w + eps;
      b.store(bp + s + i, k);
      (w - b).store(wp + s + i, k);
      (p * (p / (b + eps)).log()).store(sc.x + i, k);
    });
    // kl[g]: the group's terms summed (an empty group: 0)
    for (int64_t g = ga; g < gb; ++g) {
      const int64_t L = c[g + 1] - c[g];
      klp[g] = L > 0 ? group_reduce(sc.x + (c[g] - s), L, 0.f, vadd) : 0.f;
    }
  });
  return {weight, baseline, kl};
}

const char* simd_capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "default";
#endif
}

}  // namespace steerlm
