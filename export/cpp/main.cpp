// fastjanus-run: Janus / Janus-Pro text-to-image generation from `fastjanus export-aoti` packages, no Python.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "fastjanus/runtime.h"
#include "png.h"

namespace fs = std::filesystem;
using fastjanus::Error;

namespace {

const char* kUsage =
    "usage:\n"
    "  fastjanus-run generate --packages DIR --prompt-ids FILE [--num-images N] [--cfg W]\n"
    "                         [--temperature T] [--seed S] [--runs K] --out PREFIX\n"
    "  fastjanus-run decode --packages DIR --codes FILE --out PREFIX\n"
    "  fastjanus-run encode --packages DIR --pixels FILE --out FILE\n"
    "\n"
    "Runs the AOTInductor packages written by `fastjanus export-aoti --model DIR --out DIR`.\n"
    "\n"
    "generate  images from prompts' token ids: FILE holds one prompt per line, whitespace-separated ids of the\n"
    "          generation template (`fastjanus tokenize`; blank lines and lines starting with # are skipped).\n"
    "          Writes PREFIX-<i>.png for each image (prompts in file order, --num-images each) and PREFIX.codes\n"
    "          (one line of image token codes per image). --cfg and --temperature default to the manifest's\n"
    "          sampling defaults (temperature 0 = greedy); without --seed a random one is drawn and printed.\n"
    "          --runs K repeats the request K times (timing) and prints the median of runs 2..K too.\n"
    "decode    PREFIX-<i>.png from a codes file in PREFIX.codes' format.\n"
    "encode    image embeddings: FILE is raw little-endian float32 [N, 3, s, s] preprocessed pixels; writes raw\n"
    "          float32 [N, tokens, hidden].\n";

// What the program was doing, prefixed to errors that come from LibTorch rather than from our own checks.
std::string g_stage = "starting";

// ---- command line ----------------------------------------------------------------------------------------------

struct Flags {
  std::map<std::string, std::string> values;
  bool has(const std::string& f) const { return values.count(f) != 0; }
  const std::string& get(const std::string& f) const { return values.at(f); }
};

Flags parse_flags(int argc, char** argv, const std::string& cmd, const std::set<std::string>& allowed,
                  const std::vector<std::string>& required) {
  Flags flags;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0) throw Error(cmd + ": unexpected argument '" + a + "' (see --help)");
    std::string value;
    bool inline_value = false;
    if (auto eq = a.find('='); eq != std::string::npos) {
      value = a.substr(eq + 1);
      a = a.substr(0, eq);
      inline_value = true;
    }
    if (!allowed.count(a)) throw Error(cmd + ": unknown option " + a + " (see --help)");
    if (!inline_value) {
      if (i + 1 >= argc || std::strncmp(argv[i + 1], "--", 2) == 0) throw Error(a + " needs a value");
      value = argv[++i];
    }
    flags.values[a] = value;  // a repeated option: the last one counts, as in the Python CLI (argparse)
  }
  for (const auto& r : required) {
    if (!flags.has(r)) throw Error(cmd + ": " + r + " is required (see --help)");
  }
  return flags;
}

// Whole-string parses: "2x", " 2" or "" are errors naming the flag.
template <class T>
T parse_integer(const std::string& flag, const std::string& s, const char* what) {
  T v{};
  auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || r.ec != std::errc() || r.ptr != s.data() + s.size()) {
    throw Error(flag + " must be " + what + ", got '" + s + "'");
  }
  return v;
}

double parse_number(const std::string& flag, const std::string& s) {
  double v = 0;
  auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || r.ec != std::errc() || r.ptr != s.data() + s.size()) {
    throw Error(flag + " must be a number, got '" + s + "'");
  }
  return v;
}

// ---- files -----------------------------------------------------------------------------------------------------

