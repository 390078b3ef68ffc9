// mededge's native gRPC front end: a CPython extension module (`_frontend`).
//
// It owns the public gRPC port. A grpc++ asynchronous generic service takes every call, and
// threads of its own wait on one completion queue, so the thread that reads a request off the
// socket is the thread that hands it to Python: no Python on the transport path, no hand-off
// between threads for a request.
//
// * ModelInfer and ModelStreamInfer (the hot path): the request's bytes go to a Python
//   callable, `dispatch(stream, payload, remaining_s, authorization, peer, reply, inline)`
//   (remaining_s None without a deadline; inline: another thread is waiting on the queue,
//   so this one may run the model before returning). It answers, at once or later from any
//   thread, by calling `reply(code, message, parts)` exactly once:
//   code 0 with the encoded response (bytes or a sequence of buffers, joined here in one copy),
//   or a gRPC status code and its message. It returns an object with `cancel()` (called when
//   the client goes away before the answer) or None. Stream answers go out in request order.
// * Every other method is proxied, bytes in and bytes out, to the Python grpcio server on a
//   private Unix socket, with the caller's metadata and deadline, and the caller's peer in the
//   `mededge-peer` metadata entry (one sent by the caller is dropped).
//
// Lifetimes: a Call is reference counted; each operation pending on the completion queue and
// each reply not yet given hold one reference. After stop() no operation is started.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace {

const char kModelInfer[] = "/inference.GRPCInferenceService/ModelInfer";
const char kModelStreamInfer[] = "/inference.GRPCInferenceService/ModelStreamInfer";
const char kPeerKey[] = "mededge-peer";

struct Core;
class Call;

enum class Op { kAccept, kDone, kRead, kWrite, kFinish, kUpStart, kUpRead, kUpWrite,
                kUpWritesDone, kUpFinish };

struct Tag {
  Call* call;
  Op op;
};

// What the threads share: the server, its queue, the upstream channel, the Python dispatch.
struct Core {
  std::unique_ptr<grpc::ServerCompletionQueue> cq;
  std::unique_ptr<grpc::Server> server;
  grpc::AsyncGenericService service;
  std::unique_ptr<grpc::GenericStub> upstream;
  PyObject* dispatch = nullptr;  // owned reference
  std::mutex gate;               // held while starting an operation; see closed
  bool closed = false;           // the queue is shut down: start nothing more
  std::atomic<int> waiting{0};   // threads inside cq->Next, ready to read the next request
};

PyObject* NewReply(Call* call, uint64_t seq);

class Call {
 public:
  explicit Call(Core* core) : core_(core), stream_(&ctx_) {}

  // Arm this call to receive the next RPC of any method.
  void Listen() {
    refs_ = 2;  // the accept and the done notification
    ctx_.AsyncNotifyWhenDone(&done_tag_);
    core_->service.RequestCall(&ctx_, &stream_, core_->cq.get(), core_->cq.get(), &accept_tag_);
  }

  void Ref() { refs_++; }
  void Unref() {
    if (--refs_ == 0) delete this;
  }

  void OnEvent(Op op, bool ok) {
    switch (op) {
      case Op::kAccept: return OnAccept(ok);
      case Op::kDone: return OnDone();
      case Op::kRead: return proxy_ ? OnProxyRead(ok) : OnInferRead(ok);
      case Op::kWrite: return proxy_ ? OnProxyWritten(ok) : OnInferWritten(ok);
      case Op::kFinish: return;
      case Op::kUpStart: return OnUpStart(ok);
      case Op::kUpRead: return OnUpRead(ok);
      case Op::kUpWrite: return OnUpWritten(ok);
      case Op::kUpWritesDone: return;
      case Op::kUpFinish: return OnUpFinish();
    }
  }

