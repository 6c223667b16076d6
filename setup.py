from setuptools import setup

# kernels/, export/ and bench/ live at the top level of the repository but install as fastjanus.kernels,
# fastjanus.export and fastjanus.bench: a top-level `kernels` would clash with the PyPI package of that name.
setup(
    name="fastjanus",
    version="0.1.0",
    description="Optimized inference runtime for DeepSeek Janus-1.3B, Janus-Pro-1B and Janus-Pro-7B",
    python_requires=">=3.10",
    packages=["fastjanus", "fastjanus.models", "fastjanus.engine",
              "fastjanus.kernels", "fastjanus.export", "fastjanus.bench"],
    package_dir={"fastjanus": "fastjanus", "fastjanus.kernels": "kernels", "fastjanus.export": "export",
                 "fastjanus.bench": "bench"},
    install_requires=["torch>=2.5", "triton>=3.6; platform_system == 'Linux'", "numpy", "safetensors>=0.4",
                      "tokenizers>=0.15", "pillow>=9.1", "tqdm"],
    extras_require={
        # transformers and diffusers are test oracles only (parity tests), never imported by the runtime.
        "test": ["pytest", "transformers>=5.0", "diffusers>=0.30"],
        # ONNX export (fastjanus export-onnx) and the ONNX Runtime runner; on a CUDA host install onnxruntime-gpu
        # in place of onnxruntime for its CUDA and TensorRT providers.
        "onnx": ["onnx>=1.15", "onnxruntime>=1.17"],
    },
    entry_points={"console_scripts": ["fastjanus=fastjanus.cli:main"]},
)
