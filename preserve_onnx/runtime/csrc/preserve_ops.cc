// preserve-onnx reference CPU kernels: an onnxruntime custom-op library written against the C API.
//
// Invariant: no kernel here changes a value. `Prefetch` returns its anchor A byte for byte (and only
// reads X as a cache hint); `AllReduce` sums the ranks' inputs in the fixed order 0..p-1 so every
// rank gets identical bytes on every run; `AllGather` concatenates the ranks' inputs along an axis.
//
// Ranks are threads of one process, one InferenceSession per rank. Each session's options carry the
// config entries `preserve.rank`, `preserve.world_size`, `preserve.group` and `preserve.timeout_ms`;
// RegisterCustomOps (called once per session's options) bakes them into that registration's op
// instances. A process-global registry keyed by group implements the rendezvous: every rank publishes
// pointers to its inputs, waits until all ranks have done so, computes its own output from all of
// them, then waits at a barrier so that no input is released while another rank still reads it.
// Waits end with an error status on timeout or when the host calls `preserve_abort_group`.
//
// Prefetch's domain and op type come from `preserve.prefetch_domain` / `preserve.prefetch_op`
// (defaults `preserve` / `Prefetch`). The op instances and domains are deliberately never freed:
// onnxruntime requires them to outlive every session that uses them and gives no hook for that.

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

const OrtApi* g_api = nullptr;

OrtStatus* Fail(const std::string& msg) { return g_api->CreateStatus(ORT_FAIL, msg.c_str()); }

// Size in bytes of one element, 0 for types whose bytes cannot be copied (string, undefined).
size_t ElementSize(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32:
      return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_COMPLEX64:
      return 8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_COMPLEX128:
      return 16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16:
      return 2;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT8E4M3FN:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT8E4M3FNUZ:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT8E5M2:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT8E5M2FNUZ:
      return 1;
    default:
      return 0;
  }
}

const char* TypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING: return "string";
    default: return "an unsupported type";
  }
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

// ------------------------------------------------------------------------------------------------
// Rendezvous registry
// ------------------------------------------------------------------------------------------------

enum class Kind { kAllReduce, kAllGather };

const char* KindName(Kind k) { return k == Kind::kAllReduce ? "AllReduce" : "AllGather"; }

struct TensorRef {
  const void* data = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  size_t count = 0;
};

struct Contribution {
  bool present = false;
  Kind kind = Kind::kAllReduce;
  int64_t axis = 0;
  std::string node;
  std::vector<TensorRef> tensors;
};

struct Group {
  explicit Group(int world_size) : world(world_size), slots(world_size) {}
  std::mutex mu;
  std::condition_variable cv;
  const int world;
  uint64_t generation = 0;  // number of completed collectives
  int arrived = 0;
  int departed = 0;
  bool ready = false;  // all ranks arrived for the current generation
  bool aborted = false;
  std::string abort_reason;
  std::vector<Contribution> slots;
};

std::mutex g_registry_mu;
std::unordered_map<std::string, std::shared_ptr<Group>>& Registry() {
  static auto* groups = new std::unordered_map<std::string, std::shared_ptr<Group>>();
  return *groups;
}

std::shared_ptr<Group> FindGroup(const std::string& id) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  auto it = Registry().find(id);
  return it == Registry().end() ? nullptr : it->second;
}

struct RankConfig {
  int rank = 0;
  int world = 1;
  std::string group = "default";
  int64_t timeout_ms = 60000;
};

std::string RankList(const Group& g, bool want_present) {
  std::ostringstream s;
  bool first = true;
  for (int r = 0; r < g.world; ++r) {
    if (g.slots[r].present == want_present) {
      s << (first ? "" : ", ") << r;
      first = false;
    }
  }
  return s.str();
}