  // The answer to request `seq`; the GIL need not be held (the write to the client may block
  // on the socket, or be preempted by the woken client, and other requests need the GIL
  // meanwhile). Returns the request's handle, whose reference the caller drops with the GIL.
  PyObject* Reply(uint64_t seq, grpc::Status status, grpc::ByteBuffer payload) {
    std::lock_guard<std::mutex> lock(mu_);
    PyObject* dropped = nullptr;
    auto handle = handles_.find(seq);
    if (handle != handles_.end()) {
      dropped = handle->second;
      handles_.erase(handle);
    } else {
      replied_.insert(seq);  // dispatch is still running: it must not keep the handle
    }
    if (finished_) return dropped;
    if (!stream_mode_) {
      finished_ = true;
      if (status.ok()) {
        Start(Op::kFinish, [&](void* tag) {
          stream_.WriteAndFinish(payload, grpc::WriteOptions(), grpc::Status::OK, tag);
        });
      } else {
        Start(Op::kFinish, [&](void* tag) { stream_.Finish(status, tag); });
      }
      return dropped;
    }
    if (!status.ok() && !failed_) {  // a failure outside any answer ends the stream
      failed_ = true;
      fail_status_ = status;
    } else {
      answers_.emplace(seq, std::move(payload));
    }
    WriteNextAnswer();
    return dropped;
  }

 private:
  ~Call() {
    // Handles left here belong to requests whose reply will never come (the server stopped).
    if (!handles_.empty() && Py_IsInitialized()) {
      PyGILState_STATE gil = PyGILState_Ensure();
      for (auto& item : handles_) Py_XDECREF(item.second);
      PyGILState_Release(gil);
    }
  }

  // Start one queue operation under the gate; false (and no reference taken) after stop().
  template <typename F>
  bool Start(Op op, F&& start) {
    std::lock_guard<std::mutex> lock(core_->gate);
    if (core_->closed) return false;
    Ref();
    start(TagFor(op));
    return true;
  }

  void* TagFor(Op op) {
    switch (op) {
      case Op::kRead: return &read_tag_;
      case Op::kWrite: return &write_tag_;
      case Op::kFinish: return &finish_tag_;
      case Op::kUpStart: return &up_start_tag_;
      case Op::kUpRead: return &up_read_tag_;
      case Op::kUpWrite: return &up_write_tag_;
      case Op::kUpWritesDone: return &up_writes_done_tag_;
      case Op::kUpFinish: return &up_finish_tag_;
      default: return nullptr;
    }
  }

  void OnAccept(bool ok) {
    // Not accepted: the server is shutting down. The done notification of a call that never
    // started may not come, so its reference is left and the listener leaks (one per thread).
    if (!ok) return;
    (new Call(core_))->ListenUnderGate();
    const std::string& method = ctx_.method();
    std::lock_guard<std::mutex> lock(mu_);
    if (method == kModelInfer || method == kModelStreamInfer) {
      stream_mode_ = method == kModelStreamInfer;
      Start(Op::kRead, [&](void* tag) { stream_.Read(&read_buf_, tag); });
      return;
    }
    proxy_ = true;
    StartUpstream(method);
  }

 public:
  void ListenUnderGate() {
    std::lock_guard<std::mutex> lock(core_->gate);
    if (core_->closed) {
      delete this;
      return;
    }
    Listen();
  }

