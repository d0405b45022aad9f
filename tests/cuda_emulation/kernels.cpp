// Runs the CUDA kernels of src/encoder/lite/kernels.cu on the CPU: the CUDA keywords become
// nothing and each launch is a loop over a (deliberately small) grid of blocks and threads, so
// the grid-stride loops and every index computation run as on a GPU. Each kernel is checked
// against a reference written another way (an explicitly zero-padded input instead of bounds
// checks). Driven by tests/cuda_kernels.rs; exits 1 on any mismatch.
#include <cstdio>
#include <cstdlib>
#include <cstddef>
#include <vector>
#include <cmath>
struct D3 { unsigned x, y, z; };
static D3 blockIdx, threadIdx, gridDim, blockDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#include "../../src/encoder/lite/kernels.cu"
template <class F> void launch(size_t total, F f) {
  blockDim = {256,1,1}; size_t blocks = (total + 255)/256; if (blocks > 50) blocks = 50; gridDim = {(unsigned)blocks,1,1};
  for (unsigned b = 0; b < gridDim.x; ++b) for (unsigned t = 0; t < 256; ++t) { blockIdx = {b,0,0}; threadIdx = {t,0,0}; f(); }
}
static float rnd() { return (float)rand() / RAND_MAX * 2 - 1; }
void same(int in, int k, int s, int &out, int &before) { out = (in + s - 1)/s; int need = (out-1)*s + k - in; if (need<0) need=0; before = need/2; }
int main() {
  int fails = 0;
  for (int trial = 0; trial < 20; ++trial) {
    int n = 1 + rand()%3, h = 3 + rand()%14, w = 3 + rand()%14, c = 1 + rand()%9, k = (rand()%2)?3:5, s = 1 + rand()%2;
    if (trial == 0) { n = 2; h = 28; w = 28; c = 96; k = 5; s = 2; }  // a Lite0 stage-4 layer
    if (trial == 1) { n = 1; h = 1; w = 1; c = 3; k = 5; s = 1; }     // all padding but the centre
    int oh, top, ow, left; same(h,k,s,oh,top); same(w,k,s,ow,left);
    std::vector<float> x(n*h*w*c), wt(k*k*c), b(c), y(n*oh*ow*c, NAN), r(n*oh*ow*c);
    for (auto &v: x) v = rnd()*4; for (auto &v: wt) v = rnd(); for (auto &v: b) v = rnd();
    launch(y.size(), [&]{ vitrine_depthwise_conv(x.data(), wt.data(), b.data(), y.data(), n,h,w,c,k,s,top,left,oh,ow,1); });
    // reference: explicit zero-padded input
    int ph = (oh-1)*s + k, pw = (ow-1)*s + k;
    std::vector<float> p(n*ph*pw*c, 0.f);
    for (int i=0;i<n;i++) for (int yy=0;yy<h;yy++) for (int xx=0;xx<w;xx++) for (int ch=0;ch<c;ch++) p[((i*ph+yy+top)*pw+xx+left)*c+ch]=x[((i*h+yy)*w+xx)*c+ch];
    double err = 0;
    for (int i=0;i<n;i++) for (int oy=0;oy<oh;oy++) for (int ox=0;ox<ow;ox++) for (int ch=0;ch<c;ch++) {
      double a = b[ch]; for (int ky=0;ky<k;ky++) for (int kx=0;kx<k;kx++) a += p[((i*ph+oy*s+ky)*pw+ox*s+kx)*c+ch]*wt[(ky*k+kx)*c+ch];
      a = a<0?0:(a>6?6:a); err = fmax(err, fabs(a - y[((i*oh+oy)*ow+ox)*c+ch])); }
    if (!(err < 1e-4)) { printf("dw fail %d err %g\n", trial, err); fails++; }
    // stem: NCHW input, (k,k,cin,cout) weight
    int cin = 1 + rand()%3, cout = 1 + rand()%7;
    std::vector<float> X(n*cin*h*w), W(k*k*cin*cout), B(cout), Y(n*oh*ow*cout, NAN);
    for (auto &v: X) v = rnd(); for (auto &v: W) v = rnd(); for (auto &v: B) v = rnd();
    launch(Y.size(), [&]{ vitrine_stem_conv(X.data(), W.data(), B.data(), Y.data(), n,cin,h,w,k,cout,s,top,left,oh,ow); });
    err = 0;
    for (int i=0;i<n;i++) for (int oy=0;oy<oh;oy++) for (int ox=0;ox<ow;ox++) for (int co=0;co<cout;co++) {
      double a = B[co]; for (int ky=0;ky<k;ky++) for (int kx=0;kx<k;kx++) { int iy=oy*s+ky-top, ix=ox*s+kx-left; if (iy<0||iy>=h||ix<0||ix>=w) continue;
        for (int ci=0;ci<cin;ci++) a += X[((i*cin+ci)*h+iy)*w+ix]*W[((ky*k+kx)*cin+ci)*cout+co]; }
      a = a<0?0:(a>6?6:a); err = fmax(err, fabs(a - Y[((i*oh+oy)*ow+ox)*cout+co])); }
    if (!(err < 1e-4)) { printf("stem fail %d err %g\n", trial, err); fails++; }
    // bias act / residual
    std::vector<float> z(n*oh*ow*c), z0, res(z.size());
    for (auto &v: z) v = rnd()*8; for (auto &v: res) v = rnd(); z0 = z;
    launch(z.size(), [&]{ vitrine_bias_residual_act(z.data(), b.data(), res.data(), z.size(), c, 1); });
    err = 0; for (size_t i=0;i<z.size();i++){ double a = z0[i]+b[i%c]+res[i]; a=a<0?0:(a>6?6:a); err=fmax(err,fabs(a-z[i])); }
    z = z0; launch(z.size(), [&]{ vitrine_bias_act(z.data(), b.data(), z.size(), c, 0); });
    for (size_t i=0;i<z.size();i++){ err=fmax(err,fabs(z0[i]+b[i%c]-z[i])); }
    if (!(err < 1e-5)) { printf("bias fail %d err %g\n", trial, err); fails++; }
  }
  printf("fails %d\n", fails); return fails != 0;
}
