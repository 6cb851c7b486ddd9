// CUDA graph capture and replay through libtorch's own API (at::cuda::CUDAGraph), for the
// decode steps (issue 9): a step of a 7B model is a few hundred small kernels, and launching
// them one by one from the host costs more than the GPU needs to run them. Captured once per
// shape, a step is then one graph launch.
//
// Only what tch does not expose lives here; tensors stay on the Rust side. Errors are caught
// and reported through eesd_graph_last_error(), never thrown across the C boundary.

#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <exception>
#include <optional>
#include <string>

namespace {

thread_local std::string last_error;

struct Graph {
  at::cuda::CUDAGraph graph;
  // While capturing: the stream that was current before, restored when capture ends (the
  // capture records on a side stream: torch refuses to capture the default stream).
  std::optional<c10::cuda::CUDAStream> previous;
};

template <class F>
int guarded(F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return 1;
}

}  // namespace

extern "C" {

void* eesd_graph_new() {
  void* g = nullptr;
  guarded([&] { g = new Graph(); });
  return g;
}

void eesd_graph_free(void* g) { delete static_cast<Graph*>(g); }

const char* eesd_graph_last_error() { return last_error.c_str(); }

// Makes a side stream current (after the work queued so far has finished) and starts
// recording on it; every torch op until eesd_graph_capture_end is recorded, not run.
// Only c10/ATen entry points are called (no CUDA runtime symbol of our own to link).
int eesd_graph_capture_begin(void* p, int device) {
  return guarded([&] {
    auto* g = static_cast<Graph*>(p);
    c10::cuda::device_synchronize();
    g->previous = c10::cuda::getCurrentCUDAStream(device);
    c10::cuda::setCurrentCUDAStream(
        c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device));
    g->graph.capture_begin();
  });
}

// Ends recording, instantiates the graph and makes the previous stream current again.
int eesd_graph_capture_end(void* p) {
  auto* g = static_cast<Graph*>(p);
  int rc = guarded([&] { g->graph.capture_end(); });
  if (g->previous) {
    c10::cuda::setCurrentCUDAStream(*g->previous);
    g->previous.reset();
  }
  return rc;
}

// Launches the recorded work on the current stream.
int eesd_graph_replay(void* p) {
  return guarded([&] { static_cast<Graph*>(p)->graph.replay(); });
}

// Bytes the caching allocator holds in live tensors on `device` now and at most so far
// (torch.cuda.memory_allocated and max_memory_allocated): for the test that replays a graph a
// thousand times without growth, and the memory the trainer reports.
int eesd_cuda_memory_allocated(int device, unsigned long long* current, unsigned long long* peak) {
  return guarded([&] {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
    const auto& bytes =
        stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
    *current = bytes.current;
    *peak = bytes.peak;
  });
}

}  // extern "C"