 private:
  void OnDone() {
    if (!ctx_.IsCancelled()) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_ = true;
      if (proxy_) up_ctx_.TryCancel();
      if (handles_.empty()) return;
    }
    if (!Py_IsInitialized()) return;
    // The GIL before mu_, as everywhere: the handles' references are Python's to touch.
    PyGILState_STATE gil = PyGILState_Ensure();
    std::vector<PyObject*> handles;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& item : handles_) {
        Py_XINCREF(item.second);
        handles.push_back(item.second);
      }
    }
    for (PyObject* handle : handles) {
      PyObject* result = PyObject_CallMethod(handle, "cancel", nullptr);
      if (result == nullptr) PyErr_Clear();
      Py_XDECREF(result);
      Py_DECREF(handle);
    }
    PyGILState_Release(gil);
  }

  // --- the hot path: ModelInfer / ModelStreamInfer ----------------------------------------

  void OnInferRead(bool ok) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!ok) {  // the client half-closed (a stream's end) or went away
      reads_done_ = true;
      if (!stream_mode_ && !finished_) {
        finished_ = true;
        Start(Op::kFinish, [&](void* tag) {
          stream_.Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                      "ModelInfer: no request message"), tag);
        });
      } else {
        WriteNextAnswer();
      }
      return;
    }
    uint64_t seq = next_seq_++;
    std::vector<grpc::Slice> slices;
    read_buf_.Dump(&slices);
    read_buf_.Clear();
    double remaining = 0.0;  // seconds to the deadline, negative once it passed
    auto deadline = ctx_.deadline();
    bool has_deadline = deadline != std::chrono::system_clock::time_point::max();
    if (has_deadline) {
      remaining = std::chrono::duration<double>(deadline - std::chrono::system_clock::now())
                      .count();
    }
    std::string authorization;
    for (const auto& entry : ctx_.client_metadata()) {
      if (entry.first == "authorization") {
        authorization.assign(entry.second.data(), entry.second.size());
      }
    }
    std::string peer = ctx_.peer();
    bool stream = stream_mode_;
    Ref();  // held by the reply object
    lock.unlock();

    PyGILState_STATE gil = PyGILState_Ensure();
    size_t total = 0;
    for (const auto& s : slices) total += s.size();
    PyObject* payload = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(total));
    PyObject* reply = NewReply(this, seq);
    PyObject* handle = nullptr;
    if (payload != nullptr && reply != nullptr) {
      char* out = PyBytes_AS_STRING(payload);
      for (const auto& s : slices) {
        std::memcpy(out, s.begin(), s.size());
        out += s.size();
      }
      PyObject* auth = authorization.empty()
                           ? (Py_INCREF(Py_None), Py_None)
                           : PyUnicode_DecodeUTF8(authorization.data(),
                                                  static_cast<Py_ssize_t>(authorization.size()),
                                                  "replace");
      PyObject* seconds = has_deadline ? PyFloat_FromDouble(remaining)
                                       : (Py_INCREF(Py_None), Py_None);
      // Running the model on this thread is fine while another thread reads the sockets.
      PyObject* inline_ok = core_->waiting.load() > 0 ? Py_True : Py_False;
      handle = PyObject_CallFunction(core_->dispatch, "ONNNs#OO", stream ? Py_True : Py_False,
                                     payload, seconds, auth, peer.data(),
                                     static_cast<Py_ssize_t>(peer.size()), reply, inline_ok);
      payload = nullptr;  // stolen by N
    }
    if (handle == nullptr) {  // dispatch itself failed: a bug, answer INTERNAL
      PyErr_Print();
      if (reply != nullptr) {
        PyObject* res = PyObject_CallFunction(reply, "is", 13, "internal error in dispatch");
        if (res == nullptr) PyErr_Clear();
        Py_XDECREF(res);
      } else {
        Unref();
      }
    }
    {
      std::lock_guard<std::mutex> relock(mu_);
      bool answered = replied_.erase(seq) > 0;
      if (handle != nullptr && handle != Py_None && !answered && !cancelled_) {
        handles_[seq] = handle;  // cancelled if the client goes away first
        handle = nullptr;
      }
    }
    Py_XDECREF(handle);
    Py_XDECREF(payload);
    Py_XDECREF(reply);
    PyGILState_Release(gil);

    if (stream) {
      std::lock_guard<std::mutex> relock(mu_);
      if (!finished_ && !cancelled_) {
        Start(Op::kRead, [&](void* tag) { stream_.Read(&read_buf_, tag); });
      }
    }
  }

  // Called with mu_ held.
  void WriteNextAnswer() {
    if (finished_ || writing_) return;
    if (failed_) {
      finished_ = true;
      Start(Op::kFinish, [&](void* tag) { stream_.Finish(fail_status_, tag); });
      return;
    }
    auto next = answers_.find(next_write_);
    if (next != answers_.end()) {
      grpc::ByteBuffer buf = std::move(next->second);
      answers_.erase(next);
      next_write_++;
      writing_ = Start(Op::kWrite, [&](void* tag) { stream_.Write(buf, tag); });
      return;
    }
    if (reads_done_ && next_write_ == next_seq_) {
      finished_ = true;
      Start(Op::kFinish, [&](void* tag) { stream_.Finish(grpc::Status::OK, tag); });
    }
  }

  void OnInferWritten(bool ok) {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) {  // the client went away; the done notification cancels what is pending
      finished_ = true;
      return;
    }
    WriteNextAnswer();
  }

  // --- every other method: a byte-for-byte proxy to the Python server ---------------------

  void StartUpstream(const std::string& method) {
    up_ctx_.set_deadline(ctx_.deadline());
    for (const auto& entry : ctx_.client_metadata()) {
      std::string key(entry.first.data(), entry.first.size());
      if (key.empty() || key[0] == ':' || key.rfind("grpc-", 0) == 0 || key == kPeerKey ||
          key == "user-agent" || key == "te" || key == "content-type") {
        continue;
      }
      up_ctx_.AddMetadata(key, std::string(entry.second.data(), entry.second.size()));
    }
    up_ctx_.AddMetadata(kPeerKey, ctx_.peer());
    Start(Op::kUpStart, [&](void* tag) {
      up_ = core_->upstream->PrepareCall(&up_ctx_, method, core_->cq.get());
      up_->StartCall(tag);
    });
  }

  void OnUpStart(bool ok) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!ok) {
      up_read_done_ = true;
      FinishUpstream();
      return;
    }
    Start(Op::kRead, [&](void* tag) { stream_.Read(&read_buf_, tag); });
    Start(Op::kUpRead, [&](void* tag) { up_->Read(&up_buf_, tag); });
  }

  void OnProxyRead(bool ok) {  // a message from the client, or its half-close
    std::lock_guard<std::mutex> lock(mu_);
    if (up_read_done_) return;
    if (!ok) {
      Start(Op::kUpWritesDone, [&](void* tag) { up_->WritesDone(tag); });
      return;
    }
    up_writing_ = Start(Op::kUpWrite, [&](void* tag) { up_->Write(read_buf_, tag); });
  }

  void OnUpWritten(bool ok) {
    std::lock_guard<std::mutex> lock(mu_);
    up_writing_ = false;
    if (up_read_done_) {
      FinishUpstream();
      return;
    }
    if (ok) Start(Op::kRead, [&](void* tag) { stream_.Read(&read_buf_, tag); });
  }

  void OnUpRead(bool ok) {  // a message from the Python server, or its end
    std::lock_guard<std::mutex> lock(mu_);
    if (!ok) {
      up_read_done_ = true;
      FinishUpstream();
      return;
    }
    Start(Op::kWrite, [&](void* tag) { stream_.Write(up_buf_, tag); });
  }

  void OnProxyWritten(bool ok) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!ok) {
      up_ctx_.TryCancel();
      return;
    }
    Start(Op::kUpRead, [&](void* tag) { up_->Read(&up_buf_, tag); });
  }

  // Called with mu_ held: once the upstream has no write pending, ask for its status.
  void FinishUpstream() {
    if (up_writing_ || up_finishing_) return;
    up_finishing_ = true;
    if (up_ == nullptr) {
      up_status_ = grpc::Status(grpc::StatusCode::UNAVAILABLE, "upstream not started");
      OnUpFinishLocked();
      return;
    }
    Start(Op::kUpFinish, [&](void* tag) { up_->Finish(&up_status_, tag); });
  }

  void OnUpFinish() {
    std::lock_guard<std::mutex> lock(mu_);
    OnUpFinishLocked();
  }

  void OnUpFinishLocked() {
    for (const auto& entry : up_ctx_.GetServerTrailingMetadata()) {
      std::string key(entry.first.data(), entry.first.size());
      if (key.rfind("grpc-", 0) == 0) continue;
      ctx_.AddTrailingMetadata(key, std::string(entry.second.data(), entry.second.size()));
    }
    Start(Op::kFinish, [&](void* tag) { stream_.Finish(up_status_, tag); });
  }

  friend void RunQueue(Core* core);

  Core* core_;
  std::atomic<int> refs_{0};
  std::mutex mu_;
  grpc::GenericServerContext ctx_;
  grpc::GenericServerAsyncReaderWriter stream_;
  grpc::ByteBuffer read_buf_;
  Tag accept_tag_{this, Op::kAccept}, done_tag_{this, Op::kDone}, read_tag_{this, Op::kRead},
      write_tag_{this, Op::kWrite}, finish_tag_{this, Op::kFinish},
      up_start_tag_{this, Op::kUpStart}, up_read_tag_{this, Op::kUpRead},
      up_write_tag_{this, Op::kUpWrite}, up_writes_done_tag_{this, Op::kUpWritesDone},
      up_finish_tag_{this, Op::kUpFinish};
  bool cancelled_ = false;
  bool finished_ = false;
  // hot path
  bool stream_mode_ = false;
  bool reads_done_ = false;
  bool writing_ = false;
  uint64_t next_seq_ = 0, next_write_ = 0;
  std::map<uint64_t, grpc::ByteBuffer> answers_;
  std::map<uint64_t, PyObject*> handles_;  // cancel handles of requests not yet answered
  std::set<uint64_t> replied_;             // answered while dispatch was still running
  bool failed_ = false;
  grpc::Status fail_status_;
  // proxy
  bool proxy_ = false;
  grpc::ClientContext up_ctx_;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> up_;
  grpc::ByteBuffer up_buf_;
  grpc::Status up_status_;
  bool up_read_done_ = false, up_writing_ = false, up_finishing_ = false;
};

