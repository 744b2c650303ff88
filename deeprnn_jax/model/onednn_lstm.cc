// One LSTM layer over all time steps as oneDNN's fused LSTM primitive, forward and backward,
// exposed to XLA as FFI custom calls (see onednn.py).
//
// Every array exchanged with XLA is float32, in our layouts (no transposes): x <T, N, I>,
// h0/hT/c0/cT <N, H>; W_xh <I, 4H> and W_hh <H, 4H> are oneDNN's `ldigo` with L = D = 1, gates
// i, f, g, o (oneDNN's and PyTorch's order); b <4H> is `ldgo`. With attribute bf16 = 1 the
// primitive is oneDNN's bfloat16 LSTM (x, h, W and y bfloat16; c, b and the accumulation float32),
// the conversions done here. The forward pass writes oneDNN's workspace, which the backward pass
// reads.

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A call's problem, and the OpenMP threads it runs on: primitives are built for the threads they
// run with (oneDNN sizes its work split and scratchpad by them).
struct Shape {
  int64_t T, N, I, H;
  bool bf16;
  int threads;
  bool operator<(const Shape& o) const {
    return std::tie(T, N, I, H, bf16, threads) < std::tie(o.T, o.N, o.I, o.H, o.bf16, o.threads);
  }
};

struct Descs {
  memory::desc x, h, c, w_layer, w_iter, bias, y;
};

// `act`: the type of x, h, W and y (c and b are float32); `weights`: their tag (`any` lets the
// primitive choose its own layout).
Descs MakeDescs(const Shape& s, dt act, tag weights) {
  return {memory::desc({s.T, s.N, s.I}, act, tag::tnc),
          memory::desc({1, 1, s.N, s.H}, act, tag::ldnc),
          memory::desc({1, 1, s.N, s.H}, dt::f32, tag::ldnc),
          memory::desc({1, 1, s.I, 4, s.H}, act, weights),
          memory::desc({1, 1, s.H, 4, s.H}, act, weights),
          memory::desc({1, 1, 4, s.H}, dt::f32, tag::ldgo),
          memory::desc({s.T, s.N, s.H}, act, tag::tnc)};
}

// Every array the calls exchange with XLA is float32 in our layouts.
Descs UserDescs(const Shape& s) { return MakeDescs(s, dt::f32, tag::ldigo); }

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// Primitives are built once per shape; executing one from several threads is safe because each
// call brings its own scratchpad.
struct Primitives {
  dnnl::lstm_forward::primitive_desc fwd_pd;
  dnnl::lstm_forward fwd;
  dnnl::lstm_backward::primitive_desc bwd_pd;
  dnnl::lstm_backward bwd;
};

// The calling thread's OpenMP threads (an XLA thread's own setting, one per device under the batch
// split), then the primitives for `s`.
const Primitives& Get(const Shape& s) {
  omp_set_num_threads(s.threads);
  static std::mutex mu;
  static std::map<Shape, std::unique_ptr<Primitives>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(s);
  if (it != cache.end()) return *it->second;
  Descs k = MakeDescs(s, s.bf16 ? dt::bf16 : dt::f32, tag::any);
  auto dir = dnnl::rnn_direction::unidirectional_left2right;
  dnnl::lstm_forward::primitive_desc fwd_pd(
      Engine(), dnnl::prop_kind::forward_training, dir, k.x, k.h, k.c, k.w_layer, k.w_iter,
      k.bias, k.y, k.h, k.c, UserScratchpad());
  // Gradients are float32 in both precisions (oneDNN's bfloat16 backward accumulates them so).
  Descs d = MakeDescs(s, dt::f32, tag::any);
  dnnl::lstm_backward::primitive_desc bwd_pd(
      Engine(), dnnl::prop_kind::backward, dir, k.x, k.h, k.c, k.w_layer, k.w_iter, k.bias, k.y,
      k.h, k.c, d.x, d.h, d.c, d.w_layer, d.w_iter, d.bias, d.y, d.h, d.c, fwd_pd,
      UserScratchpad());
  auto p = std::make_unique<Primitives>(Primitives{fwd_pd, dnnl::lstm_forward(fwd_pd), bwd_pd,
                                                   dnnl::lstm_backward(bwd_pd)});
  return *cache.emplace(s, std::move(p)).first->second;
}

// Memory a call needs besides XLA's buffers (oneDNN's scratchpad, converted copies), kept by
// each thread from one call to the next: fresh memory is mapped and faulted in page by page on
// every call, which costs as much as the conversions themselves at the wide layers' sizes. Blocks
// are 2 MiB-aligned and advised into huge pages.
class Arena {
 public:
  // Starts a call: its blocks are handed out again in the order they are asked for.
  static Arena& ForCall() {
    thread_local Arena arena;
    arena.next_ = 0;
    return arena;
  }

  ~Arena() {
    for (Block& b : blocks_) std::free(b.data);
  }

