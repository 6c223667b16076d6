"""ONNX export of the SigLIP encoder and the VQ decoder (fastjanus.export). Not built yet."""
