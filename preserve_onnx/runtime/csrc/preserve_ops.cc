// preserve-onnx reference CPU kernels: an onnxruntime custom-op library written against the C API.
//
// Invariant: no kernel here changes a value. `Prefetch` returns its anchor A byte for byte (and only
// reads X as a cache hint); `AllReduce` sums the ranks' inputs in the fixed order 0..p-1 so every
// rank gets identical bytes on every run; `AllGather` concatenates the ranks' inputs along an axis.
//
// Ranks are threads of one process, one InferenceSession per rank. Each session's options carry the
// config entries `preserve.rank`, `preserve.world_size`, `preserve.group` and `preserve.timeout_ms`;
// RegisterCustomOps (called once per session's options) bakes them into that registration's op
// instances. A process-global registry keyed by group implements the rendezvous: every rank copies
// its inputs into the group's buffers for the collective's parity (collective n uses set n % 2),
// arrives, waits until all ranks have arrived, and computes its own output from all the copies. One
// synchronisation per collective: a rank can only reach collective n+2, and overwrite set n % 2,
// after every rank has arrived at n+1, that is after every rank has finished reading set n % 2.
// Waits end with an error status on timeout or when the host calls `preserve_abort_group`.
//
// Prefetch's domain and op type come from `preserve.prefetch_domain` / `preserve.prefetch_op`
// (defaults `preserve` / `Prefetch`). The op instances and domains are deliberately never freed:
// onnxruntime requires them to outlive every session that uses them and gives no hook for that.

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <deque>
#include <dlfcn.h>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <unistd.h>
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

// How a rank waits for the others: in lock-step decoding they usually arrive within microseconds, and
// a futex sleep/wake costs tens of microseconds (dozens of collectives per step). So a waiter first
// polls the generation counter, then polls while yielding its core to any other runnable thread
// (ranks oversubscribing the CPU lose little), and only then sleeps on the condition variable.
constexpr auto kSpin = std::chrono::microseconds(20);
constexpr auto kYieldSpin = std::chrono::microseconds(2000);

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