void RunQueue(Core* core) {
  // A Python thread state for the thread's whole life, the GIL released: each request's
  // PyGILState_Ensure then only takes the GIL instead of creating and freeing a state.
  PyGILState_STATE gil = PyGILState_Ensure();
  PyThreadState* state = PyEval_SaveThread();
  void* raw = nullptr;
  bool ok = false;
  for (;;) {
    core->waiting.fetch_add(1);
    bool more = core->cq->Next(&raw, &ok);
    core->waiting.fetch_sub(1);
    if (!more) break;
    Tag* tag = static_cast<Tag*>(raw);
    tag->call->OnEvent(tag->op, ok);
    tag->call->Unref();
  }
  PyEval_RestoreThread(state);
  PyGILState_Release(gil);
}

// --- the reply object -----------------------------------------------------------------------

struct ReplyObject {
  PyObject_HEAD Call* call;  // one reference, dropped when called or collected
  uint64_t seq;
};

bool JoinParts(PyObject* parts, grpc::ByteBuffer* out) {
  if (parts == Py_None) return true;
  std::vector<Py_buffer> views;
  PyObject* seq = nullptr;
  bool single = PyObject_CheckBuffer(parts);
  if (!single) {
    seq = PySequence_Fast(parts, "reply: parts must be a buffer or a sequence of buffers");
    if (seq == nullptr) return false;
  }
  Py_ssize_t n = single ? 1 : PySequence_Fast_GET_SIZE(seq);
  size_t total = 0;
  bool ok = true;
  for (Py_ssize_t i = 0; i < n && ok; ++i) {
    PyObject* item = single ? parts : PySequence_Fast_GET_ITEM(seq, i);
    Py_buffer view;
    if (PyObject_GetBuffer(item, &view, PyBUF_C_CONTIGUOUS) != 0) {
      ok = false;
      break;
    }
    views.push_back(view);
    total += static_cast<size_t>(view.len);
  }
  if (ok) {
    grpc::Slice slice(total);
    char* dst = reinterpret_cast<char*>(const_cast<uint8_t*>(slice.begin()));
    for (auto& view : views) {
      std::memcpy(dst, view.buf, static_cast<size_t>(view.len));
      dst += view.len;
    }
    *out = grpc::ByteBuffer(&slice, 1);
  }
  for (auto& view : views) PyBuffer_Release(&view);
  Py_XDECREF(seq);
  return ok;
}

