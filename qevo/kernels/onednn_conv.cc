// oneDNN 2-D convolutions as XLA FFI handlers for the CPU: forward, input gradient, kernel gradient.
//
// Layouts are JAX's: images NHWC, kernels HWIO ([kh, kw, in / groups, out]), float32.
// Every handler takes the same attributes: strides (sh, sw), explicit padding (pt, pl, pb,
// pr), the feature group count, and bf16: 1 lets oneDNN round the float32 operands to
// bfloat16 and sum the products in float32 (its bf16 fpmath mode: AMX or AVX512-BF16 where
// the CPU has them, exact float32 where it has neither). Activations are used in place
// (oneDNN reads and writes NHWC directly); only kernels are reordered into the layout each
// primitive prefers.
// Primitives are cached per geometry, and one convolution runs at a time: each already
// spreads over every core through OpenMP.
//
// Two plain C functions tell Python what runs: QevoOneDNNVersion (the library's version) and
// QevoConvImplementations (the names oneDNN gives the implementations it picked for a
// geometry, which carry the instruction set, and so whether bf16 arithmetic runs).
//
// Built when qevo is installed (CMakeLists.txt beside this file); qevo.onednn loads it.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

struct Geometry {
  int64_t n, h, w, c, oh, ow, o, kh, kw, sh, sw, pt, pl, pb, pr, groups, bf16;

  auto Key() const { return std::make_tuple(n, h, w, c, oh, ow, o, kh, kw, sh, sw, pt, pl, pb, pr, groups, bf16); }

  static memory::desc Image(int64_t n, int64_t h, int64_t w, int64_t c) {
    return memory::desc({n, c, h, w}, memory::data_type::f32, {h * w * c, 1, w * c, c});
  }
  memory::desc Src() const { return Image(n, h, w, c); }
  memory::desc Dst() const { return Image(n, oh, ow, o); }
  // The HWIO kernel as oneDNN's (o, i, kh, kw), or (g, o/g, i/g, kh, kw) when grouped.
  memory::desc Hwio() const {
    int64_t i = c / groups;
    if (groups == 1) return memory::desc({o, i, kh, kw}, memory::data_type::f32, {1, o, kw * i * o, i * o});
    return memory::desc({groups, o / groups, i, kh, kw}, memory::data_type::f32,
                        {o / groups, 1, o, kw * i * o, i * o});
  }
  memory::desc AnyKernel() const {
    int64_t i = c / groups;
    memory::dims dims = groups == 1 ? memory::dims{o, i, kh, kw} : memory::dims{groups, o / groups, i, kh, kw};
    return memory::desc(dims, memory::data_type::f32, memory::format_tag::any);
  }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// The three primitives of one geometry, with kernel buffers in their preferred layouts.
struct Primitives {
  explicit Primitives(const Geometry& g) {
    auto& engine = Engine();
    memory::dims strides{g.sh, g.sw}, pad_l{g.pt, g.pl}, pad_r{g.pb, g.pr};
    auto algo = dnnl::algorithm::convolution_direct;
    dnnl::primitive_attr attr;
    if (g.bf16) attr.set_fpmath_mode(dnnl::fpmath_mode::bf16);
    auto fwd_pd = dnnl::convolution_forward::primitive_desc(engine, dnnl::prop_kind::forward_training, algo, g.Src(),
                                                            g.AnyKernel(), g.Dst(), strides, pad_l, pad_r, attr);
    auto data_pd = dnnl::convolution_backward_data::primitive_desc(engine, algo, g.Src(), g.AnyKernel(), g.Dst(),
                                                                   strides, pad_l, pad_r, fwd_pd, attr);
    auto kernel_pd = dnnl::convolution_backward_weights::primitive_desc(engine, algo, g.Src(), g.AnyKernel(),
                                                                        g.Dst(), strides, pad_l, pad_r, fwd_pd, attr);
    forward = dnnl::convolution_forward(fwd_pd);
    input_grad = dnnl::convolution_backward_data(data_pd);
    kernel_grad = dnnl::convolution_backward_weights(kernel_pd);
    forward_kernel = memory(fwd_pd.weights_desc(), engine);
    input_grad_kernel = memory(data_pd.weights_desc(), engine);
    kernel_grad_out = memory(kernel_pd.diff_weights_desc(), engine);
    names = std::string(fwd_pd.impl_info_str()) + "\n" + data_pd.impl_info_str() + "\n" + kernel_pd.impl_info_str();
  }
  dnnl::convolution_forward forward;
  dnnl::convolution_backward_data input_grad;
  dnnl::convolution_backward_weights kernel_grad;
  memory forward_kernel, input_grad_kernel, kernel_grad_out;
  std::string names;  // the implementations oneDNN picked, one a line: forward, input gradient, kernel gradient
};

std::mutex mu;

Primitives& Lookup(const Geometry& g) {
  static std::map<decltype(g.Key()), std::unique_ptr<Primitives>> cache;
  auto& slot = cache[g.Key()];
  if (!slot) slot = std::make_unique<Primitives>(g);
  return *slot;
}

memory Wrap(const memory::desc& d, const void* p) { return memory(d, Engine(), const_cast<void*>(p)); }

// `user` in the layout of `target`: a reorder into `target`, or `user` itself when they match.
memory Prepared(dnnl::stream& s, memory user, memory& target) {
  if (user.get_desc() == target.get_desc()) return user;
  dnnl::reorder(user, target).execute(s, user, target);
  return target;
}

Geometry Make(ffi::Span<const int64_t> image, ffi::Span<const int64_t> out, ffi::Span<const int64_t> kernel, int64_t sh,
              int64_t sw, int64_t pt, int64_t pl, int64_t pb, int64_t pr, int64_t groups, int64_t bf16) {
  return Geometry{image[0], image[1], image[2], image[3], out[1], out[2], out[3], kernel[0], kernel[1],
                  sh,       sw,       pt,       pl,       pb,     pr,     groups,   bf16};
}

template <typename F>
ffi::Error Guarded(F body) {
  try {
    std::lock_guard<std::mutex> lock(mu);
    dnnl::stream s(Engine());
    body(s);
    s.wait();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution failed: ") + e.what());
  }
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> y, int64_t sh,
                   int64_t sw, int64_t pt, int64_t pl, int64_t pb, int64_t pr, int64_t groups, int64_t bf16) {
  Geometry g = Make(x.dimensions(), y->dimensions(), k.dimensions(), sh, sw, pt, pl, pb, pr, groups, bf16);
  return Guarded([&](dnnl::stream& s) {
    Primitives& p = Lookup(g);
    memory kernel = Prepared(s, Wrap(g.Hwio(), k.typed_data()), p.forward_kernel);
    p.forward.execute(s, {{DNNL_ARG_SRC, Wrap(g.Src(), x.typed_data())},
                          {DNNL_ARG_WEIGHTS, kernel},
                          {DNNL_ARG_DST, Wrap(g.Dst(), y->typed_data())}});
  });
}

ffi::Error InputGrad(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> dx, int64_t sh,
                     int64_t sw, int64_t pt, int64_t pl, int64_t pb, int64_t pr, int64_t groups, int64_t bf16) {
  Geometry g = Make(dx->dimensions(), dy.dimensions(), k.dimensions(), sh, sw, pt, pl, pb, pr, groups, bf16);
  return Guarded([&](dnnl::stream& s) {
    Primitives& p = Lookup(g);
    memory kernel = Prepared(s, Wrap(g.Hwio(), k.typed_data()), p.input_grad_kernel);
    p.input_grad.execute(s, {{DNNL_ARG_DIFF_DST, Wrap(g.Dst(), dy.typed_data())},
                             {DNNL_ARG_WEIGHTS, kernel},
                             {DNNL_ARG_DIFF_SRC, Wrap(g.Src(), dx->typed_data())}});
  });
}

ffi::Error KernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk, int64_t sh,
                      int64_t sw, int64_t pt, int64_t pl, int64_t pb, int64_t pr, int64_t groups, int64_t bf16) {
  Geometry g = Make(x.dimensions(), dy.dimensions(), dk->dimensions(), sh, sw, pt, pl, pb, pr, groups, bf16);
  return Guarded([&](dnnl::stream& s) {
    Primitives& p = Lookup(g);
    memory user = Wrap(g.Hwio(), dk->typed_data());
    bool direct = user.get_desc() == p.kernel_grad_out.get_desc();
    memory out = direct ? user : p.kernel_grad_out;
    p.kernel_grad.execute(s, {{DNNL_ARG_SRC, Wrap(g.Src(), x.typed_data())},
                              {DNNL_ARG_DIFF_DST, Wrap(g.Dst(), dy.typed_data())},
                              {DNNL_ARG_DIFF_WEIGHTS, out}});
    if (!direct) dnnl::reorder(out, user).execute(s, out, user);
  });
}

}  // namespace

