from setuptools import find_packages, setup

setup(
    name="kan-vit",
    version="0.1.0",
    description="KAN-ViT: Vision Transformers with a Chebyshev-KAN feed-forward, for timm and PyTorch/XLA",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["kan_vit", "kan_vit.*"]),
    install_requires=[
        # torch_xla 2.9.0 (the newest release) requires exactly this torch / torchvision pair.
        "torch==2.9.0",
        "torchvision==0.24.0",
        "torch_xla==2.9.0",
        "timm>=1.0.20,<1.1",
        "accelerate",
        "numpy",
        "msgpack>=1.0",
        "safetensors",
        "pyyaml",
        "pillow",
        "scikit-learn",  # ships the digits images of the embedded demo
        "tqdm",
        "wandb",
        "webdataset>=0.2.86",
    ],
    extras_require={
        "tpu": ["torch_xla[tpu]==2.9.0"],
        "test": ["pytest", "flax"],
    },
    entry_points={
        "console_scripts": [
            "kan-vit-convert=kan_vit.convert:main",
        ],
    },
)