struct Group {
  explicit Group(int world_size)
      : world(world_size), entered(new std::atomic<uint64_t>[world_size]), busy(new std::atomic<bool>[world_size]) {
    for (int p = 0; p < 2; ++p) {
      slots[p].resize(world_size);
      data[p].resize(world_size);
      arrived[p].store(0);
    }
    for (int r = 0; r < world_size; ++r) {
      entered[r].store(0);
      busy[r].store(false);
    }
  }
  const int world;
  std::atomic<uint64_t> generation{0};  // number of completed collectives
  std::atomic<int> arrived[2];          // ranks arrived at the current collective of each parity
  std::atomic<bool> aborted{false};
  // Per rank, the number of collectives it has entered: only that rank's thread writes it while the
  // group runs (the host resets it when no rank runs); others read it for the timeout message.
  std::unique_ptr<std::atomic<uint64_t>[]> entered;
  // Per rank, whether a thread is inside a collective as that rank: a second one (a thread the host
  // gave up on, still running an old step) is refused instead of corrupting the rank's buffers.
  std::unique_ptr<std::atomic<bool>[]> busy;
  // Per parity and rank: the contribution (kind, node, shapes) and a copy of each input's bytes. Each
  // rank writes only its own entries, before it arrives.
  std::vector<Contribution> slots[2];
  std::vector<std::vector<std::vector<char>>> data[2];
  std::mutex mu;  // guards abort_reason and the sleep/wake handshake
  std::condition_variable cv;
  std::string abort_reason;
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

constexpr int64_t kMaxTimeoutMs = int64_t{365} * 24 * 3600 * 1000;  // a year: "never" in practice

struct RankConfig {
  int rank = 0;
  int world = 1;
  std::string group = "default";
  int64_t timeout_ms = 60000;
  bool mpi = false;  // preserve.transport = mpi: ranks are processes, exchanging through MPI
};

// The ranks that have not entered collective number `n` yet.
std::string MissingRanks(const Group& g, uint64_t n) {
  std::ostringstream s;
  bool first = true;
  for (int r = 0; r < g.world; ++r) {
    if (g.entered[r].load(std::memory_order_relaxed) <= n) {
      s << (first ? "" : ", ") << r;
      first = false;
    }
  }
  return s.str();
}

// Checks that every rank entered the same collective with compatible tensors. Returns "" when fine.
std::string CheckContributions(const std::vector<Contribution>& slots) {
  const Contribution& c0 = slots[0];
  for (size_t r = 1; r < slots.size(); ++r) {
    const Contribution& c = slots[r];
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
void SumDirect(const std::vector<Contribution>& slots, size_t t, size_t n, T* out) {
  const T* first = static_cast<const T*>(slots[0].tensors[t].data);
  std::copy(first, first + n, out);
  for (size_t r = 1; r < slots.size(); ++r) {
    const T* in = static_cast<const T*>(slots[r].tensors[t].data);
    for (size_t i = 0; i < n; ++i) out[i] += in[i];
  }
}

// Half-precision sum: accumulate each element in float in rank order, round once at the end.
template <typename H>
void SumHalf(const std::vector<Contribution>& slots, size_t t, size_t n, H* out) {
  const size_t world = slots.size();
  std::vector<const H*> ins(world);
  for (size_t r = 0; r < world; ++r) ins[r] = static_cast<const H*>(slots[r].tensors[t].data);
  for (size_t i = 0; i < n; ++i) {
    float acc = ins[0][i].ToFloat();
    for (size_t r = 1; r < world; ++r) acc += ins[r][i].ToFloat();
    out[i] = H(acc);
  }
}

// ------------------------------------------------------------------------------------------------
// MPI transport
// ------------------------------------------------------------------------------------------------
//
// Under `mpirun`, each rank is its own process and the collectives exchange tensors through MPI.
// The library is not linked against MPI: the host (preserve_onnx/runtime/mpi.py) passes the path of
// the libmpi that mpi4py already loaded, and we take the few functions we need from that very image
// with dlopen(RTLD_NOLOAD) + dlsym. So one build serves machines with and without MPI, and the
// communicator and datatype handles the host gives us (duplicated communicators with
// MPI_ERRORS_RETURN) are valid in it. Handles are pointers in Open MPI and ints in MPICH: the
// function types are instantiated for the handle size the host reports.
//
// A collective posts, for every peer, nonblocking receives of a fixed-size header (collective number,
// kind, node, axis, input types and shapes) and of each input's bytes, and nonblocking sends of its
// own; it then polls until all complete, so it can give up on a deadline or on a failure notice
// instead of blocking in MPI forever. The result is computed locally from the contributions in rank
// order 0..p-1 by the same code as the thread transport, so both transports give the same bytes.
//
// A control communicator carries two notices, each a fixed 1 KiB message: FAIL (a rank failed, with
// its reason; every rank waiting in a collective stops with that reason) and EXIT (a rank has
// reported its failure and is about to exit; the host waits for every peer's EXIT so that no process
// leaves, and has mpirun kill the rest, before the others have printed their errors).

constexpr int kTagHeader = 11;
constexpr int kTagData = 12;
constexpr int kTagControl = 13;
constexpr int kCtlFail = 1;
constexpr int kCtlExit = 2;
constexpr size_t kControlBytes = 1024;
constexpr size_t kHeaderWords = 128;
constexpr size_t kStatusBytes = 256;  // larger than MPI_Status of Open MPI (24) and MPICH (20)
constexpr size_t kChunk = size_t{1} << 30;  // MPI counts are ints: larger tensors go in chunks
constexpr int64_t kMagic = 0x5052455345525645;  // "PRESERVE"

struct Request {
  alignas(8) unsigned char handle[8] = {};  // MPI_Request: a pointer (Open MPI) or an int (MPICH)
  bool active = false;
  bool is_recv = false;
  int peer = -1;
  int tensor = -1;  // -1: header
};

// The MPI calls the transport makes, independent of the handle type.
class MpiLink {
 public:
  virtual ~MpiLink() = default;
  virtual int Isend(const void* buf, int bytes, int peer, bool control, int tag, Request* req) = 0;
  virtual int Irecv(void* buf, int bytes, int peer, bool control, int tag, Request* req) = 0;
  virtual int Test(Request* req, int* done) = 0;
  virtual int Cancel(Request* req) = 0;
  virtual std::string ErrorString(int code) = 0;
};

template <typename H>
class MpiLinkT final : public MpiLink {
 public:
  using IsendFn = int (*)(const void*, int, H, int, int, H, void*);
  using IrecvFn = int (*)(void*, int, H, int, int, H, void*);
  using TestFn = int (*)(void*, int*, void*);
  using CancelFn = int (*)(void*);
  using ErrorStringFn = int (*)(int, char*, int*);

  MpiLinkT(void* lib, int64_t data_comm, int64_t ctrl_comm, int64_t byte_type)
      : data_(static_cast<H>(data_comm)), ctrl_(static_cast<H>(ctrl_comm)), byte_(static_cast<H>(byte_type)) {
    isend_ = reinterpret_cast<IsendFn>(dlsym(lib, "MPI_Isend"));
    irecv_ = reinterpret_cast<IrecvFn>(dlsym(lib, "MPI_Irecv"));
    test_ = reinterpret_cast<TestFn>(dlsym(lib, "MPI_Test"));
    cancel_ = reinterpret_cast<CancelFn>(dlsym(lib, "MPI_Cancel"));
    error_string_ = reinterpret_cast<ErrorStringFn>(dlsym(lib, "MPI_Error_string"));
  }
  bool Complete() const { return isend_ && irecv_ && test_ && cancel_ && error_string_; }

  int Isend(const void* buf, int bytes, int peer, bool control, int tag, Request* req) override {
    req->active = true;
    return isend_(buf, bytes, byte_, peer, tag, control ? ctrl_ : data_, req->handle);
  }
  int Irecv(void* buf, int bytes, int peer, bool control, int tag, Request* req) override {
    req->active = true;
    return irecv_(buf, bytes, byte_, peer, tag, control ? ctrl_ : data_, req->handle);
  }
  int Test(Request* req, int* done) override {
    unsigned char status[kStatusBytes];
    *done = 0;
    int rc = test_(req->handle, done, status);
    if (rc != 0 || *done) req->active = false;
    return rc;
  }
  int Cancel(Request* req) override { return cancel_(req->handle); }
  std::string ErrorString(int code) override {
    char text[1024] = {};
    int len = 0;
    if (error_string_(code, text, &len) != 0) return "MPI error " + std::to_string(code);
    return std::string(text, std::min<int>(std::max(len, 0), sizeof(text) - 1));
  }

 private:
  H data_, ctrl_, byte_;
  IsendFn isend_ = nullptr;
  IrecvFn irecv_ = nullptr;
  TestFn test_ = nullptr;
  CancelFn cancel_ = nullptr;
  ErrorStringFn error_string_ = nullptr;
};

struct ControlMessage {
  int32_t type = 0;
  int32_t from = -1;
  char text[kControlBytes - 8] = {};
};
static_assert(sizeof(ControlMessage) == kControlBytes, "control messages are 1 KiB");

struct MpiGroup {
  std::mutex mu;  // one caller at a time: a kernel, or the host between runs
  int rank = 0;
  int world = 1;
  std::unique_ptr<MpiLink> link;
  uint64_t collectives = 0;  // collectives this process has entered (the same count on every rank)
  std::vector<ControlMessage> ctl_in;  // one posted receive per peer
  std::vector<Request> ctl_req;
  std::vector<bool> peer_exited;
  std::deque<ControlMessage> ctl_out;  // send buffers, kept alive (and in place) while the sends run
  std::deque<Request> ctl_out_req;
  bool sent_fail = false;
  bool sent_exit = false;
  int failed_rank = -1;  // first FAIL notice received (or this rank's own)
  std::string failure;
};

std::mutex g_mpi_mu;
std::unordered_map<std::string, std::shared_ptr<MpiGroup>>& MpiRegistry() {
  static auto* groups = new std::unordered_map<std::string, std::shared_ptr<MpiGroup>>();
  return *groups;
}

std::shared_ptr<MpiGroup> FindMpiGroup(const std::string& id) {
  std::lock_guard<std::mutex> lock(g_mpi_mu);
  auto it = MpiRegistry().find(id);
  return it == MpiRegistry().end() ? nullptr : it->second;
}

thread_local std::string t_mpi_error;

// Receives any control notices that arrived (caller holds g.mu). Returns "" or an MPI error.
std::string PollControl(MpiGroup& g) {
  for (int p = 0; p < g.world; ++p) {
    if (p == g.rank || !g.ctl_req[p].active) continue;
    int done = 0;
    if (int rc = g.link->Test(&g.ctl_req[p], &done)) return "MPI_Test: " + g.link->ErrorString(rc);
    if (!done) continue;
    const ControlMessage& m = g.ctl_in[p];
    if (m.type == kCtlFail || m.type == kCtlExit) {
      if (g.failed_rank < 0) {
        g.failed_rank = m.from;
        g.failure = std::string(m.text, strnlen(m.text, sizeof(m.text)));
      }
      if (m.type == kCtlExit) g.peer_exited[p] = true;
    }
    if (!g.peer_exited[p]) {
      if (int rc = g.link->Irecv(&g.ctl_in[p], kControlBytes, p, true, kTagControl, &g.ctl_req[p])) {
        return "MPI_Irecv: " + g.link->ErrorString(rc);
      }
    }
  }
  return "";
}

// Sends a notice to every peer (caller holds g.mu). Small messages: they complete eagerly.
std::string SendControl(MpiGroup& g, int type, const std::string& text) {
  for (int p = 0; p < g.world; ++p) {
    if (p == g.rank) continue;
    g.ctl_out.emplace_back();
    g.ctl_out_req.emplace_back();
    ControlMessage& m = g.ctl_out.back();
    m.type = type;
    m.from = g.rank;
    std::strncpy(m.text, text.c_str(), sizeof(m.text) - 1);
    if (int rc = g.link->Isend(&m, kControlBytes, p, true, kTagControl, &g.ctl_out_req.back())) {
      return "MPI_Isend: " + g.link->ErrorString(rc);
    }
  }
  return "";
}

// Header of one collective: everything the ranks must agree on, in 128 int64 words.
std::vector<int64_t> EncodeHeader(uint64_t number, Kind kind, const Contribution& c) {
  std::vector<int64_t> h(kHeaderWords, 0);
  h[0] = kMagic;
  h[1] = static_cast<int64_t>(number);
  h[2] = static_cast<int64_t>(kind);
  h[3] = c.axis;
  h[4] = static_cast<int64_t>(c.tensors.size());
  std::memcpy(&h[6], c.node.data(), std::min<size_t>(c.node.size(), 8 * 8 - 1));  // words 6..13
  uint64_t hash = 1469598103934665603ull;  // FNV-1a over every tensor's type and shape
  auto mix = [&](int64_t v) {
    for (int b = 0; b < 8; ++b) hash = (hash ^ ((static_cast<uint64_t>(v) >> (8 * b)) & 0xff)) * 1099511628211ull;
  };
  size_t w = 16;
  bool complete = true;
  for (const TensorRef& t : c.tensors) {
    mix(t.type);
    mix(static_cast<int64_t>(t.shape.size()));
    for (int64_t d : t.shape) mix(d);
    if (complete && w + 2 + t.shape.size() <= kHeaderWords) {
      h[w++] = t.type;
      h[w++] = static_cast<int64_t>(t.shape.size());
      for (int64_t d : t.shape) h[w++] = d;
    } else {
      complete = false;
    }
  }
  h[5] = complete ? 1 : 0;
  h[14] = static_cast<int64_t>(hash);
  return h;
}

// Rebuilds a Contribution (without data) from a header, so CheckContributions can describe a mismatch.
Contribution DecodeHeader(const std::vector<int64_t>& h) {
  Contribution c;
  c.present = true;
  c.kind = static_cast<Kind>(h[2]);
  c.axis = h[3];
  char name[64] = {};
  std::memcpy(name, &h[6], 63);
  c.node = name;
  size_t w = 16;
  for (int64_t i = 0; i < h[4] && h[5] == 1 && w + 2 <= kHeaderWords; ++i) {
    TensorRef t;
    t.type = static_cast<ONNXTensorElementDataType>(h[w++]);
    const int64_t nd = h[w++];
    for (int64_t d = 0; d < nd && w < kHeaderWords; ++d) t.shape.push_back(h[w++]);
    c.tensors.push_back(std::move(t));
  }
  return c;
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
    // Precision pinning (docs/design.md §7, "float16 on the CPU provider"): onnxruntime's CPU provider
    // runs a float16 collective that sits alone between two operators it runs in float32 (it has no
    // float16 MatMul) in float32 too, and drops the Casts around it, so the collective would see
    // partial results never rounded to float16. Behind a Prefetch chain the same collective stays
    // float16 and sees them rounded: the optimized model would differ from the original. So a
    // collective computes in its model precision whatever onnxruntime hands it. onnxruntime marks
    // what it moved: a float16 output it runs in float32 is renamed `InsertedPrecisionFreeCast_<name>`
    // (`InsertedCast_` in older releases) and a Cast back to float16 put behind it; such an output's
    // input values are rounded to float16 first and an AllReduce's sum rounded once to float16,
    // exactly what the float16 kernel computes (the values stay stored as float32).
    const size_t outputs = ki.GetOutputCount();
    narrowed_.assign(outputs, false);
    for (size_t i = 0; i < outputs; ++i) {
      try {
        const std::string name = ki.GetOutputName(i);
        const bool renamed = name.rfind("InsertedPrecisionFreeCast_", 0) == 0 || name.rfind("InsertedCast_", 0) == 0;
        narrowed_[i] = renamed && ki.GetOutputTypeInfo(i).GetTensorTypeAndShapeInfo().GetElementType() ==
                                      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
      } catch (const Ort::Exception&) {
        narrowed_[i] = false;
      }
    }
  }

  // Rounds float32 values to the nearest float16 (ties to even), kept as float32.
  static void RoundToHalf(float* v, size_t n) {
    for (size_t i = 0; i < n; ++i) v[i] = Ort::Float16_t(v[i]).ToFloat();
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
    // Inputs of outputs that were float16 in the model (precision pinning, above): rounded copies.
    std::vector<std::vector<float>> rounded(n_in);
    for (size_t i = 0; i < n_in && i < narrowed_.size(); ++i) {
      TensorRef& t = mine.tensors[i];
      if (!narrowed_[i] || t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) continue;
      const float* src = static_cast<const float*>(t.data);
      rounded[i].assign(src, src + t.count);
      RoundToHalf(rounded[i].data(), t.count);
      t.data = rounded[i].data();
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
    if (cfg_.mpi) return ComputeMpi(ctx, std::move(mine));

    std::shared_ptr<Group> g = FindGroup(cfg_.group);
    if (!g) return Fail(Where() + ": rendezvous group is not registered");
    if (g->busy[cfg_.rank].exchange(true, std::memory_order_acquire)) {
      return Fail(Where() + ": another thread is already in a collective as this rank (an earlier run "
                  "that did not stop); this group cannot run until it returns");
    }
    struct Release {
      std::atomic<bool>& flag;
      ~Release() { flag.store(false, std::memory_order_release); }
    } release{g->busy[cfg_.rank]};
    if (g->aborted.load(std::memory_order_acquire)) return Fail(Where() + ": group aborted: " + AbortReason(*g));

    // Publish a copy of this rank's inputs in the set of this collective's parity, then arrive.
    const uint64_t n = g->entered[cfg_.rank].load(std::memory_order_relaxed);
    const int parity = static_cast<int>(n & 1);
    auto& copies = g->data[parity][cfg_.rank];
    copies.resize(mine.tensors.size());
    for (size_t t = 0; t < mine.tensors.size(); ++t) {
      TensorRef& ref = mine.tensors[t];
      const size_t bytes = ref.count * ElementSize(ref.type);
      copies[t].resize(bytes);
      if (bytes) std::memcpy(copies[t].data(), ref.data, bytes);
      ref.data = copies[t].data();
    }
    g->slots[parity][cfg_.rank] = std::move(mine);
    g->entered[cfg_.rank].store(n + 1, std::memory_order_relaxed);
    if (g->arrived[parity].fetch_add(1, std::memory_order_acq_rel) + 1 == g->world) {
      // Last to arrive: this collective is complete. The counter of this parity is next used by
      // collective n+2, which no rank can enter before every rank has arrived at n+1.
      g->arrived[parity].store(0, std::memory_order_relaxed);
      g->generation.store(n + 1, std::memory_order_release);
      { std::lock_guard<std::mutex> wake(g->mu); }
      g->cv.notify_all();
    } else if (!WaitForOthers(*g, n) && g->generation.load(std::memory_order_acquire) <= n) {
      std::string msg = Where() + ": timed out after " + std::to_string(cfg_.timeout_ms) +
                        " ms waiting for rank(s) " + MissingRanks(*g, n) + " to enter the collective";
      std::lock_guard<std::mutex> lock(g->mu);
      Abort(*g, "rank " + std::to_string(cfg_.rank) + " timed out in " + KindName(kind_) + " '" + node_ + "'");
      return Fail(msg);
    }
    if (g->generation.load(std::memory_order_acquire) <= n) {
      return Fail(Where() + ": group aborted: " + AbortReason(*g));
    }

    // Compute this rank's output from every rank's copies (all ranks compute the same bytes).
    const std::vector<Contribution>& slots = g->slots[parity];
    std::string problem = CheckContributions(slots);
    if (problem.empty()) {
      problem = Produce(ctx, slots);
    }
    if (!problem.empty()) return Fail(Where() + ": " + problem);
    return nullptr;
  }

  // The MPI transport: see "MPI transport" above. Holds the group's lock for the whole collective
  // (a process runs one collective at a time; the host only calls in between runs).
  OrtStatus* ComputeMpi(Ort::KernelContext& ctx, Contribution mine) {
    std::shared_ptr<MpiGroup> gp = FindMpiGroup(cfg_.group);
    if (!gp) return Fail(Where() + ": the MPI group is not bound (preserve_mpi_bind)");
    MpiGroup& g = *gp;
    std::lock_guard<std::mutex> lock(g.mu);
    if (std::string e = PollControl(g); !e.empty()) return Fail(Where() + ": " + e);
    if (g.failed_rank >= 0) return Fail(Where() + ": " + Stopped(g));
    const uint64_t number = g.collectives++;
    const int world = g.world, me = g.rank;
    const std::vector<int64_t> my_header = EncodeHeader(number, kind_, mine);
    std::vector<std::vector<int64_t>> headers(world, std::vector<int64_t>(kHeaderWords, 0));
    std::vector<std::vector<std::vector<char>>> bufs(world);
    std::vector<bool> header_done(world, false);
    header_done[me] = true;
    std::deque<Request> reqs;
    std::string mpi_error;
    auto post = [&](bool recv, void* buf, size_t bytes, int peer, int tag, int tensor) {
      if (!mpi_error.empty()) return;
      size_t off = 0;
      do {  // at least one message, also for an empty tensor
        const size_t n = std::min(kChunk, bytes - off);
        reqs.emplace_back();
        Request& r = reqs.back();
        r.is_recv = recv;
        r.peer = peer;
        r.tensor = tensor;
        char* at = static_cast<char*>(buf) + off;
        int rc = recv ? g.link->Irecv(at, static_cast<int>(n), peer, false, tag, &r)
                      : g.link->Isend(at, static_cast<int>(n), peer, false, tag, &r);
        if (rc) {
          r.active = false;
          mpi_error = std::string(recv ? "MPI_Irecv" : "MPI_Isend") + " with rank " + std::to_string(peer) +
                      ": " + g.link->ErrorString(rc);
          return;
        }
        off += n;
      } while (off < bytes);
    };
    for (int p = 0; p < world; ++p) {  // receives first, so that sends find them posted
      if (p == me) continue;
      post(true, headers[p].data(), kHeaderWords * sizeof(int64_t), p, kTagHeader, -1);
      bufs[p].resize(mine.tensors.size());
      for (size_t t = 0; t < mine.tensors.size(); ++t) {
        const TensorRef& ref = mine.tensors[t];
        bufs[p][t].resize(ref.count * ElementSize(ref.type));
        post(true, bufs[p][t].data(), bufs[p][t].size(), p, kTagData, static_cast<int>(t));
      }
    }
    for (int p = 0; p < world; ++p) {
      if (p == me) continue;
      post(false, const_cast<int64_t*>(my_header.data()), kHeaderWords * sizeof(int64_t), p, kTagHeader, -1);
      for (size_t t = 0; t < mine.tensors.size(); ++t) {
        const TensorRef& ref = mine.tensors[t];
        post(false, const_cast<void*>(ref.data), ref.count * ElementSize(ref.type), p, kTagData, static_cast<int>(t));
      }
    }

    // Poll until everything completed: spin for a millisecond (the peer is usually about to arrive),
    // then yield, then sleep in short naps so that a rank waiting long leaves its core to others.
    const auto start = std::chrono::steady_clock::now();
    const auto deadline = start + std::chrono::milliseconds(cfg_.timeout_ms);
    size_t pending = 0;
    for (const Request& r : reqs) pending += r.active ? 1 : 0;
    std::string failure;
    while (pending > 0 && failure.empty()) {
      for (Request& r : reqs) {
        if (!r.active) continue;
        int done = 0;
        if (int rc = g.link->Test(&r, &done)) {
          --pending;
          if (mpi_error.empty()) {
            mpi_error = std::string(r.is_recv ? "receiving from" : "sending to") + " rank " + std::to_string(r.peer) +
                        ": " + g.link->ErrorString(rc);
          }
          continue;
        }
        if (done) {
          --pending;
          if (r.is_recv && r.tensor < 0) header_done[r.peer] = true;
        }
      }
      if (pending == 0) break;
      if (std::string e = PollControl(g); !e.empty()) failure = e;
      if (g.failed_rank >= 0) failure = Stopped(g);
      const auto now = std::chrono::steady_clock::now();
      if (failure.empty() && now > deadline) {
        std::ostringstream s;
        s << "timed out after " << cfg_.timeout_ms << " ms waiting for rank(s) ";
        bool first = true;
        for (int p = 0; p < world; ++p) {
          if (!header_done[p]) {
            s << (first ? "" : ", ") << p;
            first = false;
          }
        }
        if (first) s << "(all arrived; the transfer did not finish)";
        s << " to enter the collective";
        failure = s.str();
      }
      if (!failure.empty()) break;
      if (now - start < std::chrono::milliseconds(1)) continue;
      if (now - start < std::chrono::milliseconds(20)) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
    }
    if (!failure.empty()) {
      for (Request& r : reqs) {
        if (r.active && r.is_recv) g.link->Cancel(&r);
      }
      // The process is going down (the host exits without MPI_Finalize after a failed collective):
      // sends still in flight are left to MPI.
      return Fail(Where() + ": " + failure);
    }

    // Every rank's header is here: check that all entered the same collective with the same inputs.
    std::vector<Contribution> slots(world);
    for (int p = 0; p < world; ++p) {
      if (p == me) continue;
      const std::vector<int64_t>& h = headers[p];
      if (h[0] != kMagic) return Fail(Where() + ": rank " + std::to_string(p) + " sent a malformed header");
      if (h[1] != my_header[1]) {
        return Fail(Where() + ": rank " + std::to_string(p) + " is in collective #" + std::to_string(h[1]) +
                    " but this rank is in #" + std::to_string(my_header[1]) +
                    " (the ranks do not run matching models or steps)");
      }
      const bool same = h[2] == my_header[2] && h[3] == my_header[3] && h[4] == my_header[4] && h[14] == my_header[14];
      if (!same) {
        std::vector<Contribution> pair = {DecodeHeader(me < p ? my_header : h), DecodeHeader(me < p ? h : my_header)};
        std::string what = CheckContributions(pair);
        const std::string lo = std::to_string(std::min(me, p)), hi = std::to_string(std::max(me, p));
        if (what.empty()) what = "rank 0 and rank 1 pass inputs of different types or shapes";
        // CheckContributions names the pair "rank 0" and "rank 1": name the real ranks.
        std::string out;
        for (size_t i = 0; i < what.size();) {
          if (what.compare(i, 6, "rank 0") == 0) {
            out += "rank " + lo;
            i += 6;
          } else if (what.compare(i, 6, "rank 1") == 0) {
            out += "rank " + hi;
            i += 6;
          } else {
            out += what[i++];
          }
        }
        return Fail(Where() + ": " + out);
      }
      slots[p] = mine;  // same kind, axis, types and shapes: only the data differ
      for (size_t t = 0; t < mine.tensors.size(); ++t) slots[p].tensors[t].data = bufs[p][t].data();
    }
    if (!mpi_error.empty()) return Fail(Where() + ": " + mpi_error);
    slots[me] = std::move(mine);
    std::string problem = Produce(ctx, slots);
    if (!problem.empty()) return Fail(Where() + ": " + problem);
    return nullptr;
  }

  static std::string Stopped(const MpiGroup& g) {
    if (g.failed_rank == g.rank) return "this rank failed earlier: " + g.failure;
    return "stopped because rank " + std::to_string(g.failed_rank) + " failed: " + g.failure;
  }

  // Waits until collective `n` is complete or the group is aborted (true), or the deadline passes
  // (false).
  bool WaitForOthers(Group& g, uint64_t n) const {
    auto done = [&] {
      return g.generation.load(std::memory_order_acquire) > n || g.aborted.load(std::memory_order_acquire);
    };
    const auto start = std::chrono::steady_clock::now();
    while (!done()) {
      const auto waited = std::chrono::steady_clock::now() - start;
      if (waited < kSpin) {
        for (int i = 0; i < 64; ++i) CpuRelax();
      } else if (waited < kYieldSpin) {
        std::this_thread::yield();
      } else {
        std::unique_lock<std::mutex> lock(g.mu);
        return g.cv.wait_until(lock, start + std::chrono::milliseconds(cfg_.timeout_ms), done);
      }
    }
    return true;
  }

  static std::string AbortReason(Group& g) {
    std::lock_guard<std::mutex> lock(g.mu);
    return g.abort_reason;
  }

  // Call with g.mu held.
  static void Abort(Group& g, const std::string& reason) {
    if (!g.aborted.load(std::memory_order_relaxed)) {
      g.abort_reason = reason;
      g.aborted.store(true, std::memory_order_release);
    }
    g.cv.notify_all();
  }

  // Writes this rank's outputs; returns "" or a description of what is wrong.
  std::string Produce(Ort::KernelContext& ctx, const std::vector<Contribution>& slots) {
    const int world = static_cast<int>(slots.size());
    const Contribution& c0 = slots[0];
    for (size_t t = 0; t < c0.tensors.size(); ++t) {
      const TensorRef& ref = c0.tensors[t];
      if (kind_ == Kind::kAllReduce) {
        auto out = ctx.GetOutput(t, ref.shape);
        void* dst = out.GetTensorMutableRawData();
        switch (ref.type) {
          case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
            SumDirect<float>(slots, t, ref.count, static_cast<float*>(dst));
            if (t < narrowed_.size() && narrowed_[t]) RoundToHalf(static_cast<float*>(dst), ref.count);
            break;
          case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE:
            SumDirect<double>(slots, t, ref.count, static_cast<double*>(dst));
            break;
          case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
            SumHalf<Ort::Float16_t>(slots, t, ref.count, static_cast<Ort::Float16_t*>(dst));
            break;
          case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16:
            SumHalf<Ort::BFloat16_t>(slots, t, ref.count, static_cast<Ort::BFloat16_t*>(dst));
            break;
          default:
            return std::string("unsupported element type ") + TypeName(ref.type);
        }
      } else {
        std::vector<int64_t> shape = ref.shape;
        const size_t axis = static_cast<size_t>(c0.axis);
        shape[axis] *= world;
        auto out = ctx.GetOutput(t, shape);
        char* dst = static_cast<char*>(out.GetTensorMutableRawData());
        size_t outer = 1;
        for (size_t d = 0; d < axis; ++d) outer *= static_cast<size_t>(ref.shape[d]);
        size_t block = ElementSize(ref.type);
        for (size_t d = axis; d < ref.shape.size(); ++d) block *= static_cast<size_t>(ref.shape[d]);
        for (size_t o = 0; o < outer; ++o) {
          for (int r = 0; r < world; ++r) {
            const char* src = static_cast<const char*>(slots[r].tensors[t].data) + o * block;
            std::memcpy(dst + (o * world + r) * block, src, block);
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
  std::vector<bool> narrowed_;  // per output: float16 in the model, run in float32 by onnxruntime
};

// Shape inference (docs/design.md §7): output i gets input i's element type and dims, values and names
// alike. onnxruntime writes a dim that has neither a value nor a name as the value -1, and a
// `Shape -> Reshape` downstream then reads that as a literal -1 ("Target shape may not have multiple
// -1 dimensions"), so such a dim gets a fresh symbolic name instead: the graph never holds a -1.
// AllGather's gathered axis becomes value x group size when the value is known, else a fresh name.
//
// The context names neither the node nor its outputs, so fresh names are numbered per op instance (one
// per session's registration) in the order onnxruntime infers the graph: `preserve.<op>.dim<n>`. A
// name is never given twice: two dims of one name are the same size to onnxruntime.
//
// An input of unknown rank arrives as rank 0, like a scalar (the API cannot tell them apart). Where
// onnxruntime's own inference types the output right (AllGather: like its one input; Prefetch when A
// and X have one type: like X, its last input), the output is left without a shape, right for both.
// Elsewhere only SetOutputTypeShape sets the type, and only with a shape, so the output is written as a
// scalar: AllReduce (variadic with mixed types: onnxruntime types none of its outputs) and a Prefetch
// whose X has another type cannot pass on a tensor of unknown rank.
struct FreshDims {
  std::string prefix;  // "preserve.<op>.dim"
  std::atomic<uint64_t> next{0};
  std::string Next() { return prefix + std::to_string(next.fetch_add(1)); }
};

struct ShapeRule {
  bool types_here = true;  // false: onnxruntime's generic inference types the outputs right
  bool gather = false;     // AllGather: `axis` grows `group_size` times
  int64_t axis = 0;
  int64_t group_size = 1;
};

OrtStatus* InputElementType(OrtShapeInferContext* ctx, size_t i, ONNXTensorElementDataType* type) {
  OrtTensorTypeAndShapeInfo* in = nullptr;  // owned by the context: never released here
  if (OrtStatus* st = g_api->ShapeInferContext_GetInputTypeShape(ctx, i, &in)) return st;
  return g_api->GetTensorElementType(in, type);
}

OrtStatus* InferOutputs(OrtShapeInferContext* ctx, size_t n, FreshDims& fresh, const ShapeRule& rule) {
  for (size_t i = 0; i < n; ++i) {
    OrtTensorTypeAndShapeInfo* in = nullptr;  // owned by the context: never released here
    if (OrtStatus* st = g_api->ShapeInferContext_GetInputTypeShape(ctx, i, &in)) return st;
    ONNXTensorElementDataType type;
    size_t rank = 0;
    if (OrtStatus* st = g_api->GetTensorElementType(in, &type)) return st;
    if (OrtStatus* st = g_api->GetDimensionsCount(in, &rank)) return st;
    if (rank == 0 && !rule.types_here) continue;
    std::vector<int64_t> dims(rank);
    std::vector<const char*> syms(rank, nullptr);
    if (OrtStatus* st = g_api->GetDimensions(in, dims.data(), rank)) return st;
    if (rank > 0) {
      if (OrtStatus* st = g_api->GetSymbolicDimensions(in, syms.data(), rank)) return st;
    }
    const int64_t axis = rule.axis < 0 ? rule.axis + static_cast<int64_t>(rank) : rule.axis;
    const bool grows = rule.gather && rule.group_size != 1 && axis >= 0 && axis < static_cast<int64_t>(rank);
    // A dim with a value keeps an empty name (SetOutputTypeShape writes the value), every other dim a name.
    std::vector<std::string> names(rank);
    for (size_t d = 0; d < rank; ++d) {
      if (grows && static_cast<int64_t>(d) == axis) {
        if (dims[d] >= 0 && rule.group_size > 0) {
          dims[d] *= rule.group_size;
        } else {
          names[d] = fresh.Next();  // `seq` x group size has no name of its own
        }
      } else if (dims[d] < 0) {
        names[d] = syms[d] != nullptr && syms[d][0] != '\0' ? std::string(syms[d]) : fresh.Next();
      }
    }
    std::vector<const char*> out_syms(rank);
    for (size_t d = 0; d < rank; ++d) out_syms[d] = names[d].c_str();
    OrtTensorTypeAndShapeInfo* out = nullptr;
    if (OrtStatus* st = g_api->CreateTensorTypeAndShapeInfo(&out)) return st;
    OrtStatus* st = g_api->SetTensorElementType(out, type);
    if (!st) st = g_api->SetDimensions(out, dims.data(), rank);
    if (!st && rank > 0) st = g_api->SetSymbolicDimensions(out, out_syms.data(), rank);
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
    fresh_.prefix = std::string("preserve.") + KindName(kind) + ".dim";
    OrtCustomOp::InferOutputShapeFn = [](const OrtCustomOp* self, OrtShapeInferContext* ctx) -> OrtStatusPtr {
      const auto* op = static_cast<const CollectiveOp*>(self);
      size_t n = 0;
      if (OrtStatus* st = g_api->ShapeInferContext_GetInputCount(ctx, &n)) return st;
      ShapeRule rule;
      if (op->kind_ == Kind::kAllGather) {
        rule.types_here = false;
        rule.gather = true;
        rule.axis = InferAttrInt(ctx, "axis", 0);
        rule.group_size = InferAttrInt(ctx, "group_size", op->cfg_.world);
      }
      return InferOutputs(ctx, n, op->fresh_, rule);
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
  mutable FreshDims fresh_;
};

// ------------------------------------------------------------------------------------------------
// Prefetch
// ------------------------------------------------------------------------------------------------

// Counters of every Prefetch kernel of the process, for tests and debugging (preserve_prefetch_counters
// reads them): hints issued, hints skipped by the validity range (above max_tokens, below min_tokens),
// and the bytes of X the issued hints covered (docs/design.md §3, "Live ranges": the hinted range, of
// which the CPU touches at most kMaxTouch bytes).
std::atomic<uint64_t> g_hints_issued{0};
std::atomic<uint64_t> g_hints_skipped_above{0};
std::atomic<uint64_t> g_hints_skipped_below{0};
std::atomic<uint64_t> g_hinted_bytes{0};

// With recording on (preserve_prefetch_record), every issued hint appends its byte ranges of X here.
std::mutex g_record_mu;
std::atomic<bool> g_recording{false};
std::vector<std::pair<uint64_t, uint64_t>> g_recorded;  // [begin, end) byte offsets into X

constexpr int64_t kNoAttr = INT64_MIN;

// The attribute names a model spells Prefetch's attributes with (the vendor naming, `preserve.prefetch_attr_*`).
struct PrefetchAttrs {
  std::string max_size = "max_size", offset = "offset", max_tokens = "max_tokens", min_tokens = "min_tokens",
              seq_axis = "seq_axis", window = "window";
};

// The byte ranges [begin, end) of X that a hint covers, contiguous ones merged. Live ranges
// (docs/design.md §3, "Live ranges"): without L the whole tensor; with L, for each index of the axes
// before seq_axis in row-major order, the positions [max(0, L_b - W), L_b) of the sequence axis (L_b
// clamped to [0, X's length], W = window, 0 = all) with all trailing axes; `offset` and `max_size`
// (0 = to the end) then select bytes of that concatenation. b indexes X's axis 0 (a scalar or
// one-value L applies to every b).
using Ranges = std::vector<std::pair<uint64_t, uint64_t>>;

std::string LiveRanges(const std::vector<int64_t>& shape, size_t elem, const int64_t* lengths, size_t n_lengths,
                       int64_t seq_axis, int64_t window, int64_t offset, int64_t max_size, Ranges* out) {
  out->clear();
  const int64_t rank = static_cast<int64_t>(shape.size());
  uint64_t total = elem;
  for (int64_t d : shape) total *= static_cast<uint64_t>(d);
  Ranges live;  // in X's bytes, in row-major order
  if (lengths == nullptr) {
    if (total) live.emplace_back(0, total);
  } else {
    const int64_t axis = seq_axis < 0 ? seq_axis + rank : seq_axis;
    if (axis < 0 || axis >= rank) {
      return "seq_axis " + std::to_string(seq_axis) + " is out of range for X of rank " + std::to_string(rank);
    }
    uint64_t outer = 1, inner = elem;
    for (int64_t d = 0; d < axis; ++d) outer *= static_cast<uint64_t>(shape[d]);
    for (int64_t d = axis + 1; d < rank; ++d) inner *= static_cast<uint64_t>(shape[d]);
    const int64_t length = shape[axis];
    // Blocks per index of axis 0 (with seq_axis 0 there is one block, and L must have one value).
    const uint64_t batch = axis == 0 ? 1 : static_cast<uint64_t>(shape[0]);
    if (n_lengths != 1 && n_lengths != batch) {
      return "L has " + std::to_string(n_lengths) + " values for " + std::to_string(batch) +
             (axis == 0 ? " sequence (seq_axis 0)" : " sequences (X's axis 0)");
    }
    const uint64_t per_batch = batch ? outer / batch : 0;
    for (uint64_t o = 0; o < outer; ++o) {
      const int64_t l = lengths[n_lengths == 1 ? 0 : o / per_batch];
      const int64_t hi = std::min(std::max<int64_t>(l, 0), length);
      const int64_t lo = window > 0 ? std::max<int64_t>(0, hi - window) : 0;
      if (hi <= lo) continue;
      const uint64_t base = o * static_cast<uint64_t>(length) * inner;
      const uint64_t begin = base + static_cast<uint64_t>(lo) * inner, end = base + static_cast<uint64_t>(hi) * inner;
      if (!live.empty() && live.back().second == begin) {
        live.back().second = end;
      } else {
        live.emplace_back(begin, end);
      }
    }
  }
  // Select [offset, offset + max_size) of the concatenation.
  uint64_t skip = offset > 0 ? static_cast<uint64_t>(offset) : 0;
  uint64_t want = max_size > 0 ? static_cast<uint64_t>(max_size) : UINT64_MAX;
  for (const auto& r : live) {
    if (want == 0) break;
    const uint64_t size = r.second - r.first;
    if (skip >= size) {
      skip -= size;
      continue;
    }
    const uint64_t begin = r.first + skip;
    const uint64_t take = std::min(want, r.second - begin);
    out->emplace_back(begin, begin + take);
    want -= take;
    skip = 0;
  }
  return "";
}

struct PrefetchKernel {
  PrefetchKernel(const OrtKernelInfo* info, const PrefetchAttrs& names) {
    max_size_ = CollectiveKernel::ReadInt(info, names.max_size.c_str(), 0);
    offset_ = CollectiveKernel::ReadInt(info, names.offset.c_str(), 0);
    max_tokens_ = CollectiveKernel::ReadInt(info, names.max_tokens.c_str(), 0);
    min_tokens_ = CollectiveKernel::ReadInt(info, names.min_tokens.c_str(), 0);
    seq_axis_ = CollectiveKernel::ReadInt(info, names.seq_axis.c_str(), kNoAttr);
    window_ = CollectiveKernel::ReadInt(info, names.window.c_str(), 0);
    seq_axis_name_ = names.seq_axis;
    window_name_ = names.window;
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
      const std::vector<int64_t> shape = a_info.GetShape();
      auto out = ctx.GetOutput(0, shape);
      if (bytes) std::memcpy(out.GetTensorMutableRawData(), a.GetTensorRawData(), bytes);
      // The validity range (docs/design.md §3): above max_tokens or below min_tokens tokens per step (the
      // anchor's dims but the last) the prefetch saves no time, so the hint is skipped. The output is the same.
      int64_t tokens = 1;
      for (size_t i = 0; i + 1 < shape.size(); ++i) tokens *= shape[i];
      return Hint(ctx, tokens);
    } catch (const std::exception& e) {
      return Fail(std::string("Prefetch: ") + e.what());
    }
  }

  // Cache hint only: reads nothing into any value and never writes X. A CPU core's L2 holds a few
  // hundred KiB (the hint must not evict what the running kernels use),
  // so touching more than kMaxTouch bytes would only cost memory bandwidth.
  static constexpr size_t kMaxTouch = size_t{256} << 10;

  OrtStatus* Hint(Ort::KernelContext& ctx, int64_t tokens) const {
    const size_t inputs = ctx.GetInputCount();
    Ort::ConstValue x = inputs >= 2 ? ctx.GetInput(1) : Ort::ConstValue{nullptr};
    Ort::ConstValue l = inputs >= 3 ? ctx.GetInput(2) : Ort::ConstValue{nullptr};
    if (l && seq_axis_ == kNoAttr) {
      return Fail("Prefetch: the length input L needs the attribute '" + seq_axis_name_ + "' (docs/design.md §3)");
    }
    if (window_ < 0) {
      return Fail("Prefetch: '" + window_name_ + "' must be 0 (all valid positions) or positive, got " +
                  std::to_string(window_));
    }
    std::vector<int64_t> lengths;
    if (l) {
      auto l_info = l.GetTensorTypeAndShapeInfo();
      const size_t n = l_info.GetElementCount();
      const ONNXTensorElementDataType lt = l_info.GetElementType();
      if (l_info.GetShape().size() > 1 || n == 0) {
        return Fail("Prefetch: the length input L must be a scalar or one value per sequence, got shape " +
                    ShapeString(l_info.GetShape()));
      }
      if (lt == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) {
        const int32_t* p = l.GetTensorData<int32_t>();
        lengths.assign(p, p + n);
      } else if (lt == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
        const int64_t* p = l.GetTensorData<int64_t>();
        lengths.assign(p, p + n);
      } else {
        return Fail(std::string("Prefetch: the length input L must be int32 or int64, got ") + TypeName(lt));
      }
    }
    if (max_tokens_ > 0 && tokens > max_tokens_) {
      g_hints_skipped_above.fetch_add(1, std::memory_order_relaxed);
      return nullptr;
    }
    if (min_tokens_ > 0 && tokens < min_tokens_) {
      g_hints_skipped_below.fetch_add(1, std::memory_order_relaxed);
      return nullptr;
    }
    g_hints_issued.fetch_add(1, std::memory_order_relaxed);
    if (!x || !x.IsTensor()) return nullptr;
    auto info = x.GetTensorTypeAndShapeInfo();
    const size_t elem = ElementSize(info.GetElementType());
    if (elem == 0) return nullptr;
    Ranges ranges;
    const std::string error = LiveRanges(info.GetShape(), elem, l ? lengths.data() : nullptr, lengths.size(),
                                         seq_axis_, window_, offset_, max_size_, &ranges);
    if (!error.empty()) return Fail("Prefetch: " + error);
    uint64_t hinted = 0;
    size_t budget = kMaxTouch;
    const char* base = static_cast<const char*>(x.GetTensorRawData());
    for (const auto& r : ranges) {
      hinted += r.second - r.first;
      const size_t end = static_cast<size_t>(std::min<uint64_t>(r.second, r.first + budget));
      for (size_t off = static_cast<size_t>(r.first); off < end; off += 64) __builtin_prefetch(base + off, 0, 3);
      budget -= end - static_cast<size_t>(r.first);
    }
    g_hinted_bytes.fetch_add(hinted, std::memory_order_relaxed);
    if (g_recording.load(std::memory_order_relaxed)) {
      std::lock_guard<std::mutex> lock(g_record_mu);
      g_recorded.insert(g_recorded.end(), ranges.begin(), ranges.end());
    }
    return nullptr;
  }

  int64_t max_size_ = 0;
  int64_t offset_ = 0;
  int64_t max_tokens_ = 0;  // 0 = no limit
  int64_t min_tokens_ = 0;  // 0 = no limit
  int64_t seq_axis_ = kNoAttr;
  int64_t window_ = 0;      // 0 = all valid positions
  std::string seq_axis_name_, window_name_;
};


// Inputs A, X and the optional length input L (docs/design.md §3, "Live ranges").
struct PrefetchOp : Ort::CustomOpBase<PrefetchOp, PrefetchKernel, true> {
  PrefetchOp(std::string name, PrefetchAttrs attrs) : name_(std::move(name)), attrs_(std::move(attrs)) {
    fresh_.prefix = "preserve." + name_ + ".dim";
    OrtCustomOp::InferOutputShapeFn = [](const OrtCustomOp* self, OrtShapeInferContext* ctx) -> OrtStatusPtr {
      ShapeRule rule;
      size_t n = 0;
      if (OrtStatus* st = g_api->ShapeInferContext_GetInputCount(ctx, &n)) return st;
      ONNXTensorElementDataType a = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, last = a;
      if (OrtStatus* st = InputElementType(ctx, 0, &a)) return st;
      if (OrtStatus* st = InputElementType(ctx, n - 1, &last)) return st;
      rule.types_here = a != last;  // onnxruntime would type the output like the last input
      return InferOutputs(ctx, 1, static_cast<const PrefetchOp*>(self)->fresh_, rule);
    };
  }
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    *kernel = new PrefetchKernel(info, attrs_);
    return nullptr;
  }
  const char* GetName() const { return name_.c_str(); }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }

  std::string name_;
  PrefetchAttrs attrs_;
  mutable FreshDims fresh_;
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
  PrefetchAttrs attrs;
  for (auto* entry : {&attrs.max_size, &attrs.offset, &attrs.max_tokens, &attrs.min_tokens, &attrs.seq_axis,
                      &attrs.window}) {
    const std::string fallback = *entry;  // the default spelling is the attribute's own name
    if (OrtStatus* st = ConfigEntry(options, ("preserve.prefetch_attr_" + fallback).c_str(), fallback, entry)) {
      return st;
    }
  }
  if (OrtStatus* st = ConfigEntry(options, "preserve.rank", "0", &rank_s)) return st;
  if (OrtStatus* st = ConfigEntry(options, "preserve.world_size", "1", &world_s)) return st;
  if (OrtStatus* st = ConfigEntry(options, "preserve.group", "default", &group)) return st;
  if (OrtStatus* st = ConfigEntry(options, "preserve.timeout_ms", "60000", &timeout_s)) return st;
  std::string transport;
  if (OrtStatus* st = ConfigEntry(options, "preserve.transport", "threads", &transport)) return st;
  if (transport != "threads" && transport != "mpi") {
    return Fail("preserve_ops: preserve.transport must be 'threads' or 'mpi', got '" + transport + "'");
  }
  // `0` for a model that does not import com.microsoft: it can hold none of our collectives, and a custom
  // op registered in that domain hides onnxruntime's own com.microsoft ops from such a model (the
  // FusedMatMul that onnxruntime's optimizer inserts then fails to resolve), so none is registered.
  std::string com_microsoft;
  if (OrtStatus* st = ConfigEntry(options, "preserve.com_microsoft", "1", &com_microsoft)) return st;
  if (com_microsoft != "0" && com_microsoft != "1") {
    return Fail("preserve_ops: preserve.com_microsoft must be '0' or '1', got '" + com_microsoft + "'");
  }
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
  cfg.timeout_ms = std::min<int64_t>(timeout, kMaxTimeoutMs);  // deadlines must not overflow the clock
  cfg.mpi = transport == "mpi";

  if (cfg.mpi && world > 1) {
    std::shared_ptr<MpiGroup> g = FindMpiGroup(group);
    if (!g) return Fail("preserve_ops: MPI group '" + group + "' is not bound (preserve_mpi_bind)");
    if (g->world != cfg.world || g->rank != cfg.rank) {
      return Fail("preserve_ops: MPI group '" + group + "' is rank " + std::to_string(g->rank) + " of " +
                  std::to_string(g->world) + ", not " + rank_s + " of " + world_s);
    }
  } else if (world > 1) {
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
  if (com_microsoft == "1" || domain != "com.microsoft") {
    by_domain[domain].push_back(new PrefetchOp(op, attrs));
  }
  if (com_microsoft == "1") {
    by_domain["com.microsoft"].push_back(new CollectiveOp(Kind::kAllReduce, cfg));
    by_domain["com.microsoft"].push_back(new CollectiveOp(Kind::kAllGather, cfg));
  }
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
  // Sessions are created on several threads at once: publish the API pointers once.
  static std::once_flag init_once;
  std::call_once(init_once, [api] {
    g_api = api;
    Ort::InitApi(api);
  });
  try {
    return Register(options);
  } catch (const std::exception& e) {
    return Fail(std::string("preserve_ops: ") + e.what());
  }
}

// The onnxruntime C API version the library was built against: it loads in onnxruntime 1.<this> and newer
// (onnxruntime 1.N serves API versions up to N). The host checks it before registering the library.
__attribute__((visibility("default"))) int preserve_ort_api_version() { return ORT_API_VERSION; }

// Prefetch counters since the library was loaded (process-wide): hints issued, skipped above max_tokens,
// skipped below min_tokens, and the bytes of X the issued hints covered (docs/design.md §3, "Live ranges").
__attribute__((visibility("default"))) void preserve_prefetch_counters(uint64_t* issued, uint64_t* skipped_above,
                                                                      uint64_t* skipped_below, uint64_t* bytes) {
  if (issued) *issued = g_hints_issued.load(std::memory_order_relaxed);
  if (skipped_above) *skipped_above = g_hints_skipped_above.load(std::memory_order_relaxed);
  if (skipped_below) *skipped_below = g_hints_skipped_below.load(std::memory_order_relaxed);
  if (bytes) *bytes = g_hinted_bytes.load(std::memory_order_relaxed);
}

// Recording of the hinted byte ranges of X, for tests: `on` 1 starts (clearing what was recorded), 0 stops.
__attribute__((visibility("default"))) void preserve_prefetch_record(int on) {
  std::lock_guard<std::mutex> lock(g_record_mu);
  g_recorded.clear();
  g_recording.store(on != 0);
}

// Copies up to `capacity` recorded ranges as (begin, end) pairs into `out` and returns how many were recorded.
__attribute__((visibility("default"))) uint64_t preserve_prefetch_recorded(uint64_t* out, uint64_t capacity) {
  std::lock_guard<std::mutex> lock(g_record_mu);
  for (uint64_t i = 0; i < capacity && i < g_recorded.size(); ++i) {
    out[2 * i] = g_recorded[i].first;
    out[2 * i + 1] = g_recorded[i].second;
  }
  return g_recorded.size();
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
// the group is running. Returns 0, 1 when the group is unknown, or 2 (and changes nothing) when a
// thread is still inside a collective of the group.
__attribute__((visibility("default"))) int preserve_reset_group(const char* group) {
  std::shared_ptr<Group> g = FindGroup(group ? group : "");
  if (!g) return 1;
  std::lock_guard<std::mutex> lock(g->mu);
  for (int r = 0; r < g->world; ++r) {
    if (g->busy[r].load(std::memory_order_acquire)) return 2;
  }
  // Ranks may have stopped at different collectives: start every rank at the next parity-0 collective.
  const uint64_t next = (g->generation.load() + 2) & ~uint64_t{1};
  for (int p = 0; p < 2; ++p) {
    for (auto& slot : g->slots[p]) slot = Contribution();
    g->arrived[p].store(0);
  }
  for (int r = 0; r < g->world; ++r) g->entered[r].store(next);
  g->generation.store(next);
  g->abort_reason.clear();
  g->aborted.store(false);
  g->cv.notify_all();
  return 0;
}

// Forgets `group` (after its sessions are gone). Returns 0, or 1 when the group is unknown.
__attribute__((visibility("default"))) int preserve_release_group(const char* group) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  return Registry().erase(group ? group : "") ? 0 : 1;
}

// ---- MPI transport, host side (see "MPI transport"). All return 0 on success; on failure 1 and
// preserve_mpi_last_error() says why. ----

// Binds `group` to two duplicated communicators (data, control) of the MPI library at `libmpi`, which
// must already be loaded in this process (by mpi4py). Handles are passed as integers of `handle_size`
// bytes (8: Open MPI pointers, 4: MPICH ints). Posts the control receives.
__attribute__((visibility("default"))) int preserve_mpi_bind(const char* group, const char* libmpi, int handle_size,
                                                             int64_t data_comm, int64_t ctrl_comm,
                                                             int64_t byte_type, int rank, int world) {
  t_mpi_error.clear();
  if (!group || !libmpi || world < 1 || rank < 0 || rank >= world) {
    t_mpi_error = "preserve_mpi_bind: invalid arguments";
    return 1;
  }
  void* lib = dlopen(libmpi, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
  if (!lib) {
    const char* e = dlerror();
    t_mpi_error = std::string("preserve_mpi_bind: ") + libmpi + " is not loaded in this process" + (e ? std::string(": ") + e : "");
    return 1;
  }
  auto g = std::make_shared<MpiGroup>();
  g->rank = rank;
  g->world = world;
  if (handle_size == 8) {
    auto link = std::make_unique<MpiLinkT<int64_t>>(lib, data_comm, ctrl_comm, byte_type);
    if (link->Complete()) g->link = std::move(link);
  } else if (handle_size == 4) {
    auto link = std::make_unique<MpiLinkT<int32_t>>(lib, data_comm, ctrl_comm, byte_type);
    if (link->Complete()) g->link = std::move(link);
  } else {
    t_mpi_error = "preserve_mpi_bind: unsupported MPI handle size " + std::to_string(handle_size);
    return 1;
  }
  if (!g->link) {
    t_mpi_error = std::string("preserve_mpi_bind: ") + libmpi + " lacks MPI_Isend/MPI_Irecv/MPI_Test/MPI_Cancel";
    return 1;
  }
  g->ctl_in.resize(world);
  g->ctl_req.resize(world);
  g->peer_exited.assign(world, false);
  for (int p = 0; p < world; ++p) {
    if (p == rank) continue;
    if (int rc = g->link->Irecv(&g->ctl_in[p], kControlBytes, p, true, kTagControl, &g->ctl_req[p])) {
      t_mpi_error = "preserve_mpi_bind: MPI_Irecv: " + g->link->ErrorString(rc);
      return 1;
    }
  }
  std::lock_guard<std::mutex> lock(g_mpi_mu);
  MpiRegistry()[group] = g;
  return 0;
}

__attribute__((visibility("default"))) const char* preserve_mpi_last_error() { return t_mpi_error.c_str(); }

// Tells every peer that this rank failed (once; not when a peer's failure is what stopped this one).
__attribute__((visibility("default"))) int preserve_mpi_fail(const char* group, const char* reason) {
  std::shared_ptr<MpiGroup> g = FindMpiGroup(group ? group : "");
  if (!g) {
    t_mpi_error = "unknown MPI group";
    return 1;
  }
  std::lock_guard<std::mutex> lock(g->mu);
  PollControl(*g);
  if (g->sent_fail || (g->failed_rank >= 0 && g->failed_rank != g->rank)) return 0;
  g->sent_fail = true;
  g->failed_rank = g->rank;
  g->failure = reason ? reason : "";
  t_mpi_error = SendControl(*g, kCtlFail, g->failure);
  return t_mpi_error.empty() ? 0 : 1;
}

// The first failure known to this rank: copies its reason into buf and returns the failed rank, or
// -1 when no rank failed (so far).
__attribute__((visibility("default"))) int preserve_mpi_failure(const char* group, char* buf, int size) {
  std::shared_ptr<MpiGroup> g = FindMpiGroup(group ? group : "");
  if (!g) return -1;
  std::lock_guard<std::mutex> lock(g->mu);
  PollControl(*g);
  if (g->failed_rank < 0) return -1;
  if (buf && size > 0) {
    std::strncpy(buf, g->failure.c_str(), static_cast<size_t>(size) - 1);
    buf[size - 1] = '\0';
  }
  return g->failed_rank;
}

// After a failure: tells the peers this rank is about to exit, then waits up to timeout_s until every
// peer said the same. Returns the number of peers not heard from.
__attribute__((visibility("default"))) int preserve_mpi_finish(const char* group, double timeout_s) {
  std::shared_ptr<MpiGroup> g = FindMpiGroup(group ? group : "");
  if (!g) return 0;
  std::lock_guard<std::mutex> lock(g->mu);
  if (!g->sent_exit) {
    g->sent_exit = true;
    SendControl(*g, kCtlExit, g->failure);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (true) {
    PollControl(*g);
    int missing = 0;
    for (int p = 0; p < g->world; ++p) missing += (p != g->rank && !g->peer_exited[p]) ? 1 : 0;
    if (missing == 0 || std::chrono::steady_clock::now() > deadline) return missing;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

// After a clean run: cancels the control receives (so MPI_Finalize finds nothing pending) and forgets
// the group. Call before the communicators are freed.
__attribute__((visibility("default"))) int preserve_mpi_unbind(const char* group) {
  std::shared_ptr<MpiGroup> g;
  {
    std::lock_guard<std::mutex> lock(g_mpi_mu);
    auto it = MpiRegistry().find(group ? group : "");
    if (it == MpiRegistry().end()) return 1;
    g = it->second;
    MpiRegistry().erase(it);
  }
  std::lock_guard<std::mutex> lock(g->mu);
  for (int p = 0; p < g->world; ++p) {
    if (g->ctl_req[p].active) g->link->Cancel(&g->ctl_req[p]);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  auto all_done = [&] {
    bool done_all = true;
    for (auto& r : g->ctl_req) {
      int done = 0;
      if (r.active && g->link->Test(&r, &done) == 0 && !done) done_all = false;
    }
    for (auto& r : g->ctl_out_req) {
      int done = 0;
      if (r.active && g->link->Test(&r, &done) == 0 && !done) done_all = false;
    }
    return done_all;
  };
  while (!all_done() && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  return 0;
}

}  // extern "C"

namespace {
char g_sigterm_message[512] = {};
size_t g_sigterm_length = 0;

void OnSigterm(int) {
  if (g_sigterm_length) {
    ssize_t ignored = write(2, g_sigterm_message, g_sigterm_length);
    (void)ignored;
  }
  _exit(143);
}
}  // namespace

extern "C" {

// Under mpirun a rank that dies takes the job down with SIGTERM to the others, usually while they wait
// inside a kernel where no Python signal handler can run: this handler prints `message` (one line) to
// stderr and exits with 143. An empty message restores the default action.
__attribute__((visibility("default"))) int preserve_set_sigterm_message(const char* message) {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  if (!message || !*message) {
    sa.sa_handler = SIG_DFL;
    g_sigterm_length = 0;
  } else {
    std::strncpy(g_sigterm_message, message, sizeof(g_sigterm_message) - 2);
    g_sigterm_length = std::strlen(g_sigterm_message);
    if (g_sigterm_message[g_sigterm_length - 1] != '\n') g_sigterm_message[g_sigterm_length++] = '\n';
    sa.sa_handler = OnSigterm;
  }
  sigemptyset(&sa.sa_mask);
  return sigaction(SIGTERM, &sa, nullptr) == 0 ? 0 : 1;
}

}  // extern "C"