std::string read_file(const std::string& flag, const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw Error(flag + " " + path + ": not found");
  if (fs::is_directory(path, ec)) throw Error(flag + " " + path + ": is a folder, not a file");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(flag + " " + path + ": cannot be read (permissions?)");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

struct IdLine {
  int line;
  std::vector<int64_t> ids;
};

// Lines of whitespace-separated decimal integers; blank lines and '#' comments skipped.
std::vector<IdLine> read_id_lines(const std::string& flag, const std::string& path, const char* what) {
  std::istringstream in(read_file(flag, path));
  std::vector<IdLine> out;
  std::string text;
  for (int number = 1; std::getline(in, text); ++number) {
    std::istringstream words(text);
    std::string w;
    if (!(words >> w) || w[0] == '#') continue;
    IdLine l{number, {}};
    do {
      int64_t v = 0;
      auto r = std::from_chars(w.data(), w.data() + w.size(), v);
      if (r.ec != std::errc() || r.ptr != w.data() + w.size()) {
        throw Error(path + " line " + std::to_string(number) + ": '" + w + "' is not a " + what +
                    " (a decimal integer)");
      }
      l.ids.push_back(v);
    } while (words >> w);
    out.push_back(std::move(l));
  }
  return out;
}

// PREFIX names files (PREFIX-0.png ...): its folder is created when missing.
void prepare_prefix(const std::string& flag, const std::string& prefix) {
  const fs::path p(prefix);
  if (prefix.empty() || !p.has_filename()) {
    throw Error(flag + " must name a file prefix such as out/fox (got '" + prefix + "')");
  }
  const fs::path parent = p.parent_path();
  std::error_code ec;
  if (!parent.empty() && !fs::is_directory(parent, ec)) {
    fs::create_directories(parent, ec);
    if (ec) throw Error(flag + ": cannot create folder " + parent.string() + " (" + ec.message() + ")");
  }
}

void write_pngs(const std::string& prefix, const at::Tensor& images) {
  g_stage = "writing the PNG files";
  const at::Tensor img = images.contiguous();
  const int h = static_cast<int>(img.size(1)), w = static_cast<int>(img.size(2));
  const uint8_t* base = img.data_ptr<uint8_t>();
  for (int64_t i = 0; i < img.size(0); ++i) {
    fastjanus::write_png_rgb(prefix + "-" + std::to_string(i) + ".png", base + i * int64_t(h) * w * 3, w, h);
  }
}

std::string ms(double v, int decimals = 1) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f ms", decimals, v);
  return buf;
}

// ---- commands --------------------------------------------------------------------------------------------------

