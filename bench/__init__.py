"""Benchmarks (fastjanus.bench): `harness` behind `fastjanus bench`, `kernels` microbenchmarks, `roofline`
arithmetic, `hf_port` (the transformers baseline), `plot`."""