// Checks that every rank entered the same collective with compatible tensors. Returns "" when fine.
std::string CheckContributions(const Group& g) {
  const Contribution& c0 = g.slots[0];
  for (int r = 1; r < g.world; ++r) {
    const Contribution& c = g.slots[r];
    std::ostringstream s;
    if (c.kind != c0.kind) {
      s << "rank 0 is in " << KindName(c0.kind) << " '" << c0.node << "' but rank " << r << " is in "
        << KindName(c.kind) << " '" << c.node << "'";
      return s.str();
    }
    if (c.tensors.size() != c0.tensors.size()) {
      s << "rank 0 passes " << c0.tensors.size() << " tensors but rank " << r << " passes " << c.tensors.size();
      return s.str();
    }
    if (c.axis != c0.axis) {
      s << "rank 0 gathers along axis " << c0.axis << " but rank " << r << " along axis " << c.axis;
      return s.str();
    }
    for (size_t i = 0; i < c.tensors.size(); ++i) {
      if (c.tensors[i].type != c0.tensors[i].type || c.tensors[i].shape != c0.tensors[i].shape) {
        s << "input " << i << " is " << TypeName(c0.tensors[i].type) << ShapeString(c0.tensors[i].shape)
          << " on rank 0 but " << TypeName(c.tensors[i].type) << ShapeString(c.tensors[i].shape) << " on rank " << r;
        return s.str();
      }
    }
  }
  return "";
}

template <typename T>
void SumDirect(const Group& g, size_t t, size_t n, T* out) {
  const T* first = static_cast<const T*>(g.slots[0].tensors[t].data);
  std::copy(first, first + n, out);
  for (int r = 1; r < g.world; ++r) {
    const T* in = static_cast<const T*>(g.slots[r].tensors[t].data);
    for (size_t i = 0; i < n; ++i) out[i] += in[i];
  }
}

// Half-precision sum: accumulate each element in float in rank order, round once at the end.
template <typename H>
void SumHalf(const Group& g, size_t t, size_t n, H* out) {
  std::vector<const H*> ins(g.world);
  for (int r = 0; r < g.world; ++r) ins[r] = static_cast<const H*>(g.slots[r].tensors[t].data);
  for (size_t i = 0; i < n; ++i) {
    float acc = ins[0][i].ToFloat();
    for (int r = 1; r < g.world; ++r) acc += ins[r][i].ToFloat();
    out[i] = H(acc);
  }
}

// ------------------------------------------------------------------------------------------------
// Collective op and kernel
// ------------------------------------------------------------------------------------------------

struct CollectiveKernel {
  CollectiveKernel(Kind kind, const RankConfig& cfg, const OrtKernelInfo* info) : kind_(kind), cfg_(cfg) {
    Ort::ConstKernelInfo ki(info);
    try {
      node_ = ki.GetNodeName();
    } catch (const Ort::Exception&) {
      node_ = "";
    }
    if (kind_ == Kind::kAllGather) {
      axis_ = ReadInt(info, "axis", 0);
      group_size_ = ReadInt(info, "group_size", cfg_.world);
    }
  }

  static int64_t ReadInt(const OrtKernelInfo* info, const char* name, int64_t fallback) {
    int64_t v = 0;
    OrtStatus* st = g_api->KernelInfoGetAttribute_int64(info, name, &v);
    if (st != nullptr) {
      g_api->ReleaseStatus(st);
      return fallback;
    }
    return v;
  }

  std::string Where() const {
    std::ostringstream s;
    s << KindName(kind_) << " '" << node_ << "' (rank " << cfg_.rank << " of " << cfg_.world << ", group "
      << cfg_.group << ")";
    return s.str();
  }

  OrtStatus* ComputeV2(OrtKernelContext* context) {
    try {
      return Compute(context);
    } catch (const Ort::Exception& e) {
      return Fail(Where() + ": " + e.what());
    } catch (const std::exception& e) {
      return Fail(Where() + ": " + e.what());
    }
  }