PyObject* ReplyCall(PyObject* self, PyObject* args, PyObject* kwargs) {
  ReplyObject* reply = reinterpret_cast<ReplyObject*>(self);
  int code = 0;
  const char* message = "";
  Py_ssize_t message_len = 0;
  PyObject* parts = Py_None;
  if (!PyArg_ParseTuple(args, "is#|O", &code, &message, &message_len, &parts)) return nullptr;
  if (reply->call == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "reply: this request was answered already");
    return nullptr;
  }
  grpc::ByteBuffer payload;
  if (code == 0 && !JoinParts(parts, &payload)) return nullptr;
  grpc::Status status = code == 0 ? grpc::Status::OK
                                  : grpc::Status(static_cast<grpc::StatusCode>(code),
                                                 std::string(message, message_len));
  Call* call = reply->call;
  reply->call = nullptr;
  PyObject* dropped;
  Py_BEGIN_ALLOW_THREADS
  dropped = call->Reply(reply->seq, status, std::move(payload));
  Py_END_ALLOW_THREADS
  Py_XDECREF(dropped);
  call->Unref();
  Py_RETURN_NONE;
}

void ReplyDealloc(PyObject* self) {
  ReplyObject* reply = reinterpret_cast<ReplyObject*>(self);
  if (reply->call != nullptr) {  // dropped unanswered: a bug on the Python side
    Call* call = reply->call;
    reply->call = nullptr;
    Py_XDECREF(call->Reply(reply->seq,
                           grpc::Status(grpc::StatusCode::INTERNAL,
                                        "the server dropped this request unanswered"),
                           grpc::ByteBuffer()));
    call->Unref();
  }
  Py_TYPE(self)->tp_free(self);
}

