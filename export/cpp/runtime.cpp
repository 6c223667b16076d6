#include "fastjanus/runtime.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <unordered_map>

#include "json.h"

namespace fs = std::filesystem;

namespace fastjanus {

namespace {

constexpr const char* kManifestFile = "manifest.json";
constexpr const char* kFormat = "fastjanus-aoti";
constexpr int64_t kFormatVersion = 1;
constexpr const char* kFingerprintKey = "fastjanus.fingerprint";
constexpr const char* kPartKey = "fastjanus.part";

std::string export_hint(const std::string& dir, const std::string& parts = "") {
  std::string s = "`fastjanus export-aoti --model DIR --out " + dir;
  if (!parts.empty()) s += " --parts " + parts;
  return s + "`";
}

std::string first_line(const std::string& s) {
  auto nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}

std::string fmt_double(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

// ---- manifest ------------------------------------------------------------------------------------------------

// Typed access to manifest.json that names the key and the fix in every error.
class ManifestReader {
 public:
  ManifestReader(std::string path, std::string dir) : path_(std::move(path)), dir_(std::move(dir)) {}

  [[noreturn]] void bad(const std::string& key, const std::string& what) const {
    throw Error(path_ + ": " + key + " " + what + "; re-export with " + export_hint(dir_));
  }

  const json::Value& get(const json::Value& obj, const std::string& parent, const std::string& key) const {
    const json::Value* v = obj.find(key);
    if (!v) bad(join(parent, key), "is missing");
    return *v;
  }

  const json::Value& object(const json::Value& obj, const std::string& parent, const std::string& key) const {
    const json::Value& v = get(obj, parent, key);
    if (!v.is_object()) bad(join(parent, key), std::string("must be an object, not ") + json::type_name(v.type));
    return v;
  }

  std::string string(const json::Value& obj, const std::string& parent, const std::string& key) const {
    const json::Value& v = get(obj, parent, key);
    if (!v.is_string()) bad(join(parent, key), std::string("must be a string, not ") + json::type_name(v.type));
    return v.string;
  }

  int64_t integer(const json::Value& obj, const std::string& parent, const std::string& key, int64_t min) const {
    return integer_value(get(obj, parent, key), join(parent, key), min);
  }

  int64_t integer_value(const json::Value& v, const std::string& name, int64_t min) const {
    if (!v.is_number() || !v.is_integer) bad(name, "must be an integer");
    if (v.integer < min) bad(name, "must be at least " + std::to_string(min) + ", got " + std::to_string(v.integer));
    return v.integer;
  }

  double non_negative(const json::Value& obj, const std::string& parent, const std::string& key) const {
    const json::Value& v = get(obj, parent, key);
    if (!v.is_number() || !std::isfinite(v.number) || v.number < 0) {
      bad(join(parent, key), "must be a finite number >= 0");
    }
    return v.number;
  }

  static std::string join(const std::string& parent, const std::string& key) {
    return parent.empty() ? "\"" + key + "\"" : "\"" + parent + "." + key + "\"";
  }

 private:
  std::string path_, dir_;
};

std::string read_text(const fs::path& path, const std::string& missing_hint) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw Error(path.string() + " not found; " + missing_hint);
  if (fs::is_directory(path, ec)) throw Error(path.string() + " is a folder, not a file; " + missing_hint);
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("cannot read " + path.string() + " (permissions?); " + missing_hint);
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) throw Error("cannot read " + path.string() + "; " + missing_hint);
  return ss.str();
}

at::ScalarType scalar_type_of(const std::string& dtype) {
  if (dtype == "float32") return at::kFloat;
  if (dtype == "bfloat16") return at::kBFloat16;
  return at::kHalf;  // "float16": read_manifest admits only these three
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int64_t Manifest::pad_id() const {
  auto it = special_tokens.find("pad");
  if (it == special_tokens.end()) {
    throw Error(dir + "/manifest.json: \"special_tokens.pad\" is missing; re-export with " + export_hint(dir));
  }
  return it->second;
}

Manifest read_manifest(const std::string& packages_dir) {
  Manifest m;
  m.dir = packages_dir;
  const fs::path path = fs::path(packages_dir) / kManifestFile;
  const std::string hint = "run " + export_hint(packages_dir) + " to write the packages and their manifest";
  std::error_code ec;
  if (!fs::is_directory(packages_dir, ec)) throw Error("packages folder " + packages_dir + " not found; " + hint);
  const std::string text = read_text(path, hint);

  json::Value root;
  try {
    root = json::parse(text);
  } catch (const json::ParseError& e) {
    throw Error(path.string() + " is not valid JSON (" + e.what() + "); " + hint);
  }
  const json::Value* format = root.find("format");
  if (!root.is_object() || !format || !format->is_string() || format->string != kFormat) {
    throw Error(path.string() + " is not a fastjanus AOTInductor manifest (\"format\" is not \"" + kFormat + "\"); " +
                hint);
  }
  ManifestReader r(path.string(), packages_dir);
  m.format_version = r.integer(root, "", "format_version", 1);
  if (m.format_version != kFormatVersion) {
    throw Error(path.string() + ": format_version " + std::to_string(m.format_version) + ", this runner reads " +
                std::to_string(kFormatVersion) + "; re-export with the fastjanus release this runner was built from");
  }
  const json::Value& model = r.object(root, "", "model");
  m.model_name = r.string(model, "model", "name");
  m.fingerprint = r.string(model, "model", "fingerprint");
  if (m.fingerprint.empty()) r.bad("\"model.fingerprint\"", "is empty");

  m.device = r.string(root, "", "device");
  if (m.device != "cpu" && m.device != "cuda") r.bad("\"device\"", "must be \"cpu\" or \"cuda\", got \"" + m.device + "\"");
  m.dtype = r.string(root, "", "dtype");
  if (m.dtype != "float32" && m.dtype != "bfloat16" && m.dtype != "float16") {
    r.bad("\"dtype\"", "must be float32, bfloat16 or float16, got \"" + m.dtype + "\"");
  }
  m.max_images = r.integer(root, "", "max_images", 1);

  const json::Value& parts = r.object(root, "", "parts");
  for (const auto& kv : parts.object) {
    const std::string& name = kv.first;
    if (name != kGeneratorPart && name != kVQDecoderPart && name != kVisionPart) continue;  // a newer part
    const std::string key = "parts." + name;
    if (!kv.second.is_object()) r.bad("\"" + key + "\"", "must be an object");
    Manifest::Part p;
    p.file = r.string(kv.second, key, "file");
    // a bare file name: the packages folder is self-contained and may be moved
    if (p.file.empty() || p.file.find('/') != std::string::npos || p.file.find('\\') != std::string::npos ||
        p.file == "." || p.file == "..") {
      r.bad("\"" + key + ".file\"", "must be a file name inside the packages folder, got \"" + p.file + "\"");
    }
    if (const json::Value* mb = kv.second.find("max_batch")) p.max_batch = r.integer_value(*mb, key + ".max_batch", 1);
    m.parts[name] = p;
  }
  if (m.parts.empty()) r.bad("\"parts\"", "lists no package");

  // Model sizes: the generator section is written whatever the parts (the VQ decoder's codebook is in it).
  const json::Value& g = r.object(root, "", "generator");
  m.generator.layers = r.integer(g, "generator", "layers", 1);
  m.generator.kv_heads = r.integer(g, "generator", "kv_heads", 1);
  m.generator.head_dim = r.integer(g, "generator", "head_dim", 1);
  m.generator.hidden_size = r.integer(g, "generator", "hidden_size", 1);
  m.generator.image_tokens = r.integer(g, "generator", "image_tokens", 1);
  m.generator.codebook_size = r.integer(g, "generator", "codebook_size", 1);
  m.generator.vocab_size = r.integer(g, "generator", "vocab_size", 1);
  m.generator.max_positions = r.integer(g, "generator", "max_positions", 1);

  if (m.has_part(kGeneratorPart)) {
    const json::Value& st = r.object(root, "", "special_tokens");
    for (const auto& kv : st.object) {
      m.special_tokens[kv.first] = r.integer_value(kv.second, "\"special_tokens." + kv.first + "\"", 0);
    }
    const int64_t pad = m.pad_id();
    if (pad >= m.generator.vocab_size) {
      r.bad("\"special_tokens.pad\"", "is " + std::to_string(pad) + ", outside the vocabulary [0, " +
                                          std::to_string(m.generator.vocab_size) + ")");
    }
  }
  if (m.has_part(kVQDecoderPart)) {
    const json::Value& vq = r.object(root, "", "vq");
    m.vq.image_size = r.integer(vq, "vq", "image_size", 1);
    m.vq.grid = r.integer(vq, "vq", "grid", 1);
    if (m.vq.grid * m.vq.grid != m.generator.image_tokens) {
      r.bad("\"vq.grid\"", std::to_string(m.vq.grid) + " squared is not generator.image_tokens " +
                               std::to_string(m.generator.image_tokens));
    }
  }
  if (m.has_part(kVisionPart)) {
    const json::Value& v = r.object(root, "", "vision");
    m.vision.image_size = r.integer(v, "vision", "image_size", 1);
    m.vision.tokens = r.integer(v, "vision", "tokens", 1);
    m.vision.hidden_size = r.integer(v, "vision", "hidden_size", 1);
  }
  if (const json::Value* sd = root.find("sampling_defaults")) {
    if (!sd->is_object()) r.bad("\"sampling_defaults\"", "must be an object");
    if (sd->find("cfg_weight")) m.default_cfg_weight = r.non_negative(*sd, "sampling_defaults", "cfg_weight");
    if (sd->find("temperature")) m.default_temperature = r.non_negative(*sd, "sampling_defaults", "temperature");
  }
  return m;
}

// ---- runtime -------------------------------------------------------------------------------------------------

using Loader = torch::inductor::AOTIModelPackageLoader;

struct Runtime::Impl {
  Manifest m;
  at::Device device{at::kCPU};
  at::ScalarType dtype = at::kFloat;

  // Declaration order matters: members are destroyed in reverse, so `step` (which borrows the prefill's
  // weights, user-managed) goes before `prefill` owns them no more.
  std::unique_ptr<Loader> prefill;
  std::unordered_map<std::string, at::Tensor> step_constants;  // keeps the borrowed tensors referenced
  std::unique_ptr<Loader> step;
  std::unique_ptr<Loader> vq;
  std::unique_ptr<Loader> vision;

  fs::path file_of(const std::string& part) const { return fs::path(m.dir) / m.parts.at(part).file; }

  // The part is exported and its file is there (cheap; before any input is looked at).
  void require_part(const std::string& part) const {
    auto it = m.parts.find(part);
    if (it == m.parts.end()) {
      std::string have;
      for (const auto& kv : m.parts) have += (have.empty() ? "" : ", ") + kv.first;
      throw Error(m.dir + " holds no " + part + " package (exported parts: " + have + "); export it with " +
                  export_hint(m.dir, part));
    }
    std::error_code ec;
    const fs::path f = file_of(part);
    if (!fs::is_regular_file(f, ec)) {
      throw Error(f.string() + " (the " + part + " part named in manifest.json) is missing; re-export it with " +
                  export_hint(m.dir, part));
    }
  }

  std::unique_ptr<Loader> load(const std::string& part, const std::string& model_name) const {
    const fs::path f = file_of(part);
    const std::string what = f.filename().string() + " (model \"" + model_name + "\")";
    std::unique_ptr<Loader> loader;
    try {
      loader = std::make_unique<Loader>(f.string(), model_name);
    } catch (const c10::Error& e) {
      throw Error("loading " + what + " failed: " + first_line(e.what_without_backtrace()) +
                  "; re-export it here with " + export_hint(m.dir, part) +
                  " (a package runs only on the machine kind it was compiled for, CPU ISA or GPU, with the "
                  "LibTorch of the same torch release)");
    } catch (const std::exception& e) {
      throw Error("loading " + what + " failed: " + first_line(e.what()) + "; re-export with " +
                  export_hint(m.dir, part));
    }
    std::unordered_map<std::string, std::string> meta;
    try {
      meta = loader->get_metadata();
    } catch (const std::exception& e) {
      throw Error("reading the metadata of " + what + " failed: " + first_line(e.what()) + "; re-export with " +
                  export_hint(m.dir, part));
    }
    auto fp = meta.find(kFingerprintKey);
    if (fp == meta.end()) {
      throw Error(what + " carries no fastjanus fingerprint (not written by `fastjanus export-aoti`); re-export "
                  "with " + export_hint(m.dir, part));
    }
    if (fp->second != m.fingerprint) {
      throw Error(what + " holds packages from another model (fingerprint " + fp->second + ", manifest.json says " +
                  m.fingerprint + " for " + m.model_name + "); re-export all parts into one folder with " +
                  export_hint(m.dir));
    }
    auto pt = meta.find(kPartKey);
    if (pt != meta.end() && pt->second != part) {
      throw Error(what + " is the " + pt->second + " part, but manifest.json lists it as " + part +
                  "; re-export with " + export_hint(m.dir));
    }
    auto dk = meta.find("AOTI_DEVICE_KEY");
    if (dk != meta.end() && !dk->second.empty() && dk->second != m.device) {
      throw Error(what + " was compiled for " + dk->second + ", but manifest.json says " + m.device +
                  "; re-export with " + export_hint(m.dir));
    }
    return loader;
  }

  void load_generator(Timings* t) {
    if (step) return;
    auto t0 = std::chrono::steady_clock::now();
    // locals until both models are ready, so a failure leaves nothing half-loaded
    auto pre = load(kGeneratorPart, "prefill");
    auto stp = load(kGeneratorPart, "step");
    // The step was packaged without weights: hand it the prefill's tensors (same FQNs), user-managed so the
    // model exists once in memory. extract_constants_map is keyed by FQN here; internal constant names are
    // mapped to FQNs as well in case another torch release keys it the other way.
    auto* runner = pre->get_runner();
    std::unordered_map<std::string, at::Tensor> by_fqn = runner->extract_constants_map(/*use_inactive=*/false);
    for (const auto& kv : runner->getConstantNamesToOriginalFQNs()) {
      auto it = by_fqn.find(kv.first);
      if (it != by_fqn.end() && !by_fqn.count(kv.second)) by_fqn.emplace(kv.second, it->second);
    }
    std::unordered_map<std::string, at::Tensor> shared;
    for (const std::string& fqn : stp->get_constant_fqns()) {
      auto it = by_fqn.find(fqn);
      if (it == by_fqn.end()) {
        throw Error(file_of(kGeneratorPart).filename().string() + ": the step model needs weight " + fqn +
                    ", which the prefill model does not hold; re-export with " +
                    export_hint(m.dir, kGeneratorPart));
      }
      shared.emplace(fqn, it->second);
    }
    try {
      stp->load_constants(shared, /*use_inactive=*/false, /*check_full_update=*/true,
                          /*user_managed=*/true);
    } catch (const c10::Error& e) {
      throw Error("giving the step model the prefill's weights failed: " + first_line(e.what_without_backtrace()) +
                  "; re-export with " + export_hint(m.dir, kGeneratorPart));
    }
    // user_managed means "use these tensors": check that the step now reads the prefill's memory, so the claim
    // "one copy of the LLM" holds whatever the torch release does
    for (const auto& kv : stp->get_runner()->extract_constants_map(/*use_inactive=*/false)) {
      auto it = shared.find(kv.first);
      if (it != shared.end() && kv.second.data_ptr() != it->second.data_ptr()) {
        throw Error("the step model copied weight " + kv.first + " instead of sharing the prefill's (this LibTorch "
                    "does not honour user-managed constants); use the LibTorch of the torch that exported the "
                    "packages");
      }
    }
    prefill = std::move(pre);
    step_constants = std::move(shared);
    step = std::move(stp);
    if (t) t->load_ms += ms_since(t0);
  }

  Loader& single(std::unique_ptr<Loader>& slot, const std::string& part, Timings* t) {
    if (!slot) {
      auto t0 = std::chrono::steady_clock::now();
      slot = load(part, "model");
      if (t) t->load_ms += ms_since(t0);
    }
    return *slot;
  }

  // Runs a model; its errors become one-line Errors naming the model.
  static std::vector<at::Tensor> run(Loader& l, const std::vector<at::Tensor>& in, const char* what) {
    try {
      return l.run(in);
    } catch (const c10::Error& e) {
      throw Error(std::string(what) + " failed: " + first_line(e.what_without_backtrace()));
    }
  }

  // Waits for the device: a small copy to the host waits for the current CUDA stream, without CUDA headers.
  void sync(const at::Tensor& on_device) const {
    if (device.is_cuda()) (void)on_device.to(at::kCPU);
  }

  [[noreturn]] void bad_output(const char* what, const at::Tensor& got, const std::string& want) const {
    throw Error(std::string(what) + " returned " + (got.defined() ? got.toString() + " " + c10::str(got.sizes()) : "nothing") +
                ", expected " + want + ": the package does not match manifest.json; re-export with " +
                export_hint(m.dir));
  }

  // A single-model part over `in` in chunks of the manifest's max_batch rows: each chunk moved to the device
  // (as `in_dtype`), run, its output checked to be [rows, tail...] (and `out_dtype` unless Undefined), brought
  // back to the CPU as `cpu_dtype`; the chunks concatenated. Adds the time to timings->vq_ms.
  at::Tensor chunked(Loader& l, const std::string& part, const at::Tensor& in, at::ScalarType in_dtype,
                     const std::vector<int64_t>& tail, at::ScalarType out_dtype, at::ScalarType cpu_dtype,
                     const char* what, Timings* timings) const {
    const int64_t N = in.size(0), chunk = m.parts.at(part).max_batch;
    std::vector<at::Tensor> outs;
    auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < N; i += chunk) {
      const int64_t b = std::min(chunk, N - i);
      auto out = run(l, {in.slice(0, i, i + b).to(device, in_dtype).contiguous()}, what);
      const at::Tensor y = out.empty() ? at::Tensor() : out[0];
      std::vector<int64_t> want{b};
      want.insert(want.end(), tail.begin(), tail.end());
      const bool dtype_ok = out_dtype == at::ScalarType::Undefined || (y.defined() && y.scalar_type() == out_dtype);
      if (!y.defined() || !dtype_ok || y.sizes() != at::IntArrayRef(want)) {
        std::string shape = "[";
        for (size_t k = 0; k < want.size(); ++k) shape += (k ? ", " : "") + std::to_string(want[k]);
        shape += "]";
        bad_output((std::string("the ") + what).c_str(), y,
                   (out_dtype == at::ScalarType::Undefined ? "" : std::string(c10::toString(out_dtype)) + " ") +
                       shape);
      }
      outs.push_back(y.to(at::kCPU, cpu_dtype));  // waits for the device
    }
    if (timings) timings->vq_ms += ms_since(t0);
    return outs.size() == 1 ? outs[0].contiguous() : at::cat(outs, 0);
  }
};

Runtime::Runtime(const std::string& packages_dir) : impl_(std::make_unique<Impl>()) {
  impl_->m = read_manifest(packages_dir);
  if (impl_->m.device == "cuda") {
    if (!at::hasCUDA()) {
      throw Error(packages_dir + " holds CUDA packages, but this LibTorch sees no usable CUDA device (CPU-only "
                  "build or no GPU); run on a GPU machine with a CUDA LibTorch, or re-export with " +
                  export_hint(packages_dir) + " --device cpu");
    }
    impl_->device = at::Device(at::kCUDA, 0);
  }
  impl_->dtype = scalar_type_of(impl_->m.dtype);
}

Runtime::~Runtime() = default;

const Manifest& Runtime::manifest() const { return impl_->m; }

void Runtime::require_part(const std::string& part) const { impl_->require_part(part); }

void Runtime::load(const std::string& part, Timings* timings) {
  Impl& I = *impl_;
  I.require_part(part);
  at::NoGradGuard no_grad;
  if (part == kGeneratorPart) {
    I.load_generator(timings);
  } else if (part == kVQDecoderPart) {
    I.single(I.vq, part, timings);
  } else if (part == kVisionPart) {
    I.single(I.vision, part, timings);
  } else {
    throw Error("unknown part " + part + "; the parts are generator, vq-decoder and vision");
  }
}

std::string Runtime::prompt_problem(const std::vector<int64_t>& ids) const {
  const auto& g = impl_->m.generator;
  if (ids.size() < 2) {
    return "has " + std::to_string(ids.size()) +
           " token id(s); a generation prompt has at least 2 (BOS ... <begin_of_image>): make it with "
           "`fastjanus tokenize`";
  }
  const int64_t len = static_cast<int64_t>(ids.size());
  if (len + g.image_tokens > g.max_positions) {
    return "has " + std::to_string(len) + " tokens; with the " + std::to_string(g.image_tokens) +
           " image tokens that exceeds the model's " + std::to_string(g.max_positions) +
           " positions: shorten it to at most " + std::to_string(g.max_positions - g.image_tokens) + " tokens";
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= g.vocab_size) {
      return "token id " + std::to_string(ids[i]) + " (position " + std::to_string(i + 1) +
             ") is outside the vocabulary [0, " + std::to_string(g.vocab_size) + "): ids from another model?";
    }
  }
  // The unconditional row keeps the first and last ids and pads the rest: they must be BOS and
  // <begin_of_image>, as the generation template makes them (plain tokenised text would give wrong images).
  const auto& sp = impl_->m.special_tokens;
  auto bos = sp.find("bos"), boi = sp.find("begin_of_image");
  if (bos != sp.end() && ids.front() != bos->second) {
    return "starts with id " + std::to_string(ids.front()) + ", not BOS (" + std::to_string(bos->second) +
           "): not a generation prompt; make the ids with `fastjanus tokenize`";
  }
  if (boi != sp.end() && ids.back() != boi->second) {
    return "ends with id " + std::to_string(ids.back()) + ", not <begin_of_image> (" + std::to_string(boi->second) +
           "): not a generation prompt; make the ids with `fastjanus tokenize`";
  }
  return "";
}

