// kserve_loadgen: one load-generating KServe v2 client, in C++ like Triton's perf_analyzer, so
// that a benchmark's client costs microseconds rather than the few hundred of a Python gRPC
// client, and what is measured is the server.
//
// It sends one pre-encoded ModelInferRequest (a file written by edge/tools/bench_serve.py; its
// tensors in the message or naming shared-memory regions the caller registered) back to back,
// one in flight, over ModelInfer calls or on one ModelStreamInfer stream, for --seconds, and
// prints each latency in nanoseconds, one per line. Every
// answer is checked: no error, exactly the expected output, its bytes in the message or (with
// --shared-output) left in shared memory. Exit 1 with the reason on stderr otherwise.
//
// With --blocks N it prints "ready" once connected (so that the caller's first reference block
// does not share the machine with the client's start-up), then measures N blocks of --seconds
// each, waiting for a line on stdin before each (then two untimed requests, as after an idle
// server the first answers are slow) and
// printing a line "." after each, so that the caller can run its reference (raw ONNX Runtime,
// which warms up the same way) between the blocks: both then see the same machine, minute by
// minute. With --sync as well (several clients measured together), each block's warm-up ends
// with a line "ready" on stdout, and the client then waits for a second line on stdin: the
// Unix time at which every client starts timing.
//
//   kserve_loadgen --url 127.0.0.1:8001 --request req.bin --output logits --seconds 5
//                  [--stream] [--shared-output] [--blocks N [--sync]]

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "inference.grpc.pb.h"

namespace {

struct Options {
  std::string url;
  std::string request_file;
  std::string output;
  double seconds = 5.0;
  int blocks = 1;
  bool stream = false;
  bool shared_output = false;
  bool sync = false;
};

[[noreturn]] void Fail(const std::string& message) {
  std::cerr << "kserve_loadgen: " << message << std::endl;
  std::exit(1);
}

Options Parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) Fail(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--url") options.url = value();
    else if (arg == "--request") options.request_file = value();
    else if (arg == "--output") options.output = value();
    else if (arg == "--seconds") options.seconds = std::atof(value().c_str());
    else if (arg == "--blocks") options.blocks = std::atoi(value().c_str());
    else if (arg == "--stream") options.stream = true;
    else if (arg == "--shared-output") options.shared_output = true;
    else if (arg == "--sync") options.sync = true;
    else Fail("unknown argument " + arg);
  }
  if (options.url.empty() || options.request_file.empty() || options.output.empty()) {
    Fail("--url, --request and --output are required");
  }
  if (options.blocks < 1 || options.seconds <= 0) Fail("--blocks and --seconds must be positive");
  if (options.sync && options.blocks < 2) Fail("--sync needs --blocks");
  return options;
}

inference::ModelInferRequest ReadRequest(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Fail("cannot read " + path);
  std::stringstream bytes;
  bytes << in.rdbuf();
  inference::ModelInferRequest request;
  if (!request.ParseFromString(bytes.str())) Fail(path + " is not a ModelInferRequest");
  return request;
}

void Check(const inference::ModelInferResponse& response, const Options& options) {
  if (response.outputs_size() != 1 || response.outputs(0).name() != options.output) {
    Fail("answer without its output '" + options.output + "'");
  }
  size_t carried = 0;
  for (const auto& raw : response.raw_output_contents()) carried += raw.size();
  if (options.shared_output ? carried != 0 : carried == 0) {
    Fail("answer of '" + options.output + "': " + std::to_string(carried) +
         " bytes in the message");
  }
}

// One request at a time; returns the answer or exits with the server's error.
class Client {
 public:
  Client(const Options& options, inference::ModelInferRequest request)
      : options_(options), request_(std::move(request)) {
    grpc::ChannelArguments args;
    args.SetMaxSendMessageSize(1 << 30);
    args.SetMaxReceiveMessageSize(1 << 30);
    channel_ = grpc::CreateCustomChannel(options.url, grpc::InsecureChannelCredentials(), args);
    stub_ = inference::GRPCInferenceService::NewStub(channel_);
    if (options.stream) {
      stream_context_ = std::make_unique<grpc::ClientContext>();
      stream_ = stub_->ModelStreamInfer(stream_context_.get());
    }
  }

  ~Client() {
    if (stream_) {
      stream_->WritesDone();
      grpc::Status status = stream_->Finish();
      if (!status.ok()) std::cerr << "kserve_loadgen: stream ended: " << status.error_message()
                                  << std::endl;
    }
  }

  const inference::ModelInferResponse& Infer() {
    if (stream_) {
      if (!stream_->Write(request_)) Fail("stream closed by the server (write)");
      if (!stream_->Read(&stream_answer_)) Fail("stream closed by the server (read)");
      if (!stream_answer_.error_message().empty()) Fail(stream_answer_.error_message());
      return stream_answer_.infer_response();
    }
    grpc::ClientContext context;
    grpc::Status status = stub_->ModelInfer(&context, request_, &answer_);
    if (!status.ok()) Fail("ModelInfer: " + status.error_message());
    return answer_;
  }

 private:
  const Options& options_;
  inference::ModelInferRequest request_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<inference::GRPCInferenceService::Stub> stub_;
  std::unique_ptr<grpc::ClientContext> stream_context_;
  std::unique_ptr<grpc::ClientReaderWriter<inference::ModelInferRequest,
                                           inference::ModelStreamInferResponse>> stream_;
  inference::ModelInferResponse answer_;
  inference::ModelStreamInferResponse stream_answer_;
};

void SleepUntil(double unix_seconds) {
  std::this_thread::sleep_until(std::chrono::system_clock::time_point(
      std::chrono::duration_cast<std::chrono::system_clock::duration>(
          std::chrono::duration<double>(unix_seconds))));
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = Parse(argc, argv);
  Client client(options, ReadRequest(options.request_file));
  for (int i = 0; i < 2; ++i) Check(client.Infer(), options);  // warm-up, checked
  if (options.blocks > 1) {  // started and connected: the caller's reference may begin
    std::fputs("ready\n", stdout);
    std::fflush(stdout);
  }
  using Clock = std::chrono::steady_clock;
  std::vector<long long> latencies;
  latencies.reserve(1 << 16);
  for (int block = 0; block < options.blocks; ++block) {
    if (options.blocks > 1) {
      std::string go;
      if (!std::getline(std::cin, go)) Fail("stdin closed before block " + std::to_string(block));
      // as the reference's blocks start warm, so do these: the server sat idle meanwhile
      for (int i = 0; i < 2; ++i) Check(client.Infer(), options);
      if (options.sync) {
        std::fputs("ready\n", stdout);
        std::fflush(stdout);
        if (!std::getline(std::cin, go)) Fail("stdin closed before block " + std::to_string(block));
        SleepUntil(std::atof(go.c_str()));
      }
    }
    latencies.clear();
    const auto end = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(options.seconds));
    while (Clock::now() < end) {
      const auto sent = Clock::now();
      const auto& answer = client.Infer();
      latencies.push_back(
          std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - sent).count());
      Check(answer, options);
    }
    std::string text;
    for (long long ns : latencies) text += std::to_string(ns) + "\n";
    if (options.blocks > 1) text += ".\n";
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
  }
  return 0;
}
