// vitrine's CUDA kernels for the EfficientNet-Lite forward pass (the `cuda` feature): the stem
// convolution, the depthwise convolution and the bias/residual/ReLU6 epilogue of the 1x1
// convolutions, whose matrix products cuBLAS does. build.rs compiles this file to PTX; the
// launches are in cuda.rs beside it.
//
// All tensors are f32 and contiguous; activations are NHWC (channels last), padding is
// TensorFlow's "same" (`top`/`left` zeros before, the rest after), as in the CPU kernels of
// kernels.rs. One thread computes one output value in a grid-stride loop: neighbouring threads
// take neighbouring channels of one pixel, so every load and store of a warp is coalesced, and
// the k*k taps' reuse between neighbouring outputs is served by the caches.

__device__ __forceinline__ float relu6(float v) {
  // Written as comparisons so that a NaN stays a NaN, as in the CPU kernels.
  v = v < 0.0f ? 0.0f : v;
  return v > 6.0f ? 6.0f : v;
}

// Output index `i` of an NHWC `(n, oh, ow, c)` tensor -> its image, row, column and channel.
struct Nhwc {
  size_t b;
  int oy, ox, ch;
};
__device__ __forceinline__ Nhwc nhwc_position(size_t i, int oh, int ow, int c) {
  Nhwc p;
  p.ch = (int)(i % c);
  size_t r = i / c;
  p.ox = (int)(r % ow);
  r /= ow;
  p.oy = (int)(r % oh);
  p.b = r / oh;
  return p;
}

// Stem: NCHW image `x` (n, cin, h, w), weight `wt` (k, k, cin, cout), bias (cout) -> NHWC
// `y` (n, oh, ow, cout), ReLU6 applied.
extern "C" __global__ void vitrine_stem_conv(const float *__restrict__ x, const float *__restrict__ wt,
                                             const float *__restrict__ bias, float *__restrict__ y, int n,
                                             int cin, int h, int w, int k, int cout, int stride, int top,
                                             int left, int oh, int ow) {
  const size_t total = (size_t)n * oh * ow * cout;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x) {
    const Nhwc p = nhwc_position(i, oh, ow, cout);
    const int co = p.ch, oy = p.oy, ox = p.ox;
    const float *xb = x + p.b * cin * h * w;
    float acc = 0.0f;
    for (int ky = 0; ky < k; ++ky) {
      const int iy = oy * stride + ky - top;
      if (iy < 0 || iy >= h) continue;
      for (int kx = 0; kx < k; ++kx) {
        const int ix = ox * stride + kx - left;
        if (ix < 0 || ix >= w) continue;
        const float *wk = wt + ((size_t)(ky * k + kx) * cin) * cout + co;
        for (int ci = 0; ci < cin; ++ci) {
          acc += xb[((size_t)ci * h + iy) * w + ix] * wk[(size_t)ci * cout];
        }
      }
    }
    y[i] = relu6(acc + bias[co]);
  }
}

// Depthwise: NHWC `x` (n, h, w, c), weight `wt` (k, k, c), bias (c) -> NHWC `y` (n, oh, ow, c),
// ReLU6 applied when `act` is 1.
extern "C" __global__ void vitrine_depthwise_conv(const float *__restrict__ x, const float *__restrict__ wt,
                                                  const float *__restrict__ bias, float *__restrict__ y,
                                                  int n, int h, int w, int c, int k, int stride, int top,
                                                  int left, int oh, int ow, int act) {
  const size_t total = (size_t)n * oh * ow * c;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x) {
    const Nhwc p = nhwc_position(i, oh, ow, c);
    const int ch = p.ch, oy = p.oy, ox = p.ox;
    const float *xb = x + p.b * h * w * c + ch;
    float acc = 0.0f;
    for (int ky = 0; ky < k; ++ky) {
      const int iy = oy * stride + ky - top;
      if (iy < 0 || iy >= h) continue;
      for (int kx = 0; kx < k; ++kx) {
        const int ix = ox * stride + kx - left;
        if (ix < 0 || ix >= w) continue;
        acc += xb[((size_t)iy * w + ix) * c] * wt[(ky * k + kx) * c + ch];
      }
    }
    acc += bias[ch];
    y[i] = act ? relu6(acc) : acc;
  }
}

// In place over `total` values of rows of `c` channels: y = act(y + bias[ch]).
extern "C" __global__ void vitrine_bias_act(float *__restrict__ y, const float *__restrict__ bias,
                                            size_t total, int c, int act) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x) {
    const float v = y[i] + bias[i % c];
    y[i] = act ? relu6(v) : v;
  }
}

// In place: y = act(y + bias[ch] + residual), `residual` shaped like `y`.
extern "C" __global__ void vitrine_bias_residual_act(float *__restrict__ y, const float *__restrict__ bias,
                                                     const float *__restrict__ residual, size_t total,
                                                     int c, int act) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x) {
    const float v = y[i] + bias[i % c] + residual[i];
    y[i] = act ? relu6(v) : v;
  }
}