PyTypeObject ReplyType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyObject* NewReply(Call* call, uint64_t seq) {
  ReplyObject* reply = PyObject_New(ReplyObject, &ReplyType);
  if (reply == nullptr) return nullptr;
  reply->call = call;
  reply->seq = seq;
  return reinterpret_cast<PyObject*>(reply);
}

// --- the Frontend type ----------------------------------------------------------------------

struct FrontendObject {
  PyObject_HEAD Core* core;
  std::vector<std::thread>* threads;
  int port;
};

int FrontendInit(PyObject* self, PyObject* args, PyObject* kwargs) {
  static const char* kwlist[] = {"address", "upstream", "dispatch", "max_message_bytes",
                                 "threads", "tls", nullptr};
  const char* address = nullptr;
  const char* upstream = nullptr;
  PyObject* dispatch = nullptr;
  PyObject* tls = Py_None;
  int max_message = 0;
  int threads = 4;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ssOi|iO", const_cast<char**>(kwlist),
                                   &address, &upstream, &dispatch, &max_message, &threads,
                                   &tls)) {
    return -1;
  }
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (tls != Py_None) {  // (private key PEM, certificate chain PEM, CA PEM or None, require)
    const char *key = nullptr, *chain = nullptr, *ca = nullptr;
    Py_ssize_t key_len = 0, chain_len = 0, ca_len = 0;
    int require = 0;
    if (!PyArg_ParseTuple(tls, "y#y#z#p", &key, &key_len, &chain, &chain_len, &ca, &ca_len,
                          &require)) {
      return -1;
    }
    grpc::SslServerCredentialsOptions options(
        require ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    if (ca != nullptr) options.pem_root_certs.assign(ca, static_cast<size_t>(ca_len));
    options.pem_key_cert_pairs.push_back(
        {std::string(key, static_cast<size_t>(key_len)),
         std::string(chain, static_cast<size_t>(chain_len))});
    credentials = grpc::SslServerCredentials(options);
  }
  if (!PyCallable_Check(dispatch)) {
    PyErr_SetString(PyExc_TypeError, "dispatch must be callable");
    return -1;
  }
  FrontendObject* frontend = reinterpret_cast<FrontendObject*>(self);
  if (frontend->core != nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "Frontend already initialised");
    return -1;
  }
  auto core = std::make_unique<Core>();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(address, credentials, &frontend->port);
  builder.SetMaxReceiveMessageSize(max_message);
  builder.SetMaxSendMessageSize(max_message);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.RegisterAsyncGenericService(&core->service);
  core->cq = builder.AddCompletionQueue();
  core->server = builder.BuildAndStart();
  if (core->server == nullptr || frontend->port == 0) {
    PyErr_Format(PyExc_OSError, "cannot bind %s", address);
    if (core->server) core->server->Shutdown();
    core->cq->Shutdown();
    void* tag;
    bool ok;
    while (core->cq->Next(&tag, &ok)) {
    }
    return -1;
  }
  grpc::ChannelArguments channel_args;
  channel_args.SetMaxReceiveMessageSize(-1);
  channel_args.SetMaxSendMessageSize(-1);
  auto channel =
      grpc::CreateCustomChannel(upstream, grpc::InsecureChannelCredentials(), channel_args);
  core->upstream = std::make_unique<grpc::GenericStub>(channel);
  Py_INCREF(dispatch);
  core->dispatch = dispatch;
  frontend->core = core.release();
  frontend->threads = new std::vector<std::thread>();
  for (int i = 0; i < threads; ++i) (new Call(frontend->core))->ListenUnderGate();
  for (int i = 0; i < threads; ++i) {
    frontend->threads->emplace_back(RunQueue, frontend->core);
  }
  return 0;
}

