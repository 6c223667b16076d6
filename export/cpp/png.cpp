#include "png.h"

#include <zlib.h>

#include <fstream>
#include <vector>

#include "fastjanus/error.h"

namespace fastjanus {

namespace {

void put_u32(std::string& out, uint32_t v) {  // PNG integers are big-endian
  out += char((v >> 24) & 0xFF);
  out += char((v >> 16) & 0xFF);
  out += char((v >> 8) & 0xFF);
  out += char(v & 0xFF);
}

void put_chunk(std::string& out, const char type[4], const uint8_t* data, size_t size) {
  put_u32(out, static_cast<uint32_t>(size));
  const size_t type_at = out.size();
  out.append(type, 4);
  if (size) out.append(reinterpret_cast<const char*>(data), size);
  // the CRC covers the chunk type and data, not the length
  uLong crc = crc32(0L, Z_NULL, 0);
  crc = crc32(crc, reinterpret_cast<const Bytef*>(out.data() + type_at), static_cast<uInt>(4 + size));
  put_u32(out, static_cast<uint32_t>(crc));
}

}  // namespace

std::string encode_png_rgb(const uint8_t* rgb, int width, int height) {
  if (width <= 0 || height <= 0) throw Error("PNG: image size must be positive");
  const size_t row = static_cast<size_t>(width) * 3;
  // each scanline is preceded by its filter type; 0 (none) keeps the writer trivial, zlib does the rest
  std::vector<uint8_t> raw((row + 1) * static_cast<size_t>(height));
  for (int y = 0; y < height; ++y) {
    uint8_t* dst = raw.data() + static_cast<size_t>(y) * (row + 1);
    dst[0] = 0;
    std::copy(rgb + static_cast<size_t>(y) * row, rgb + static_cast<size_t>(y + 1) * row, dst + 1);
  }
  uLongf zsize = compressBound(static_cast<uLong>(raw.size()));
  std::vector<uint8_t> z(zsize);
  if (compress2(z.data(), &zsize, raw.data(), static_cast<uLong>(raw.size()), Z_DEFAULT_COMPRESSION) != Z_OK) {
    throw Error("PNG: zlib compression failed");
  }

  std::string out("\x89PNG\r\n\x1a\n", 8);
  uint8_t ihdr[13];
  for (int i = 0; i < 4; ++i) {
    ihdr[i] = uint8_t((uint32_t(width) >> (24 - 8 * i)) & 0xFF);
    ihdr[4 + i] = uint8_t((uint32_t(height) >> (24 - 8 * i)) & 0xFF);
  }
  ihdr[8] = 8;   // bits per channel
  ihdr[9] = 2;   // colour type: RGB
  ihdr[10] = 0;  // compression: deflate
  ihdr[11] = 0;  // filter method 0
  ihdr[12] = 0;  // no interlace
  put_chunk(out, "IHDR", ihdr, sizeof ihdr);
  put_chunk(out, "IDAT", z.data(), zsize);
  put_chunk(out, "IEND", nullptr, 0);
  return out;
}

void write_png_rgb(const std::string& path, const uint8_t* rgb, int width, int height) {
  const std::string bytes = encode_png_rgb(rgb, width, height);
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw Error("cannot write " + path + ": check the folder exists and is writable");
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  f.close();
  if (!f) throw Error("writing " + path + " failed (disk full?)");
}

}  // namespace fastjanus
