// fastjanus::Error, on its own so that code without LibTorch (the PNG writer) can throw it.
#pragma once

#include <stdexcept>

namespace fastjanus {

// Every failure the caller can act on (bad input, missing or mismatched packages). what() is one line.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace fastjanus