at::Tensor Runtime::generate(const std::vector<std::vector<int64_t>>& prompt_ids, int num_images, double cfg_weight,
                             double temperature, uint64_t seed, Timings* timings) {
  Impl& I = *impl_;
  const Manifest& m = I.m;
  const auto& g = m.generator;
  I.require_part(kGeneratorPart);

  // ---- every input checked before any work
  if (prompt_ids.empty()) throw Error("no prompts given: pass one prompt's token ids (`fastjanus tokenize`)");
  for (size_t p = 0; p < prompt_ids.size(); ++p) {
    std::string why = prompt_problem(prompt_ids[p]);
    if (!why.empty()) throw Error("prompt " + std::to_string(p + 1) + " " + why);
  }
  if (num_images < 1) throw Error("num_images must be at least 1, got " + std::to_string(num_images));
  const int64_t N = static_cast<int64_t>(prompt_ids.size()) * num_images;
  if (N > m.max_images) {
    throw Error(std::to_string(N) + " images (" + std::to_string(prompt_ids.size()) + " prompt(s) x " +
                std::to_string(num_images) + ") exceed this export's max_images " + std::to_string(m.max_images) +
                "; generate fewer per call or re-export with --max-images");
  }
  // (finite as fp32 too: the package reads them as fp32, where 1e39 is inf and the guided logits NaN)
  if (!std::isfinite(static_cast<float>(cfg_weight)) || cfg_weight < 0) {
    throw Error("cfg_weight must be a finite number >= 0, got " + fmt_double(cfg_weight));
  }
  if (!std::isfinite(static_cast<float>(temperature)) || temperature < 0) {
    throw Error("temperature must be a finite number >= 0 (0 = greedy), got " + fmt_double(temperature));
  }
  if (seed > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    throw Error("seed must be in [0, 2^63), got " + std::to_string(seed));
  }

  at::NoGradGuard no_grad;
  I.load_generator(timings);

  // ---- the CFG batch: per image a conditional row (the prompt) and an unconditional one (first id, pads,
  // last id), interleaved
  const int64_t n = g.image_tokens, R = 2 * N, pad = m.pad_id();
  int64_t T = 0;
  for (const auto& p : prompt_ids) T = std::max<int64_t>(T, static_cast<int64_t>(p.size()));
  const int64_t S = T + n;
  at::Tensor ids = at::full({R, T}, pad, at::kLong);
  at::Tensor lengths = at::empty({R}, at::kInt);
  {
    auto a = ids.accessor<int64_t, 2>();
    auto l = lengths.accessor<int32_t, 1>();
    int64_t row = 0;
    for (const auto& p : prompt_ids) {
      const int64_t len = static_cast<int64_t>(p.size());
      for (int k = 0; k < num_images; ++k, row += 2) {
        for (int64_t j = 0; j < len; ++j) a[row][j] = p[j];
        a[row + 1][0] = p.front();
        a[row + 1][len - 1] = p.back();  // the pads between are already there
        l[row] = l[row + 1] = static_cast<int32_t>(len);
      }
    }
  }
  const at::Device dev = I.device;
  const auto i64 = at::TensorOptions().dtype(at::kLong).device(dev);
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(dev);
  ids = ids.to(dev);
  lengths = lengths.to(dev);
  at::Tensor k_cache = at::zeros({g.layers, R, g.kv_heads, S, g.head_dim}, at::TensorOptions().dtype(I.dtype).device(dev));
  at::Tensor v_cache = at::zeros_like(k_cache);
  at::Tensor codes = at::zeros({N, n}, i64);
  at::Tensor cfg_t = at::full({1}, cfg_weight, f32);
  at::Tensor temp_t = at::full({1}, temperature, f32);
  at::Tensor seed_t = at::full({1}, static_cast<int64_t>(seed), i64);
  at::Tensor step_t = at::zeros({1}, i64);

  // ---- prefill, then n - 1 steps; the models mutate caches, lengths, codes and step in place, and nothing is
  // read back to the host inside the loop
  auto t0 = std::chrono::steady_clock::now();
  std::vector<at::Tensor> out =
      Impl::run(*I.prefill, {ids, lengths, k_cache, v_cache, codes, cfg_t, temp_t, seed_t, step_t}, "prefill");
  if (out.empty() || out[0].dim() != 2 || out[0].size(0) != R || out[0].size(1) != g.hidden_size) {
    I.bad_output("prefill", out.empty() ? at::Tensor() : out[0], "[" + std::to_string(R) + ", " +
                                                                       std::to_string(g.hidden_size) + "]");
  }
  at::Tensor x = out[0];
  if (timings) {
    I.sync(step_t);
    timings->prefill_ms += ms_since(t0);
  }
  auto t1 = std::chrono::steady_clock::now();
  for (int64_t i = 1; i < n; ++i) {
    out = Impl::run(*I.step, {x, k_cache, v_cache, lengths, codes, cfg_t, temp_t, seed_t, step_t}, "step");
    x = out.at(0);
  }
  at::Tensor result = codes.to(at::kCPU);  // waits for the device
  if (timings) {
    timings->decode_ms += ms_since(t1);
    timings->steps += n - 1;
  }
  return result;
}