  void* Get(size_t bytes) {
    if (next_ == blocks_.size()) blocks_.push_back({nullptr, 0});
    Block& b = blocks_[next_++];
    if (b.bytes < bytes) {
      std::free(b.data);
      b = {nullptr, 0};
      size_t size = (bytes + kHuge - 1) / kHuge * kHuge;
      void* data = std::aligned_alloc(kHuge, size);
      if (data == nullptr) throw std::bad_alloc();
      madvise(data, size, MADV_HUGEPAGE);
      b = {data, size};
    }
    return b.data;
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };
  static constexpr size_t kHuge = size_t{2} << 20;
  std::vector<Block> blocks_;
  size_t next_ = 0;
};

// Hands a primitive its arguments in the layouts and types it asked for: an XLA buffer itself
// where they agree, else a converted copy (inputs before the call, outputs after it).
class Args {
 public:
  explicit Args(dnnl::stream& stream) : stream_(stream), arena_(Arena::ForCall()) {}

  void In(int arg, const memory::desc& want, const memory::desc& have, const void* data) {
    memory user(have, Engine(), const_cast<void*>(data));
    if (want == have) {
      args_[arg] = user;
      return;
    }
    memory copy(want, Engine(), arena_.Get(want.get_size()));
    dnnl::reorder(user, copy).execute(stream_, user, copy);
    args_[arg] = copy;
  }

  void Out(int arg, const memory::desc& want, const memory::desc& have, void* data) {
    memory user(have, Engine(), data);
    if (want == have) {
      args_[arg] = user;
      return;
    }
    memory copy(want, Engine(), arena_.Get(want.get_size()));
    args_[arg] = copy;
    pending_.emplace_back(copy, user);
  }

  // The arguments both passes take: x, h0, c0, W_xh, W_hh, b.
  template <typename PrimitiveDesc>
  void Inputs(const PrimitiveDesc& pd, const Descs& u, ffi::AnyBuffer x, ffi::AnyBuffer h0,
              ffi::AnyBuffer c0, ffi::AnyBuffer w_xh, ffi::AnyBuffer w_hh, ffi::AnyBuffer b) {
    In(DNNL_ARG_SRC_LAYER, pd.src_layer_desc(), u.x, x.untyped_data());
    In(DNNL_ARG_SRC_ITER, pd.src_iter_desc(), u.h, h0.untyped_data());
    In(DNNL_ARG_SRC_ITER_C, pd.src_iter_c_desc(), u.c, c0.untyped_data());
    In(DNNL_ARG_WEIGHTS_LAYER, pd.weights_layer_desc(), u.w_layer, w_xh.untyped_data());
    In(DNNL_ARG_WEIGHTS_ITER, pd.weights_iter_desc(), u.w_iter, w_hh.untyped_data());
    In(DNNL_ARG_BIAS, pd.bias_desc(), u.bias, b.untyped_data());
  }

  // A zero-filled output (the backward primitive accumulates into its weight gradients).
  void Zeroed(int arg, const memory::desc& want, const memory::desc& have, void* data) {
    Out(arg, want, have, data);
    std::memset(args_[arg].get_data_handle(), 0, want.get_size());
  }

  void Run(const dnnl::primitive& primitive, const memory::desc& scratchpad) {
    args_[DNNL_ARG_SCRATCHPAD] = memory(scratchpad, Engine(), arena_.Get(scratchpad.get_size()));
    primitive.execute(stream_, args_);
    for (auto& [from, to] : pending_) dnnl::reorder(from, to).execute(stream_, from, to);
    stream_.wait();
  }

 private:
  dnnl::stream& stream_;
  Arena& arena_;
  std::unordered_map<int, memory> args_;
  std::vector<std::pair<memory, memory>> pending_;
};

// Runs a call's body (which returns the call's ffi::Error); any exception (oneDNN's errors, a
// failed allocation) becomes the call's error, since an exception must not cross into XLA.
template <typename Body>
ffi::Error Guarded(Body body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return ffi::Error::Internal("onednn lstm: out of memory");
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("onednn lstm: ") + e.what());
  }
}