// "major.minor.patch" of the oneDNN library loaded, into `out` (NUL-terminated, at most `size` bytes).
extern "C" void QevoOneDNNVersion(char* out, size_t size) {
  const dnnl_version_t* v = dnnl_version();
  std::snprintf(out, size, "%d.%d.%d", v->major, v->minor, v->patch);
}

// The implementation names of the forward, input-gradient and kernel-gradient primitives of
// one geometry (the 17 integers of Geometry, in order), one a line, into `out`. Returns 0, or
// -1 with oneDNN's message in `out` when the geometry has no primitive.
extern "C" int QevoConvImplementations(const int64_t* d, char* out, size_t size) {
  Geometry g{d[0], d[1], d[2],  d[3],  d[4],  d[5],  d[6],  d[7], d[8],
             d[9], d[10], d[11], d[12], d[13], d[14], d[15], d[16]};
  try {
    std::lock_guard<std::mutex> lock(mu);
    Primitives& p = Lookup(g);
    std::snprintf(out, size, "%s", p.names.c_str());
    return 0;
  } catch (const dnnl::error& e) {
    std::snprintf(out, size, "%s", e.what());
    return -1;
  }
}

#define QEVO_CONV_BINDING                  \
  ffi::Ffi::Bind()                         \
      .Arg<ffi::Buffer<ffi::F32>>()        \
      .Arg<ffi::Buffer<ffi::F32>>()        \
      .Ret<ffi::Buffer<ffi::F32>>()        \
      .Attr<int64_t>("sh")                 \
      .Attr<int64_t>("sw")                 \
      .Attr<int64_t>("pt")                 \
      .Attr<int64_t>("pl")                 \
      .Attr<int64_t>("pb")                 \
      .Attr<int64_t>("pr")                 \
      .Attr<int64_t>("groups")             \
      .Attr<int64_t>("bf16")

XLA_FFI_DEFINE_HANDLER_SYMBOL(QevoConvForward, Forward, QEVO_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(QevoConvInputGrad, InputGrad, QEVO_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(QevoConvKernelGrad, KernelGrad, QEVO_CONV_BINDING);