  OrtStatus* Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const size_t n_in = ctx.GetInputCount();
    Contribution mine;
    mine.present = true;
    mine.kind = kind_;
    mine.node = node_;
    for (size_t i = 0; i < n_in; ++i) {
      Ort::ConstValue v = ctx.GetInput(i);
      auto info = v.GetTensorTypeAndShapeInfo();
      TensorRef t;
      t.type = info.GetElementType();
      t.shape = info.GetShape();
      t.count = info.GetElementCount();
      t.data = v.GetTensorRawData();
      if (kind_ == Kind::kAllReduce && t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT &&
          t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 && t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 &&
          t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE) {
        return Fail(Where() + ": input " + std::to_string(i) + " is " + TypeName(t.type) +
                    "; AllReduce supports float32, float16, bfloat16 and float64");
      }
      if (ElementSize(t.type) == 0) {
        return Fail(Where() + ": input " + std::to_string(i) + " has " + TypeName(t.type) + " elements");
      }
      mine.tensors.push_back(std::move(t));
    }
    if (kind_ == Kind::kAllGather) {
      if (n_in != 1) return Fail(Where() + ": expects exactly one input");
      const int64_t rank = static_cast<int64_t>(mine.tensors[0].shape.size());
      int64_t axis = axis_ < 0 ? axis_ + rank : axis_;
      if (axis < 0 || axis >= rank) {
        return Fail(Where() + ": axis " + std::to_string(axis_) + " is out of range for a tensor of rank " +
                    std::to_string(rank));
      }
      if (group_size_ != cfg_.world) {
        return Fail(Where() + ": group_size " + std::to_string(group_size_) + " differs from the world size " +
                    std::to_string(cfg_.world));
      }
      mine.axis = axis;
    }
    if (ctx.GetOutputCount() != n_in) {
      return Fail(Where() + ": has " + std::to_string(n_in) + " inputs but " + std::to_string(ctx.GetOutputCount()) +
                  " outputs");
    }

    if (cfg_.world == 1) {
      // Nothing to wait for: the sum or concatenation over one rank is the input itself.
      for (size_t i = 0; i < n_in; ++i) {
        const TensorRef& t = mine.tensors[i];
        auto out = ctx.GetOutput(i, t.shape);
        std::memcpy(out.GetTensorMutableRawData(), t.data, t.count * ElementSize(t.type));
      }
      return nullptr;
    }

    std::shared_ptr<Group> g = FindGroup(cfg_.group);
    if (!g) return Fail(Where() + ": rendezvous group is not registered");
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(cfg_.timeout_ms);

    // Phase 1: publish this rank's inputs and wait until every rank has published.
    std::unique_lock<std::mutex> lock(g->mu);
    if (g->aborted) return Fail(Where() + ": group aborted: " + g->abort_reason);
    const uint64_t my_generation = g->generation;
    g->slots[cfg_.rank] = std::move(mine);
    if (++g->arrived == g->world) {
      g->ready = true;
      g->cv.notify_all();
    }
    if (!g->cv.wait_until(lock, deadline, [&] { return g->ready || g->aborted; })) {
      std::string msg = Where() + ": timed out after " + std::to_string(cfg_.timeout_ms) +
                        " ms waiting for rank(s) " + RankList(*g, false) + " to enter the collective";
      Abort(*g, "rank " + std::to_string(cfg_.rank) + " timed out in " + KindName(kind_) + " '" + node_ + "'");
      return Fail(msg);
    }
    if (g->aborted) return Fail(Where() + ": group aborted: " + g->abort_reason);
    lock.unlock();

    // Phase 2: compute this rank's output from every rank's inputs (all ranks compute the same bytes).
    std::string problem = CheckContributions(*g);
    if (problem.empty()) {
      problem = Produce(ctx, *g);
    }

