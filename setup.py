from setuptools import setup

setup(
    name="minidolly",
    version="0.1.0",
    description="Databricks' Dolly 2.0 (GPT-NeoX / Pythia) from scratch in PyTorch: model, FSDP2 training, Triton kernels.",
    packages=["minidolly", "kernels"],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "numpy",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "huggingface_hub>=0.20",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest", "transformers>=4.40", "peft>=0.10"],
        "plot": ["matplotlib"],
    },
)
