// fastjanus C++ runtime: runs the AOTInductor packages written by `fastjanus export-aoti` (Janus / Janus-Pro
// text-to-image generation, VQ decoding and image encoding) without Python.
//
//   fastjanus::Runtime rt("/path/to/packages");            // reads manifest.json; packages load on first use
//   at::Tensor codes = rt.generate({ids}, 4, 5.0, 1.0, 42); // int64 [4, image_tokens], CPU
//   at::Tensor images = rt.decode(codes);                  // uint8 [4, S, S, 3] RGB, CPU
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "fastjanus/error.h"

namespace fastjanus {

// Part names, as in the manifest's "parts" and `fastjanus export-aoti --parts`.
inline constexpr const char* kGeneratorPart = "generator";
inline constexpr const char* kVQDecoderPart = "vq-decoder";
inline constexpr const char* kVisionPart = "vision";

struct Manifest {
  struct Part {
    std::string file;       // relative to the packages folder
    int64_t max_batch = 8;  // images per call of a single-model part (the runtime chunks larger requests)
  };
  struct Generator {
    int64_t layers = 0, kv_heads = 0, head_dim = 0, hidden_size = 0, image_tokens = 0, codebook_size = 0,
            vocab_size = 0, max_positions = 0;
  };
  struct VQ {
    int64_t image_size = 0, grid = 0;
  };
  struct Vision {
    int64_t image_size = 0, tokens = 0, hidden_size = 0;
  };

  std::string dir;  // the packages folder
  int64_t format_version = 0;
  std::string model_name, fingerprint;
  std::string device;  // "cpu" or "cuda"
  std::string dtype;   // "float32", "bfloat16" or "float16"
  int64_t max_images = 0;
  std::map<std::string, Part> parts;  // only the exported parts
  Generator generator;
  std::map<std::string, int64_t> special_tokens;  // "bos", "eos", "pad", ...
  VQ vq;
  Vision vision;
  double default_cfg_weight = 5.0;
  double default_temperature = 1.0;

  bool has_part(const std::string& part) const { return parts.count(part) != 0; }
  int64_t pad_id() const;
};

// Reads and checks <dir>/manifest.json. Throws Error.
Manifest read_manifest(const std::string& packages_dir);

// Wall-clock milliseconds of one call. Times are taken after the device finished (CUDA is synchronised).
struct Timings {
  double load_ms = 0;     // packages loaded by this call (first use only)
  double prefill_ms = 0;  // prompt prefill and the first image token
  double decode_ms = 0;   // the remaining image tokens (the step loop)
  int64_t steps = 0;      // step calls in decode_ms
  double vq_ms = 0;       // VQ decoding (decode) or image encoding (encode_image)
};

class Runtime {
 public:
  // Reads and checks the manifest; loads no package yet (each part loads on first use, so a folder holding
  // only some parts serves those). Throws Error.
  explicit Runtime(const std::string& packages_dir);
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  const Manifest& manifest() const;

  // Image token codes for num_images images per prompt: int64 [prompts * num_images, image_tokens] on the CPU,
  // rows in prompt order, then image order. prompt_ids: the generation template's token ids of each prompt
  // (`fastjanus tokenize`). temperature 0 is greedy (deterministic); seed must be below 2^63.
  at::Tensor generate(const std::vector<std::vector<int64_t>>& prompt_ids, int num_images, double cfg_weight,
                      double temperature, uint64_t seed, Timings* timings = nullptr);

  // RGB images uint8 [N, S, S, 3] on the CPU from codes int64 [N, grid^2] (any device).
  at::Tensor decode(const at::Tensor& codes, Timings* timings = nullptr);

  // Image embeddings float32 [N, tokens, hidden] on the CPU from preprocessed pixel_values float32
  // [N, 3, s, s] (any device).
  at::Tensor encode_image(const at::Tensor& pixels, Timings* timings = nullptr);

  // Why a prompt cannot be generated from ("" when it can): too short, too long, or an id outside the
  // vocabulary. generate() checks every prompt with it; callers use it to name their own source line.
  std::string prompt_problem(const std::vector<int64_t>& ids) const;

  // Loads a part's package(s) now instead of on first use, with every check (fingerprint, part, device): a
  // caller that needs several parts finds a bad one before any work. Throws Error.
  void load(const std::string& part, Timings* timings = nullptr);

  // Throws Error unless the part ("generator", "vq-decoder", "vision") was exported and its file is present.
  // Cheap (loads nothing): lets a caller fail before reading its own inputs.
  void require_part(const std::string& part) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fastjanus