Shape ShapeOf(ffi::AnyBuffer x, ffi::AnyBuffer h0, int32_t bf16, int32_t threads) {
  auto xd = x.dimensions();
  return {xd[0], xd[1], xd[2], h0.dimensions()[1], bf16 != 0, threads};
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer h0, ffi::AnyBuffer c0, ffi::AnyBuffer w_xh,
                   ffi::AnyBuffer w_hh, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Result<ffi::AnyBuffer> hT, ffi::Result<ffi::AnyBuffer> cT,
                   ffi::Result<ffi::AnyBuffer> workspace, int32_t bf16,
                   int32_t threads) {
  Shape s = ShapeOf(x, h0, bf16, threads);
  return Guarded([&] {
    const Primitives& p = Get(s);
    const auto& pd = p.fwd_pd;
    if (workspace->size_bytes() != pd.workspace_desc().get_size())
      return ffi::Error::InvalidArgument("onednn lstm: workspace size mismatch");
    Descs u = UserDescs(s);
    dnnl::stream stream(Engine());
    Args a(stream);
    a.Inputs(pd, u, x, h0, c0, w_xh, w_hh, b);
    a.Out(DNNL_ARG_DST_LAYER, pd.dst_layer_desc(), u.y, y->untyped_data());
    a.Out(DNNL_ARG_DST_ITER, pd.dst_iter_desc(), u.h, hT->untyped_data());
    a.Out(DNNL_ARG_DST_ITER_C, pd.dst_iter_c_desc(), u.c, cT->untyped_data());
    a.Out(DNNL_ARG_WORKSPACE, pd.workspace_desc(), pd.workspace_desc(), workspace->untyped_data());
    a.Run(p.fwd, pd.scratchpad_desc());
    return ffi::Error::Success();
  });
}

ffi::Error Backward(ffi::AnyBuffer x, ffi::AnyBuffer h0, ffi::AnyBuffer c0, ffi::AnyBuffer w_xh,
                    ffi::AnyBuffer w_hh, ffi::AnyBuffer b, ffi::AnyBuffer y, ffi::AnyBuffer hT,
                    ffi::AnyBuffer cT, ffi::AnyBuffer workspace, ffi::AnyBuffer dy,
                    ffi::AnyBuffer dhT, ffi::AnyBuffer dcT, ffi::Result<ffi::AnyBuffer> dx,
                    ffi::Result<ffi::AnyBuffer> dh0, ffi::Result<ffi::AnyBuffer> dc0,
                    ffi::Result<ffi::AnyBuffer> dw_xh, ffi::Result<ffi::AnyBuffer> dw_hh,
                    ffi::Result<ffi::AnyBuffer> db, int32_t bf16, int32_t threads) {
  Shape s = ShapeOf(x, h0, bf16, threads);
  return Guarded([&] {
    const Primitives& p = Get(s);
    const auto& pd = p.bwd_pd;
    Descs u = UserDescs(s);
    dnnl::stream stream(Engine());
    Args a(stream);
    a.Inputs(pd, u, x, h0, c0, w_xh, w_hh, b);
    a.In(DNNL_ARG_DST_LAYER, pd.dst_layer_desc(), u.y, y.untyped_data());
    a.In(DNNL_ARG_DST_ITER, pd.dst_iter_desc(), u.h, hT.untyped_data());
    a.In(DNNL_ARG_DST_ITER_C, pd.dst_iter_c_desc(), u.c, cT.untyped_data());
    a.In(DNNL_ARG_WORKSPACE, pd.workspace_desc(), pd.workspace_desc(), workspace.untyped_data());
    a.In(DNNL_ARG_DIFF_DST_LAYER, pd.diff_dst_layer_desc(), u.y, dy.untyped_data());
    a.In(DNNL_ARG_DIFF_DST_ITER, pd.diff_dst_iter_desc(), u.h, dhT.untyped_data());
    a.In(DNNL_ARG_DIFF_DST_ITER_C, pd.diff_dst_iter_c_desc(), u.c, dcT.untyped_data());
    a.Out(DNNL_ARG_DIFF_SRC_LAYER, pd.diff_src_layer_desc(), u.x, dx->untyped_data());
    a.Out(DNNL_ARG_DIFF_SRC_ITER, pd.diff_src_iter_desc(), u.h, dh0->untyped_data());
    a.Out(DNNL_ARG_DIFF_SRC_ITER_C, pd.diff_src_iter_c_desc(), u.c, dc0->untyped_data());
    a.Zeroed(DNNL_ARG_DIFF_WEIGHTS_LAYER, pd.diff_weights_layer_desc(), u.w_layer,
             dw_xh->untyped_data());
    a.Zeroed(DNNL_ARG_DIFF_WEIGHTS_ITER, pd.diff_weights_iter_desc(), u.w_iter,
             dw_hh->untyped_data());
    a.Zeroed(DNNL_ARG_DIFF_BIAS, pd.diff_bias_desc(), u.bias, db->untyped_data());
    a.Run(p.bwd, pd.scratchpad_desc());
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeeprnnOnednnLstmForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("bf16")
                                  .Attr<int32_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeeprnnOnednnLstmBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("bf16")
                                  .Attr<int32_t>("threads"));

// The forward pass's workspace in bytes, asked when the call is traced.
extern "C" int64_t deeprnn_onednn_lstm_workspace_bytes(int64_t T, int64_t N, int64_t I,
                                                       int64_t H, int bf16, int threads) {
  try {
    Shape s{T, N, I, H, bf16 != 0, threads};
    return static_cast<int64_t>(Get(s).fwd_pd.workspace_desc().get_size());
  } catch (const dnnl::error&) {
    return -1;
  }
}
