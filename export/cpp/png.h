// Minimal PNG writer for the runner's images (8-bit RGB, no interlace), on zlib.
#pragma once

#include <cstdint>
#include <string>

namespace fastjanus {

// The PNG file bytes of a width x height image; rgb holds height rows of width * 3 bytes.
std::string encode_png_rgb(const uint8_t* rgb, int width, int height);

// Writes encode_png_rgb's bytes to path. Throws fastjanus::Error when the file cannot be written.
void write_png_rgb(const std::string& path, const uint8_t* rgb, int width, int height);

}  // namespace fastjanus