    // Phase 3: barrier, so that no rank releases an input another rank may still be reading.
    lock.lock();
    if (++g->departed == g->world) {
      for (auto& slot : g->slots) slot = Contribution();
      g->arrived = 0;
      g->departed = 0;
      g->ready = false;
      ++g->generation;
      g->cv.notify_all();
    } else if (!g->cv.wait_until(lock, deadline,
                                 [&] { return g->generation != my_generation || g->aborted; })) {
      Abort(*g, "rank " + std::to_string(cfg_.rank) + " timed out leaving " + KindName(kind_) + " '" + node_ + "'");
      return Fail(Where() + ": timed out after " + std::to_string(cfg_.timeout_ms) +
                  " ms waiting for the other ranks to finish reading the inputs");
    }
    if (g->aborted && g->generation == my_generation) {
      return Fail(Where() + ": group aborted: " + g->abort_reason);
    }
    if (!problem.empty()) return Fail(Where() + ": " + problem);
    return nullptr;
  }

  static void Abort(Group& g, const std::string& reason) {
    if (!g.aborted) {
      g.aborted = true;
      g.abort_reason = reason;
    }
    g.cv.notify_all();
  }

  // Writes this rank's outputs; returns "" or a description of what is wrong.
  std::string Produce(Ort::KernelContext& ctx, const Group& g) {
    const Contribution& c0 = g.slots[0];
    for (size_t t = 0; t < c0.tensors.size(); ++t) {
      const TensorRef& ref = c0.tensors[t];
      if (kind_ == Kind::kAllReduce) {
        auto out = ctx.GetOutput(t, ref.shape);
        void* dst = out.GetTensorMutableRawData();
        switch (ref.type) {
          case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
            SumDirect<float>(g, t, ref.count, static_cast<float*>(dst));
            break;
          case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE:
            SumDirect<double>(g, t, ref.count, static_cast<double*>(dst));
            break;
          case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
            SumHalf<Ort::Float16_t>(g, t, ref.count, static_cast<Ort::Float16_t*>(dst));
            break;
          case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16:
            SumHalf<Ort::BFloat16_t>(g, t, ref.count, static_cast<Ort::BFloat16_t*>(dst));
            break;
          default:
            return std::string("unsupported element type ") + TypeName(ref.type);
        }
      } else {
        std::vector<int64_t> shape = ref.shape;
        const size_t axis = static_cast<size_t>(c0.axis);
        shape[axis] *= g.world;
        auto out = ctx.GetOutput(t, shape);
        char* dst = static_cast<char*>(out.GetTensorMutableRawData());
        size_t outer = 1;
        for (size_t d = 0; d < axis; ++d) outer *= static_cast<size_t>(ref.shape[d]);
        size_t block = ElementSize(ref.type);
        for (size_t d = axis; d < ref.shape.size(); ++d) block *= static_cast<size_t>(ref.shape[d]);
        for (size_t o = 0; o < outer; ++o) {
          for (int r = 0; r < g.world; ++r) {
            const char* src = static_cast<const char*>(g.slots[r].tensors[t].data) + o * block;
            std::memcpy(dst + (o * g.world + r) * block, src, block);
          }
        }
      }
    }
    return "";
  }

  Kind kind_;
  RankConfig cfg_;
  std::string node_;
  int64_t axis_ = 0;
  int64_t group_size_ = 1;
};

// Copies input i's type and shape to output i (optionally scaling one axis for AllGather).
OrtStatus* CopyTypeShape(OrtShapeInferContext* ctx, size_t n, bool gather, int64_t axis, int64_t factor) {
  for (size_t i = 0; i < n; ++i) {
    OrtTensorTypeAndShapeInfo* in = nullptr;  // owned by the context: never released here
    if (OrtStatus* st = g_api->ShapeInferContext_GetInputTypeShape(ctx, i, &in)) return st;
    if (!gather) {
      if (OrtStatus* st = g_api->ShapeInferContext_SetOutputTypeShape(ctx, i, in)) return st;
      continue;
    }
    ONNXTensorElementDataType type;
    size_t rank = 0;
    if (OrtStatus* st = g_api->GetTensorElementType(in, &type)) return st;
    if (OrtStatus* st = g_api->GetDimensionsCount(in, &rank)) return st;
    std::vector<int64_t> dims(rank);
    std::vector<const char*> syms(rank, nullptr);
    if (OrtStatus* st = g_api->GetDimensions(in, dims.data(), rank)) return st;
    if (rank > 0) {
      if (OrtStatus* st = g_api->GetSymbolicDimensions(in, syms.data(), rank)) return st;
    }
    const int64_t a = axis < 0 ? axis + static_cast<int64_t>(rank) : axis;
    if (a >= 0 && a < static_cast<int64_t>(rank)) {
      dims[a] = dims[a] >= 0 ? dims[a] * factor : -1;
      syms[a] = "";
    }
    for (auto& s : syms) {
      if (s == nullptr) s = "";
    }
    OrtTensorTypeAndShapeInfo* out = nullptr;
    if (OrtStatus* st = g_api->CreateTensorTypeAndShapeInfo(&out)) return st;
    OrtStatus* st = g_api->SetTensorElementType(out, type);
    if (!st) st = g_api->SetDimensions(out, dims.data(), rank);
    if (!st && rank > 0) st = g_api->SetSymbolicDimensions(out, syms.data(), rank);
    if (!st) st = g_api->ShapeInferContext_SetOutputTypeShape(ctx, i, out);
    g_api->ReleaseTensorTypeAndShapeInfo(out);
    if (st) return st;
  }
  return nullptr;
}