int cmd_generate(int argc, char** argv) {
  Flags f = parse_flags(argc, argv, "generate",
                        {"--packages", "--prompt-ids", "--num-images", "--cfg", "--temperature", "--seed", "--out",
                         "--runs"},
                        {"--packages", "--prompt-ids", "--out"});
  const int num_images = f.has("--num-images")
                             ? parse_integer<int>("--num-images", f.get("--num-images"), "a whole number")
                             : 1;
  if (num_images < 1) throw Error("--num-images must be at least 1, got " + std::to_string(num_images));
  // --runs K: the whole request K times with the same inputs, for timing; the first run pays the packages' load
  // and the device's first-use costs, so the median of runs 2..K is printed as well
  const int runs = f.has("--runs") ? parse_integer<int>("--runs", f.get("--runs"), "a whole number") : 1;
  if (runs < 1 || runs > 1000) throw Error("--runs must be in [1, 1000], got " + f.get("--runs"));
  const bool has_cfg = f.has("--cfg"), has_temp = f.has("--temperature");
  const double cfg_arg = has_cfg ? parse_number("--cfg", f.get("--cfg")) : 0.0;
  const double temp_arg = has_temp ? parse_number("--temperature", f.get("--temperature")) : 0.0;
  // checked here too (the runtime checks again) so that the message names the flag
  if (has_cfg && !(std::isfinite(static_cast<float>(cfg_arg)) && cfg_arg >= 0)) {
    throw Error("--cfg must be a finite number >= 0, got " + f.get("--cfg"));
  }
  if (has_temp && !(std::isfinite(static_cast<float>(temp_arg)) && temp_arg >= 0)) {
    throw Error("--temperature must be a finite number >= 0 (0 = greedy), got " + f.get("--temperature"));
  }
  uint64_t seed = 0;
  if (f.has("--seed")) {
    seed = parse_integer<uint64_t>("--seed", f.get("--seed"), "a whole number in [0, 2^63)");
    if (seed > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      throw Error("--seed must be a whole number in [0, 2^63), got " + f.get("--seed"));
    }
  } else {
    std::random_device rd;
    seed = ((uint64_t(rd()) << 32) | uint64_t(rd())) & uint64_t(std::numeric_limits<int64_t>::max());
  }

  g_stage = "reading the packages' manifest";
  fastjanus::Runtime rt(f.get("--packages"));
  rt.require_part(fastjanus::kGeneratorPart);
  rt.require_part(fastjanus::kVQDecoderPart);
  const auto& m = rt.manifest();
  const double cfg = has_cfg ? cfg_arg : m.default_cfg_weight;
  const double temperature = has_temp ? temp_arg : m.default_temperature;

  const std::string ids_path = f.get("--prompt-ids");
  std::vector<IdLine> lines = read_id_lines("--prompt-ids", ids_path, "token id");
  if (lines.empty()) {
    throw Error(ids_path + " holds no prompt (one prompt's token ids per line; make them with `fastjanus tokenize`)");
  }
  std::vector<std::vector<int64_t>> prompts;
  for (auto& l : lines) {
    const std::string why = rt.prompt_problem(l.ids);
    if (!why.empty()) throw Error(ids_path + " line " + std::to_string(l.line) + ": prompt " + why);
    prompts.push_back(std::move(l.ids));
  }
  const std::string prefix = f.get("--out");
  prepare_prefix("--out", prefix);

  fastjanus::Timings t;
  // both packages loaded (and their fingerprints checked) before any work: a bad VQ decoder is found now, not
  // after the generation loop
  g_stage = "loading the packages";
  rt.load(fastjanus::kGeneratorPart, &t);
  rt.load(fastjanus::kVQDecoderPart, &t);
  g_stage = "generating image tokens";
  at::Tensor codes = rt.generate(prompts, num_images, cfg, temperature, seed, &t);

  g_stage = "writing the codes file";
  {
    const std::string path = prefix + ".codes";
    std::ofstream out(path, std::ios::trunc);
    if (!out) throw Error("cannot write " + path + ": check the folder is writable");
    const auto a = codes.accessor<int64_t, 2>();
    for (int64_t i = 0; i < codes.size(0); ++i) {
      for (int64_t j = 0; j < codes.size(1); ++j) out << (j ? " " : "") << a[i][j];
      out << '\n';
    }
    out.close();
    if (!out) throw Error("writing " + path + " failed (disk full?)");
  }

  g_stage = "decoding image tokens to pixels";
  at::Tensor images = rt.decode(codes, &t);
  write_pngs(prefix, images);

  const double per_step = t.steps > 0 ? t.decode_ms / double(t.steps) : 0.0;
  std::cout << "generated " << codes.size(0) << " images (" << codes.size(1) << " codes each) in "
            << ms(t.prefill_ms + t.decode_ms + t.vq_ms) << ": prefill " << ms(t.prefill_ms) << ", decode "
            << ms(t.decode_ms) << " (" << ms(per_step, 2) << "/step), VQ decode " << ms(t.vq_ms) << "; load "
            << ms(t.load_ms) << "; seed " << seed << std::endl;
  if (runs > 1) {
    g_stage = "repeating the request (--runs)";
    std::vector<double> total, prefill, decode, vq;
    for (int r = 1; r < runs; ++r) {
      fastjanus::Timings tr;
      at::Tensor again = rt.generate(prompts, num_images, cfg, temperature, seed, &tr);
      rt.decode(again, &tr);
      if (!again.equal(codes)) std::cerr << "fastjanus-run: warning: run " << r + 1 << " gave other codes" << std::endl;
      total.push_back(tr.prefill_ms + tr.decode_ms + tr.vq_ms);
      prefill.push_back(tr.prefill_ms);
      decode.push_back(tr.decode_ms);
      vq.push_back(tr.vq_ms);
    }
    auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      const size_t k = v.size();
      return k % 2 ? v[k / 2] : 0.5 * (v[k / 2 - 1] + v[k / 2]);
    };
    const double d = median(decode);
    std::cout << "median of runs 2.." << runs << ": " << ms(median(total)) << ": prefill " << ms(median(prefill))
              << ", decode " << ms(d) << " (" << ms(t.steps > 0 ? d / double(t.steps) : 0.0, 2)
              << "/step), VQ decode " << ms(median(vq)) << std::endl;
  }
  return 0;
}

int cmd_decode(int argc, char** argv) {
  Flags f = parse_flags(argc, argv, "decode", {"--packages", "--codes", "--out"}, {"--packages", "--codes", "--out"});
  g_stage = "reading the packages' manifest";
  fastjanus::Runtime rt(f.get("--packages"));
  rt.require_part(fastjanus::kVQDecoderPart);

  const std::string path = f.get("--codes");
  std::vector<IdLine> lines = read_id_lines("--codes", path, "code");
  if (lines.empty()) throw Error(path + " holds no codes (one image's codes per line, as in PREFIX.codes)");
  const size_t n = lines[0].ids.size();
  at::Tensor codes = at::empty({static_cast<int64_t>(lines.size()), static_cast<int64_t>(n)}, at::kLong);
  for (size_t i = 0; i < lines.size(); ++i) {
    if (lines[i].ids.size() != n) {
      throw Error(path + " line " + std::to_string(lines[i].line) + ": " + std::to_string(lines[i].ids.size()) +
                  " codes, but line " + std::to_string(lines[0].line) + " has " + std::to_string(n));
    }
    std::copy(lines[i].ids.begin(), lines[i].ids.end(), codes.data_ptr<int64_t>() + i * n);
  }
  const std::string prefix = f.get("--out");
  prepare_prefix("--out", prefix);

  fastjanus::Timings t;
  g_stage = "decoding image tokens to pixels";
  at::Tensor images = rt.decode(codes, &t);
  write_pngs(prefix, images);
  std::cout << "decoded " << images.size(0) << " images (" << images.size(1) << "x" << images.size(2) << ") in "
            << ms(t.vq_ms) << "; load " << ms(t.load_ms) << std::endl;
  return 0;
}