// Stop taking calls; in-flight ones have `grace_s` to finish, then are cancelled.
PyObject* FrontendStop(PyObject* self, PyObject* args) {
  double grace = 0.0;
  if (!PyArg_ParseTuple(args, "|d", &grace)) return nullptr;
  FrontendObject* frontend = reinterpret_cast<FrontendObject*>(self);
  Core* core = frontend->core;
  if (core == nullptr || frontend->threads == nullptr) Py_RETURN_NONE;
  std::vector<std::thread>* threads = frontend->threads;
  frontend->threads = nullptr;
  Py_BEGIN_ALLOW_THREADS;
  auto deadline = std::chrono::system_clock::now() +
                  std::chrono::microseconds(static_cast<long long>(grace * 1e6));
  core->server->Shutdown(deadline);
  {
    std::lock_guard<std::mutex> lock(core->gate);
    core->closed = true;
    core->cq->Shutdown();
  }
  for (auto& thread : *threads) thread.join();
  Py_END_ALLOW_THREADS;
  delete threads;
  Py_CLEAR(core->dispatch);  // nothing calls it now; let the service it holds go
  Py_RETURN_NONE;
}

PyObject* FrontendPort(PyObject* self, void*) {
  return PyLong_FromLong(reinterpret_cast<FrontendObject*>(self)->port);
}

void FrontendDealloc(PyObject* self) {
  FrontendObject* frontend = reinterpret_cast<FrontendObject*>(self);
  if (frontend->threads != nullptr) {
    PyObject* res = FrontendStop(self, PyTuple_New(0));
    Py_XDECREF(res);
  }
  // The core (server, queue) is left alive: calls still waiting for a Python reply point at
  // it. One per server process, so nothing accumulates.
  Py_TYPE(self)->tp_free(self);
}

PyMethodDef kFrontendMethods[] = {
    {"stop", FrontendStop, METH_VARARGS,
     "stop(grace_s=0): refuse new calls, give in-flight ones grace_s, stop the threads."},
    {nullptr, nullptr, 0, nullptr}};

PyGetSetDef kFrontendGetSet[] = {
    {"port", FrontendPort, nullptr, "The bound port.", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyTypeObject FrontendType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_frontend",
                       "mededge's native gRPC front end (see frontend.cc).", -1, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__frontend(void) {
  ReplyType.tp_name = "_frontend.Reply";
  ReplyType.tp_basicsize = sizeof(ReplyObject);
  ReplyType.tp_flags = Py_TPFLAGS_DEFAULT;
  ReplyType.tp_call = ReplyCall;
  ReplyType.tp_dealloc = ReplyDealloc;
  ReplyType.tp_doc = "reply(code, message, parts=None): answer one request, once.";
  FrontendType.tp_name = "_frontend.Frontend";
  FrontendType.tp_basicsize = sizeof(FrontendObject);
  FrontendType.tp_flags = Py_TPFLAGS_DEFAULT;
  FrontendType.tp_new = PyType_GenericNew;
  FrontendType.tp_init = FrontendInit;
  FrontendType.tp_dealloc = FrontendDealloc;
  FrontendType.tp_methods = kFrontendMethods;
  FrontendType.tp_getset = kFrontendGetSet;
  FrontendType.tp_doc =
      "Frontend(address, upstream, dispatch, max_message_bytes, threads=4, tls=None): serving "
      "at once; tls: (private key PEM, certificate chain PEM, client CA PEM or None, "
      "require client certificate).";
  if (PyType_Ready(&ReplyType) < 0 || PyType_Ready(&FrontendType) < 0) return nullptr;
  PyObject* module = PyModule_Create(&kModule);
  if (module == nullptr) return nullptr;
  Py_INCREF(&FrontendType);
  if (PyModule_AddObject(module, "Frontend", reinterpret_cast<PyObject*>(&FrontendType)) < 0) {
    Py_DECREF(&FrontendType);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