at::Tensor Runtime::decode(const at::Tensor& codes, Timings* timings) {
  Impl& I = *impl_;
  const Manifest& m = I.m;
  I.require_part(kVQDecoderPart);
  const int64_t n = m.vq.grid * m.vq.grid, K = m.generator.codebook_size, S = m.vq.image_size;
  if (!codes.defined() || codes.dim() != 2 || codes.size(0) < 1 || codes.size(1) != n) {
    throw Error("codes must be [N, " + std::to_string(n) + "] (N >= 1 images of " + std::to_string(n) +
                " codes), got " + (codes.defined() ? c10::str(codes.sizes()) : std::string("an undefined tensor")));
  }
  if (at::isFloatingType(codes.scalar_type()) || codes.scalar_type() == at::kBool ||
      at::isComplexType(codes.scalar_type())) {
    throw Error(std::string("codes must be integers (int64), got ") + c10::toString(codes.scalar_type()));
  }
  at::NoGradGuard no_grad;
  at::Tensor c = codes.to(at::kCPU, at::kLong).contiguous();
  {
    // out-of-range codes would index past the codebook inside the compiled decoder
    const int64_t* p = c.data_ptr<int64_t>();
    for (int64_t i = 0; i < c.numel(); ++i) {
      if (p[i] < 0 || p[i] >= K) {
        throw Error("codes: " + std::to_string(p[i]) + " at image " + std::to_string(i / n) + ", position " +
                    std::to_string(i % n) + " is outside the codebook [0, " + std::to_string(K) + ")");
      }
    }
  }
  Loader& l = I.single(I.vq, kVQDecoderPart, timings);
  return I.chunked(l, kVQDecoderPart, c, at::kLong, {S, S, 3}, at::kByte, at::kByte, "VQ decoder", timings);
}

at::Tensor Runtime::encode_image(const at::Tensor& pixels, Timings* timings) {
  Impl& I = *impl_;
  const Manifest& m = I.m;
  I.require_part(kVisionPart);
  const int64_t s = m.vision.image_size;
  if (!pixels.defined() || pixels.dim() != 4 || pixels.size(0) < 1 || pixels.size(1) != 3 || pixels.size(2) != s ||
      pixels.size(3) != s) {
    throw Error("pixels must be [N, 3, " + std::to_string(s) + ", " + std::to_string(s) +
                "] (N >= 1 preprocessed images), got " +
                (pixels.defined() ? c10::str(pixels.sizes()) : std::string("an undefined tensor")));
  }
  if (!at::isFloatingType(pixels.scalar_type())) {
    throw Error(std::string("pixels must be float32, got ") + c10::toString(pixels.scalar_type()));
  }
  at::NoGradGuard no_grad;
  Loader& l = I.single(I.vision, kVisionPart, timings);
  return I.chunked(l, kVisionPart, pixels, at::kFloat, {m.vision.tokens, m.vision.hidden_size},
                   at::ScalarType::Undefined, at::kFloat, "vision encoder", timings);
}

}  // namespace fastjanus