// Reads an int attribute during shape inference; `fallback` when it is absent or unreadable.
int64_t InferAttrInt(OrtShapeInferContext* ctx, const char* name, int64_t fallback) {
  const OrtOpAttr* attr = nullptr;
  if (OrtStatus* st = g_api->ShapeInferContext_GetAttribute(ctx, name, &attr)) {
    g_api->ReleaseStatus(st);
    return fallback;
  }
  if (attr == nullptr) return fallback;
  int64_t v = 0;
  size_t len = 0;
  if (OrtStatus* st = g_api->ReadOpAttr(attr, ORT_OP_ATTR_INT, &v, sizeof(v), &len)) {
    g_api->ReleaseStatus(st);
    return fallback;
  }
  return v;
}

struct CollectiveOp : Ort::CustomOpBase<CollectiveOp, CollectiveKernel, true> {
  CollectiveOp(Kind kind, const RankConfig& cfg) : kind_(kind), cfg_(cfg) {
    OrtCustomOp::InferOutputShapeFn = [](const OrtCustomOp* self, OrtShapeInferContext* ctx) -> OrtStatusPtr {
      const auto* op = static_cast<const CollectiveOp*>(self);
      size_t n = 0;
      if (OrtStatus* st = g_api->ShapeInferContext_GetInputCount(ctx, &n)) return st;
      if (op->kind_ == Kind::kAllReduce) return CopyTypeShape(ctx, n, false, 0, 1);
      const int64_t axis = InferAttrInt(ctx, "axis", 0);
      const int64_t group_size = InferAttrInt(ctx, "group_size", op->cfg_.world);
      return CopyTypeShape(ctx, n, true, axis, group_size);
    };
  }

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new CollectiveKernel(kind_, cfg_, info);
      return nullptr;
    } catch (const std::exception& e) {
      return Fail(std::string(KindName(kind_)) + ": " + e.what());
    }
  }

  const char* GetName() const { return KindName(kind_); }
  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t) const {
    return kind_ == Kind::kAllReduce ? INPUT_OUTPUT_VARIADIC : INPUT_OUTPUT_REQUIRED;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t) const {
    return kind_ == Kind::kAllReduce ? INPUT_OUTPUT_VARIADIC : INPUT_OUTPUT_REQUIRED;
  }
  bool GetVariadicInputHomogeneity() const { return false; }
  bool GetVariadicOutputHomogeneity() const { return false; }

  Kind kind_;
  RankConfig cfg_;
};

// ------------------------------------------------------------------------------------------------
// Prefetch
// ------------------------------------------------------------------------------------------------

struct PrefetchKernel {
  explicit PrefetchKernel(const OrtKernelInfo* info) {
    max_size_ = CollectiveKernel::ReadInt(info, "max_size", 0);
    offset_ = CollectiveKernel::ReadInt(info, "offset", 0);
  }