int cmd_encode(int argc, char** argv) {
  Flags f = parse_flags(argc, argv, "encode", {"--packages", "--pixels", "--out"}, {"--packages", "--pixels", "--out"});
  g_stage = "reading the packages' manifest";
  fastjanus::Runtime rt(f.get("--packages"));
  rt.require_part(fastjanus::kVisionPart);
  const auto& m = rt.manifest();

  // The files are little-endian float32: a big-endian host would need byte swapping this runner does not do.
  const uint16_t probe = 1;
  if (*reinterpret_cast<const uint8_t*>(&probe) != 1) throw Error("encode needs a little-endian machine");

  const std::string path = f.get("--pixels");
  const std::string bytes = read_file("--pixels", path);
  const int64_t s = m.vision.image_size;
  const int64_t per_image = 3 * s * s * static_cast<int64_t>(sizeof(float));
  if (bytes.empty() || static_cast<int64_t>(bytes.size()) % per_image != 0) {
    throw Error(path + ": " + std::to_string(bytes.size()) + " bytes is not a whole number of float32 [3, " +
                std::to_string(s) + ", " + std::to_string(s) + "] images (" + std::to_string(per_image) +
                " bytes each)");
  }
  const int64_t N = static_cast<int64_t>(bytes.size()) / per_image;
  at::Tensor pixels = at::empty({N, 3, s, s}, at::kFloat);
  std::memcpy(pixels.data_ptr<float>(), bytes.data(), bytes.size());

  const std::string out_path = f.get("--out");
  const fs::path parent = fs::path(out_path).parent_path();
  std::error_code ec;
  if (!parent.empty() && !fs::is_directory(parent, ec)) {
    fs::create_directories(parent, ec);
    if (ec) throw Error("--out: cannot create folder " + parent.string() + " (" + ec.message() + ")");
  }

  fastjanus::Timings t;
  g_stage = "encoding images";
  at::Tensor embeds = rt.encode_image(pixels, &t).contiguous();

  g_stage = "writing the embeddings";
  std::ofstream out(out_path, std::ios::binary | std::ios::trunc);
  if (!out) throw Error("cannot write " + out_path + ": check the folder is writable");
  out.write(reinterpret_cast<const char*>(embeds.data_ptr<float>()),
            static_cast<std::streamsize>(embeds.numel() * sizeof(float)));
  out.close();
  if (!out) throw Error("writing " + out_path + " failed (disk full?)");
  std::cout << "encoded " << N << " images to float32 [" << N << ", " << embeds.size(1) << ", " << embeds.size(2)
            << "] in " << ms(t.vq_ms) << "; load " << ms(t.load_ms) << std::endl;
  return 0;
}

std::string first_line(const char* s) {
  const char* nl = std::strchr(s, '\n');
  return nl ? std::string(s, nl) : std::string(s);
}

int fail(const std::string& msg) {
  std::cerr << "fastjanus-run: error: " << msg << std::endl;
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << kUsage;
    return 2;
  }
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      std::cout << kUsage;
      return 0;
    }
  }
  const std::string cmd = argv[1];
  try {
    if (cmd == "generate") return cmd_generate(argc, argv);
    if (cmd == "decode") return cmd_decode(argc, argv);
    if (cmd == "encode") return cmd_encode(argc, argv);
    std::cerr << "fastjanus-run: error: unknown command '" << cmd << "' (generate, decode or encode)\n" << kUsage;
    return 2;
  } catch (const Error& e) {
    return fail(e.what());
  } catch (const c10::Error& e) {
    // LibTorch messages carry a backtrace and source context: the first line says what went wrong
    return fail(g_stage + ": " + first_line(e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return fail(g_stage + ": " + first_line(e.what()));
  }
}