  OrtStatus* ComputeV2(OrtKernelContext* context) {
    try {
      Ort::KernelContext ctx(context);
      Ort::ConstValue a = ctx.GetInput(0);
      auto a_info = a.GetTensorTypeAndShapeInfo();
      const ONNXTensorElementDataType type = a_info.GetElementType();
      const size_t elem = ElementSize(type);
      if (elem == 0) return Fail(std::string("Prefetch: the anchor has ") + TypeName(type) + " elements");
      const size_t bytes = a_info.GetElementCount() * elem;
      auto out = ctx.GetOutput(0, a_info.GetShape());
      if (bytes) std::memcpy(out.GetTensorMutableRawData(), a.GetTensorRawData(), bytes);
      Touch(ctx);
      return nullptr;
    } catch (const std::exception& e) {
      return Fail(std::string("Prefetch: ") + e.what());
    }
  }

  // Cache hint only: reads nothing into any value and never writes X. A CPU cache holds a few MiB,
  // so hinting more than kMaxTouch bytes would only cost memory bandwidth.
  static constexpr size_t kMaxTouch = size_t{2} << 20;

  void Touch(Ort::KernelContext& ctx) const {
    if (ctx.GetInputCount() < 2) return;
    Ort::ConstValue x = ctx.GetInput(1);
    if (!x || !x.IsTensor()) return;
    auto info = x.GetTensorTypeAndShapeInfo();
    const size_t elem = ElementSize(info.GetElementType());
    if (elem == 0) return;
    const size_t total = info.GetElementCount() * elem;
    const size_t begin = offset_ > 0 ? static_cast<size_t>(offset_) : 0;
    if (begin >= total) return;
    size_t end = max_size_ > 0 ? begin + static_cast<size_t>(max_size_) : total;
    end = std::min({end, total, begin + kMaxTouch});
    const char* base = static_cast<const char*>(x.GetTensorRawData());
    for (size_t off = begin; off < end; off += 64) __builtin_prefetch(base + off, 0, 3);
  }

  int64_t max_size_ = 0;
  int64_t offset_ = 0;
};

struct PrefetchOp : Ort::CustomOpBase<PrefetchOp, PrefetchKernel, true> {
  explicit PrefetchOp(std::string name) : name_(std::move(name)) {
    OrtCustomOp::InferOutputShapeFn = [](const OrtCustomOp*, OrtShapeInferContext* ctx) -> OrtStatusPtr {
      return CopyTypeShape(ctx, 1, false, 0, 1);
    };
  }
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    *kernel = new PrefetchKernel(info);
    return nullptr;
  }
  const char* GetName() const { return name_.c_str(); }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }

  std::string name_;
};

// ------------------------------------------------------------------------------------------------
// Registration
// ------------------------------------------------------------------------------------------------

OrtStatus* ConfigEntry(const OrtSessionOptions* options, const char* key, const std::string& fallback,
                       std::string* out) {
  int has = 0;
  if (OrtStatus* st = g_api->HasSessionConfigEntry(options, key, &has)) return st;
  if (!has) {
    *out = fallback;
    return nullptr;
  }
  size_t size = 0;
  if (OrtStatus* st = g_api->GetSessionConfigEntry(options, key, nullptr, &size)) return st;
  std::string value(size, '\0');
  if (OrtStatus* st = g_api->GetSessionConfigEntry(options, key, &value[0], &size)) return st;
  value.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  *out = value;
  return nullptr;
}

OrtStatus* ParseInt(const char* key, const std::string& text, int64_t* out) {
  try {
    size_t used = 0;
    *out = std::stoll(text, &used);
    if (used != text.size()) throw std::invalid_argument(text);
    return nullptr;
  } catch (const std::exception&) {
    return Fail(std::string("preserve_ops: session config entry ") + key + " is not an integer: '" + text + "'");
  }
}

OrtStatus* Register(OrtSessionOptions* options) {
  std::string domain, op, rank_s, world_s, group, timeout_s;
  if (OrtStatus* st = ConfigEntry(options, "preserve.prefetch_domain", "preserve", &domain)) return st;
  if (OrtStatus* st = ConfigEntry(options, "preserve.prefetch_op", "Prefetch", &op)) return st;
  if (OrtStatus* st = ConfigEntry(options, "preserve.rank", "0", &rank_s)) return st;
  if (OrtStatus* st = ConfigEntry(options, "preserve.world_size", "1", &world_s)) return st;
  if (OrtStatus* st = ConfigEntry(options, "preserve.group", "default", &group)) return st;
  if (OrtStatus* st = ConfigEntry(options, "preserve.timeout_ms", "60000", &timeout_s)) return st;
  int64_t rank = 0, world = 1, timeout = 0;
  if (OrtStatus* st = ParseInt("preserve.rank", rank_s, &rank)) return st;
  if (OrtStatus* st = ParseInt("preserve.world_size", world_s, &world)) return st;
  if (OrtStatus* st = ParseInt("preserve.timeout_ms", timeout_s, &timeout)) return st;
  if (world < 1 || rank < 0 || rank >= world) {
    return Fail("preserve_ops: rank " + rank_s + " is not in a world of size " + world_s);
  }
  if (timeout <= 0) return Fail("preserve_ops: preserve.timeout_ms must be positive, got " + timeout_s);
  if (domain.empty() || op.empty()) return Fail("preserve_ops: the Prefetch domain and op type must not be empty");

  RankConfig cfg;
  cfg.rank = static_cast<int>(rank);
  cfg.world = static_cast<int>(world);
  cfg.group = group;
  cfg.timeout_ms = timeout;

  if (world > 1) {
    std::lock_guard<std::mutex> lock(g_registry_mu);
    auto& slot = Registry()[group];
    if (!slot) slot = std::make_shared<Group>(cfg.world);
    if (slot->world != cfg.world) {
      return Fail("preserve_ops: group '" + group + "' has world size " + std::to_string(slot->world) +
                  ", not " + world_s);
    }
  }

  // One domain object per distinct name: the Prefetch domain may be com.microsoft itself.
  std::map<std::string, std::vector<OrtCustomOp*>> by_domain;
  by_domain[domain].push_back(new PrefetchOp(op));
  by_domain["com.microsoft"].push_back(new CollectiveOp(Kind::kAllReduce, cfg));
  by_domain["com.microsoft"].push_back(new CollectiveOp(Kind::kAllGather, cfg));
  for (auto& entry : by_domain) {
    OrtCustomOpDomain* d = nullptr;
    if (OrtStatus* st = g_api->CreateCustomOpDomain(entry.first.c_str(), &d)) return st;
    for (OrtCustomOp* o : entry.second) {
      if (OrtStatus* st = g_api->CustomOpDomain_Add(d, o)) return st;
    }
    if (OrtStatus* st = g_api->AddCustomOpDomain(options, d)) return st;
  }
  return nullptr;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                   const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // cannot even report: the runtime is older than our headers
  g_api = api;
  Ort::InitApi(api);
  try {
    return Register(options);
  } catch (const std::exception& e) {
    return Fail(std::string("preserve_ops: ") + e.what());
  }
}

// Wakes every rank waiting in a collective of `group` with an error; later collectives of the group
// fail at once until preserve_reset_group. Returns 0, or 1 when the group is unknown.
__attribute__((visibility("default"))) int preserve_abort_group(const char* group) {
  std::shared_ptr<Group> g = FindGroup(group ? group : "");
  if (!g) return 1;
  std::lock_guard<std::mutex> lock(g->mu);
  CollectiveKernel::Abort(*g, "aborted by the host after another rank failed");
  return 0;
}

// Clears the aborted state and any half-finished rendezvous of `group`. Call only when no rank of
// the group is running. Returns 0, or 1 when the group is unknown.
__attribute__((visibility("default"))) int preserve_reset_group(const char* group) {
  std::shared_ptr<Group> g = FindGroup(group ? group : "");
  if (!g) return 1;
  std::lock_guard<std::mutex> lock(g->mu);
  for (auto& slot : g->slots) slot = Contribution();
  g->arrived = 0;
  g->departed = 0;
  g->ready = false;
  g->aborted = false;
  g->abort_reason.clear();
  ++g->generation;
  g->cv.notify_all();
  return 0;
}

// Forgets `group` (after its sessions are gone). Returns 0, or 1 when the group is unknown.
__attribute__((visibility("default"))) int preserve_release_group(const char* group) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  return Registry().erase(group ? group : "") ? 0 : 1;
}

}  // extern "C"
